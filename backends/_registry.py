"""Protocol registry: protocol -> fsspec filesystem class, imported lazily.

Adding a protocol is one :func:`register_backend` call; nothing in the
package branches on URL prefixes. The class is imported on first use so a
missing optional package only matters to the URLs that need it, and then
with an actionable message ("Install s3fs to access s3:// URLs").
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fsspec import AbstractFileSystem

from ._errors import MissingDependencyError, UnsupportedProtocolError


@dataclass(frozen=True)
class BackendSpec:
    """How to reach one protocol.

    Attributes:
        class_path: Dotted path of the fsspec filesystem class,
            ``"package.module.Class"``.
        package: Pip package to suggest when the import fails.
        remote: Whether objects live on another host; remote protocols go
            through the disk cache and ranged parallel downloads by default.
        default_options: Storage options applied under the configured ones.
        url_paths: The filesystem's paths are URLs sent to a server as they
            are (fsspec's HTTP filesystem): :func:`~muxgate.backends.join_model_url`
            percent-encodes each piece of a model id, so ``?``, ``#`` and
            ``%`` are part of the object's name, not a query string, a
            fragment or an escape.
        reserved: Regular expressions for what the filesystem reads as
            something other than a key, which nothing escapes, each mapped
            to why; a model id in which one matches is refused, naming the
            text it matched.
    """

    class_path: str
    package: str = ""
    remote: bool = True
    default_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    url_paths: bool = False
    reserved: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# botocore and s3fs retry on their own with long sleeps; muxgate retries
# (bounded, see RetryPolicy), so the inner layers make one attempt each
# (botocore here, s3fs in muxgate.backends._s3).
_S3_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "config_kwargs": {
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 60,
        },
    }
)

# s3fs splits a path at its first "?versionId=" whatever comes before or
# after it (the key ends there), so "a?versionId=x/model.pt" would read the
# object "a". Nothing escapes it; other characters reach S3 as the key.
_S3_RESERVED: Mapping[str, str] = MappingProxyType(
    {
        re.escape("?versionId="): "s3fs reads it as an object version and ends the key before it",
    }
)
# gcsfs with version_aware=True reads what follows a "?" as a query string
# and a generation= in it (percent-encoded too) as an object version, ending
# the key at the "?". Only a value ended by "&" can be a whole number (the
# file name follows the id), so a "?" with a later "&" is refused, whatever
# version_aware is: an id means the same object under every configuration.
_GCS_RESERVED: Mapping[str, str] = MappingProxyType(
    {
        r"\?.*&": (
            "with version_aware, gcsfs reads what follows '?' as a query string "
            "whose generation= selects an object version, and ends the key at '?'"
        ),
    }
)

# adlfs splits a path at its first "?versionid=" (its split_path), always
# ending the key there and reading the rest as a blob version when the
# filesystem is version_aware: "a?versionid=1/model.pt" would read the blob
# "a". Other "?" and "#" reach Azure as part of the blob name.
_AZURE_RESERVED: Mapping[str, str] = MappingProxyType(
    {
        re.escape("?versionid="): (
            "adlfs reads it as an object version and ends the blob name before it"
        ),
    }
)
# huggingface_hub's HfFileSystem reads "@" after the first two segments of a
# path (the repository id) as the start of a revision ("org/repo@v1/f");
# deeper in the path it is literal. Where the root names less than a
# repository ("hf://org"), the id's first segment is the repository, and an
# "@" there would pick a revision instead of a folder: the id is refused,
# whatever the root, so that it names the same object under every root.
_HF_RESERVED: Mapping[str, str] = MappingProxyType(
    {
        "@": (
            "huggingface_hub reads it after a repository id as a revision "
            "(an object version), not as part of a path"
        ),
    }
)

_BUILTIN: dict[str, BackendSpec] = {
    "file": BackendSpec("fsspec.implementations.local.LocalFileSystem", "fsspec", remote=False),
    "local": BackendSpec("fsspec.implementations.local.LocalFileSystem", "fsspec", remote=False),
    "memory": BackendSpec("fsspec.implementations.memory.MemoryFileSystem", "fsspec", remote=False),
    "s3": BackendSpec(
        "muxgate.backends._s3.S3FileSystem",
        "s3fs",
        default_options=_S3_DEFAULTS,
        reserved=_S3_RESERVED,
    ),
    "s3a": BackendSpec(
        "muxgate.backends._s3.S3FileSystem",
        "s3fs",
        default_options=_S3_DEFAULTS,
        reserved=_S3_RESERVED,
    ),
    # One attempt per request; see muxgate.backends._gcs.
    "gs": BackendSpec("muxgate.backends._gcs.GCSFileSystem", "gcsfs", reserved=_GCS_RESERVED),
    "gcs": BackendSpec("muxgate.backends._gcs.GCSFileSystem", "gcsfs", reserved=_GCS_RESERVED),
    "http": BackendSpec("fsspec.implementations.http.HTTPFileSystem", "aiohttp", url_paths=True),
    "https": BackendSpec("fsspec.implementations.http.HTTPFileSystem", "aiohttp", url_paths=True),
    "az": BackendSpec("adlfs.AzureBlobFileSystem", "adlfs", reserved=_AZURE_RESERVED),
    "abfs": BackendSpec("adlfs.AzureBlobFileSystem", "adlfs", reserved=_AZURE_RESERVED),
    "hf": BackendSpec("huggingface_hub.HfFileSystem", "huggingface_hub", reserved=_HF_RESERVED),
}

_lock = threading.Lock()
_registry: dict[str, BackendSpec] = dict(_BUILTIN)
_classes: dict[str, type[AbstractFileSystem]] = {}


def register_backend(
    protocol: str,
    class_path: str,
    *,
    package: str = "",
    remote: bool = True,
    default_options: Mapping[str, Any] | None = None,
    url_paths: bool = False,
    reserved: Mapping[str, str] | None = None,
    clobber: bool = False,
) -> None:
    """Register (or with ``clobber=True`` replace) the filesystem for a protocol.

    Args:
        protocol: URL scheme without ``://``, e.g. ``"oss"``.
        class_path: Dotted path of an fsspec ``AbstractFileSystem`` subclass.
        package: Package name for the "Install ..." hint (default: first
            component of ``class_path``).
        remote: Use the disk cache and ranged downloads by default.
        default_options: Storage options applied under configured ones.
        url_paths: Paths are URLs sent as they are: percent-encode model ids.
        reserved: Regular expressions for what the filesystem does not read
            as part of a key (mapped to why): ids in which one matches are
            refused.
        clobber: Allow replacing an existing registration.

    Raises:
        ValueError: If the protocol is registered and ``clobber`` is false.
    """
    protocol = protocol.lower()
    spec = BackendSpec(
        class_path,
        package or class_path.split(".", 1)[0],
        remote=remote,
        default_options=MappingProxyType(dict(default_options or {})),
        url_paths=url_paths,
        reserved=MappingProxyType(dict(reserved or {})),
    )
    with _lock:
        if protocol in _registry and not clobber:
            raise ValueError(f"a backend for {protocol}:// is already registered")
        _registry[protocol] = spec
        _classes.pop(protocol, None)


def registered_protocols() -> list[str]:
    """Protocols with a registered backend, sorted."""
    with _lock:
        return sorted(_registry)


def find_backend_spec(protocol: str) -> BackendSpec | None:
    """The registration for ``protocol``, or None when there is none."""
    with _lock:
        return _registry.get(protocol)


def backend_spec(protocol: str, *, url: str = "") -> BackendSpec:
    """Return the registration for ``protocol``.

    Raises:
        UnsupportedProtocolError: If nothing is registered for it.
    """
    spec = find_backend_spec(protocol)
    if spec is None:
        raise UnsupportedProtocolError(protocol, url=url)
    return spec


def filesystem_class(protocol: str, *, url: str = "") -> type[AbstractFileSystem]:
    """Import (once) and return the filesystem class for ``protocol``.

    Raises:
        UnsupportedProtocolError: If nothing is registered for it.
        MissingDependencyError: If its package cannot be imported.
    """
    with _lock:
        cls = _classes.get(protocol)
    if cls is not None:
        return cls
    spec = backend_spec(protocol, url=url)
    module_name, _, class_name = spec.class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependencyError(protocol, spec.package, url=url) from exc
    loaded = getattr(module, class_name, None)
    if not (isinstance(loaded, type) and issubclass(loaded, AbstractFileSystem)):
        raise MissingDependencyError(protocol, spec.package, url=url)
    with _lock:
        _classes[protocol] = loaded
    return loaded
