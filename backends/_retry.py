"""Transient-failure classification (pure) and the bounded retry loop."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from ._config import RetryPolicy
from ._errors import BackendError, StorageUnavailableError

logger = logging.getLogger("muxgate.backends")

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
# Matched by class name anywhere in the MRO so that backends need not import
# botocore, aiohttp or requests just to classify their errors.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "IncompleteRead",
        "ResponseParserError",
        "ChunkedEncodingError",
        "ProxyError",
    }
)


# Credentials missing or refused, by class name (botocore, google-auth):
# the storage library could not sign or authorize the request at all.
_DENIED_NAMES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "TokenRetrievalError",
        "UnauthorizedSSOTokenError",
        "DefaultCredentialsError",
        "RefreshError",
    }
)
_DENIED_STATUS = frozenset({401, 403})


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying.

    Transient: HTTP 408/429/5xx, connection refused/reset/aborted, timeouts,
    truncated responses, found on the exception or anything in its
    ``__cause__``/``__context__`` chain. Not transient: missing objects,
    permissions, bad requests, and our own :class:`BackendError` subclasses.
    """
    for link in _chain(exc):
        if isinstance(link, (FileNotFoundError, PermissionError, BackendError)):
            return False
        status = _status_of(link)
        if status is not None:
            return status in _TRANSIENT_STATUS
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNO:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(link).__mro__):
            return True
    return False


def denied_by(exc: BaseException) -> BaseException | None:
    """The error that says a storage call's credentials are missing or
    refused: ``exc`` or one in its ``__cause__``/``__context__`` chain
    (None: none does).

    Denied: a ``PermissionError`` (s3fs turns S3's ``AccessDenied``,
    ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``ExpiredToken`` and
    a bare 403 into one; a local filesystem raises one too), an
    HTTP 401 or 403 (gcsfs's ``HttpError``; aiohttp's, under the
    ``FileNotFoundError`` fsspec's HTTP filesystem raises for any failed
    stat), gcsfs's ``OSError("Forbidden: ...")`` for a 403, or a
    credentials error of botocore or google-auth, by class name.
    """
    for link in _chain(exc):
        if isinstance(link, PermissionError):
            return link
        if _status_of(link) in _DENIED_STATUS:
            return link
        if any(cls.__name__ in _DENIED_NAMES for cls in type(link).__mro__):
            return link
        # gcsfs raises a plain OSError for a 403, with no status or errno:
        # only its message says so (gcsfs.retry.validate_response).
        if type(link) is OSError and link.errno is None and str(link).startswith("Forbidden: "):
            return link
    return None


def is_access_denied(exc: BaseException) -> bool:
    """Whether a storage error means the credentials are missing or refused
    (see :func:`denied_by`)."""
    return denied_by(exc) is not None


async def with_retries(
    operation: Callable[[float | None], Awaitable[T]],
    *,
    policy: RetryPolicy,
    url: str,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or the budget is spent.

    ``operation`` gets the seconds left before ``deadline`` (a
    ``clock()`` value; ``None``: no deadline) and must not wait longer
    than that: each attempt is bounded by the time left, and no attempt
    starts after the deadline or after the policy's own ``deadline`` from
    the first attempt.

    Permanent errors propagate unchanged (the caller translates them);
    after the last transient failure :class:`StorageUnavailableError` is
    raised from it.
    """
    start = clock()
    attempt = 0
    while True:
        left = None if deadline is None else deadline - clock()
        if left is not None and left <= 0:
            raise StorageUnavailableError(
                url,
                attempts=attempt,
                elapsed=clock() - start,
                reason="no time left before the request's deadline",
            )
        attempt += 1
        try:
            return await operation(left)
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = clock()
            elapsed = now - start
            delay = policy.delay(attempt)
            if (
                attempt >= policy.max_attempts
                or elapsed + delay >= policy.deadline
                or (deadline is not None and now + delay >= deadline)
            ):
                raise StorageUnavailableError(
                    url, attempts=attempt, elapsed=elapsed, reason=f"{type(exc).__name__}: {exc}"
                ) from exc
            logger.info(
                "Transient storage error on %s (attempt %d/%d), retrying in %.2fs: %s",
                url,
                attempt,
                policy.max_attempts,
                delay,
                exc,
            )
        # Back-off between attempts (not synchronisation): bounded by the policy.
        await anyio.sleep(delay)
