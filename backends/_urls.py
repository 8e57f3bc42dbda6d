"""URL helpers: safe joins of model ids onto roots, protocol split, redaction.

Pure but for one read of the protocol registry: how a backend reads a path
(:attr:`~muxgate.backends._registry.BackendSpec.url_paths`,
:attr:`~muxgate.backends._registry.BackendSpec.reserved`) decides how an id
is written into it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ._errors import InvalidModelIdError
from ._registry import find_backend_spec

# A leading "name:" followed by "/" or "\" is a URL or a Windows drive path.
_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[/\\]|^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def split_protocol(url: str) -> tuple[str, str]:
    """Split ``url`` into (protocol, rest); plain paths are ``file``.

    ``"s3://b/k"`` -> ``("s3", "b/k")``; ``"/srv/m"`` -> ``("file", "/srv/m")``;
    ``"file:///srv/m"`` -> ``("file", "/srv/m")``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return "file", url
    return scheme.lower(), rest


def redact_url(url: str) -> str:
    """Return ``url`` without user info (credentials) or query string.

    Query strings are dropped too: presigned URLs carry signatures there.
    """
    if split_protocol(url)[0] == "file":
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_segment(original: str, segment: str) -> None:
    if segment == "":
        raise InvalidModelIdError(original, "empty path segment")
    decoded = unquote(segment)
    if decoded in (".", "..") or segment in (".", ".."):
        raise InvalidModelIdError(original, "'.' and '..' segments are not allowed")
    if "/" in decoded or "\\" in decoded:
        raise InvalidModelIdError(original, "encoded or back slashes are not allowed")


def _check_part(part: str) -> list[str]:
    if not isinstance(part, str):
        raise InvalidModelIdError(repr(part), "must be a string")
    if part == "":
        raise InvalidModelIdError(part, "must not be empty")
    if _CONTROL.search(part):
        raise InvalidModelIdError(part, "control characters are not allowed")
    if "\\" in part:
        raise InvalidModelIdError(part, "backslashes are not allowed")
    if "://" in part or _SCHEME_LIKE.match(part):
        raise InvalidModelIdError(part, "URLs and drive paths are not allowed")
    if part.startswith("/"):
        raise InvalidModelIdError(part, "absolute paths are not allowed")
    if part.startswith("~"):
        raise InvalidModelIdError(part, "home-relative paths are not allowed")
    segments = part.split("/")
    for segment in segments:
        _check_segment(part, segment)
    return segments


def _check_reserved(part: str, protocol: str, reserved: Mapping[str, str]) -> None:
    for pattern, why in reserved.items():
        found = re.search(pattern, part)
        if found is not None:
            raise InvalidModelIdError(
                part, f"{found.group()!r} is not allowed on {protocol}:// storage: {why}"
            )


def join_model_url(root: str, model_id: str, *parts: str) -> str:
    """Join a model id and file parts onto a storage root, refusing escapes.

    The id may contain ``/`` (``"org/model"``), but every segment of the id
    and of each part must be non-empty and neither ``.`` nor ``..`` (also
    percent-encoded); absolute paths, URL schemes, drive letters,
    backslashes and control characters are refused. The root is trusted
    configuration and is used as given (a trailing ``/`` is optional).

    Every other character names the object literally: the result reads the
    object whose key (or file name) is exactly ``root/model_id/part``. For
    backends whose paths are URLs (``http://``, ``https://``) each segment
    is percent-encoded, so ``a?b`` is not the object ``a`` with a query
    string; where the filesystem reads part of a path as something other
    than a key and nothing escapes it (``?versionId=`` on ``s3://``, a
    ``?`` with a later ``&`` on ``gs://``), the id is refused instead.

    Args:
        root: Storage root, e.g. ``"s3://bucket/models"`` or ``"/srv/models"``.
        model_id: The multiplexed model id from the request.
        *parts: File name(s) below the model's folder, e.g. ``"model.pt"``.

    Returns:
        ``root/model_id/part...``

    Raises:
        InvalidModelIdError: (a ``ValueError``) if any piece would leave the root.
    """
    protocol = split_protocol(root)[0]
    spec = find_backend_spec(protocol)
    segments: list[str] = []
    for part in (model_id, *parts):
        segments.extend(_check_part(part))
        if spec is not None:
            _check_reserved(part, protocol, spec.reserved)
    if spec is not None and spec.url_paths:
        segments = [quote(segment, safe="") for segment in segments]
    base = root.rstrip("/")
    if base == "" or base.endswith(":/") or base.endswith(":"):
        # "s3://", "file:///" or "/": keep the separator(s) of the scheme.
        base = root if root.endswith("/") else root + "/"
        return base + "/".join(segments)
    return base + "/" + "/".join(segments)
