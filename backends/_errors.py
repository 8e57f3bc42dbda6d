"""Exceptions raised by muxgate.backends.

Every error that leaves the package is a :class:`BackendError`; errors from
fsspec, botocore, aiohttp or gcsfs are translated at the boundary with
``raise ... from exc`` so callers never depend on a storage library.

Two messages per error: ``str(exc)`` has the full detail for the log
(URLs with bucket names, local paths, the underlying error), and
``exc.client_message`` says what happened in words fit for a client, with
no bucket, path, endpoint or credential in it. Whatever maps these errors
to responses sends ``client_message`` and logs ``str(exc)``.
"""

from __future__ import annotations

import os
from typing import Any


def _restore(cls: type[BackendError], message: str, state: dict[str, Any]) -> BackendError:
    obj = cls.__new__(cls)
    Exception.__init__(obj, message)
    obj.__dict__.update(state)
    return obj


class BackendError(Exception):
    """Base class of every error raised by muxgate.backends.

    Attributes:
        url: The storage URL involved, without credentials ("" when none).
            Not for clients: it names the bucket or the local path.
        client_message: What happened, for clients: never a URL, path or
            bucket name.
    """

    #: ``client_message`` of errors that do not set their own
    default_client_message = "model storage failed"

    def __init__(self, message: str, *, url: str = "", client_message: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.client_message = client_message or self.default_client_message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take structured keyword arguments; pickle by state so
        # errors survive a trip between processes.
        return (_restore, (type(self), str(self), dict(self.__dict__)))


class InvalidModelIdError(BackendError, ValueError):
    """A model id or path part would leave the storage root or is malformed.

    Attributes:
        model_id: The refused id (or path part).
        reason: Why it was refused, meant for the client.
    """

    def __init__(self, model_id: str, reason: str) -> None:
        # The id is the client's own input: safe to echo.
        message = f"invalid model id {model_id!r}: {reason}"
        super().__init__(message, client_message=message)
        self.model_id = model_id
        self.reason = reason


class UnsupportedProtocolError(BackendError, ValueError):
    """No storage backend is registered for the URL's protocol."""

    default_client_message = "model storage is misconfigured"

    def __init__(self, protocol: str, *, url: str = "") -> None:
        super().__init__(
            f"no storage backend registered for {protocol}:// URLs "
            "(see muxgate.backends.register_backend)",
            url=url,
        )
        self.protocol = protocol


class MissingDependencyError(BackendError, ImportError):
    """The package implementing a protocol is not installed."""

    default_client_message = "model storage is misconfigured"

    def __init__(self, protocol: str, package: str, *, url: str = "") -> None:
        super().__init__(f"Install {package} to access {protocol}:// URLs", url=url)
        self.protocol = protocol
        self.package = package


class ModelNotFoundError(BackendError):
    """The model file does not exist in storage (an HTTP 404 at the edge)."""

    default_client_message = "model not found in storage"

    def __init__(self, url: str) -> None:
        message = f"model file not found: {url}"
        if "://" not in url and not os.path.isabs(url):
            # A relative root is read from the process's working directory
            # (that of `muxgate serve`), not from the config file's folder.
            message += f" (a relative path: from the working directory {os.getcwd()})"
        super().__init__(message, url=url)


class ModelFormatError(BackendError):
    """The file exists but is not a valid model of the requested format.

    Raised for truncated or corrupt files, a file of another format, or a
    pickle that refers to objects a safe load refuses.

    Attributes:
        format: The requested format ("state_dict", "torchscript", ...).
        reason: What was wrong with the file.
    """

    def __init__(self, url: str, format: str, reason: str) -> None:
        super().__init__(
            f"{url} is not a valid {format} file: {reason}",
            url=url,
            client_message=f"the model file is not a valid {format} file",
        )
        self.format = format
        self.reason = reason


class UnsafePickleError(ModelFormatError):
    """A pickle needs arbitrary code to load and the caller did not trust it."""


class StorageUnavailableError(BackendError):
    """Storage could not be reached (refused, timed out, 5xx) within the
    retry budget or the time left before the request's deadline.

    Attributes:
        attempts: How many attempts were made.
        elapsed: Seconds spent, including back-off.
        reason: The last failure, for the log.
    """

    default_client_message = "model storage is unavailable; retry later"

    def __init__(self, url: str, *, attempts: int, elapsed: float, reason: str) -> None:
        super().__init__(
            f"storage unavailable for {url} after {attempts} attempt(s) "
            f"in {elapsed:.1f}s: {reason}",
            url=url,
        )
        self.attempts = attempts
        self.elapsed = elapsed
        self.reason = reason


class StorageAccessDeniedError(BackendError):
    """Storage refused the replica's credentials, or it has none.

    Missing credentials (botocore's ``NoCredentialsError``, Google's
    ``DefaultCredentialsError``), ones storage does not accept (S3
    ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, an expired token),
    or ones without permission for the object (S3 ``AccessDenied``, an
    HTTP 401 or 403 from GCS or an ``http(s)://`` root, a
    ``PermissionError`` from any filesystem). Never retried: the same credentials fail the
    same way until an operator changes them or the permissions.

    Attributes:
        reason: The storage library's error, for the log.
    """

    default_client_message = "model storage refused access (credentials missing or not allowed)"

    def __init__(self, url: str, *, reason: str) -> None:
        super().__init__(f"storage refused access to {url}: {reason}", url=url)
        self.reason = reason
