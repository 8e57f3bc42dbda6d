"""muxgate.backends: model storage through fsspec, and model file formats.

Models are read by URL (``file://`` or a plain path, ``s3://``, ``gs://``,
``http(s)://``, ``memory://``, more through :func:`register_backend`), with
ids joined onto a storage root so that each names its own object, never
leaving the root, remote objects fetched with parallel ranged reads into a
disk cache shared by the replicas of a host, and weights loaded without
running pickled code unless the caller says ``trusted=True``.

When storage cannot be reached, the disk cache serves the version the
remote last confirmed (stale-if-error); inside a replica call, storage
gives up in time for the replica to answer before the request's deadline.
Every error is a :class:`BackendError` whose ``client_message`` names no
bucket, URL or path.
"""

from muxgate.backends._config import (
    CacheConfig,
    RetryPolicy,
    StorageConfig,
    configure_storage,
    get_storage_config,
)
from muxgate.backends._errors import (
    BackendError,
    InvalidModelIdError,
    MissingDependencyError,
    ModelFormatError,
    ModelNotFoundError,
    StorageAccessDeniedError,
    StorageUnavailableError,
    UnsafePickleError,
    UnsupportedProtocolError,
)
from muxgate.backends._fetch import Artifact, fetch
from muxgate.backends._formats import (
    UntrustedPickleWarning,
    load_exported_program,
    load_pickled_module,
    load_safetensors,
    load_state_dict,
    load_torchscript,
)
from muxgate.backends._registry import register_backend, registered_protocols
from muxgate.backends._urls import join_model_url, redact_url

__all__ = [
    "Artifact",
    "BackendError",
    "CacheConfig",
    "InvalidModelIdError",
    "MissingDependencyError",
    "ModelFormatError",
    "ModelNotFoundError",
    "RetryPolicy",
    "StorageAccessDeniedError",
    "StorageConfig",
    "StorageUnavailableError",
    "UnsafePickleError",
    "UnsupportedProtocolError",
    "UntrustedPickleWarning",
    "configure_storage",
    "fetch",
    "get_storage_config",
    "join_model_url",
    "load_exported_program",
    "load_pickled_module",
    "load_safetensors",
    "load_state_dict",
    "load_torchscript",
    "redact_url",
    "register_backend",
    "registered_protocols",
]
