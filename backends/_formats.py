"""Model formats: state dicts, exported programs, TorchScript, safetensors
and (trusted) pickles.

Every loader is async: the fetch runs on the event loop with blocking I/O
in worker threads, and deserialisation runs in a worker thread. Files in
the disk cache (and private temp downloads) are memory-mapped where the
format allows, so tensors are paged in on use rather than copied; user
files on local disk are mapped only with ``mmap_local_files`` (see
:class:`~muxgate.backends.StorageConfig` for why).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from ._config import StorageConfig
from ._errors import ModelFormatError, ModelNotFoundError, UnsafePickleError
from ._fetch import Artifact, fetch_and_decode, translate_storage_error
from ._urls import join_model_url

T = TypeVar("T")

if TYPE_CHECKING:
    import torch

# torch is imported where a file is decoded, not at import time: the gateway
# imports muxgate.backends (errors, joins) and should not pay for torch.
MapLocation: TypeAlias = "str | torch.device | dict[str, str] | None"


# torch's weights_only unpickler names the global it refused in one of two
# messages (torch 2.13): "Unsupported global: GLOBAL os.getcwd was not an
# allowed global by default" and, for modules it never allows (os, posix,
# subprocess, ...), "Trying to load unsupported GLOBAL posix.system whose
# module posix is blocked". Matched case-insensitively so rewording the
# capitals does not turn a refused payload into a plain format error.
_REFUSED_GLOBAL = re.compile(
    r"unsupported\s+global:\s*global\s+(?P<allowed>[^\s`'\"]+)"
    r"|global\s+(?P<blocked>[^\s`'\"]+)\s+whose\s+module\s+\S+\s+is\s+blocked",
    re.IGNORECASE,
)

# What to do about a refused pickle, per format.
_TRUST_HINT = {
    "state_dict": (
        "if you trust its source, pass trusted=True (a pickled whole nn.Module then "
        "loads as its state dict) or use load_pickled_module"
    ),
    "pickled_module": "pass trusted=True only if you trust its source",
}


class UntrustedPickleWarning(UserWarning):
    """A pickle was loaded with ``trusted=True``: it can run any code."""


def _source(artifact: Artifact) -> str | io.BytesIO:
    if artifact.path is not None:
        return artifact.path
    assert artifact.data is not None
    return io.BytesIO(artifact.data)


def _mmap_ok(artifact: Artifact) -> bool:
    # torch can only mmap the zip format (torch.save's default since 1.6).
    return artifact.mmap_safe and artifact.path is not None and zipfile.is_zipfile(artifact.path)


def _refused_global(message: str) -> str | None:
    """The global named in a weights_only refusal message, or None."""
    match = _REFUSED_GLOBAL.search(message)
    if match is None:
        return None
    return (match.group("allowed") or match.group("blocked")).rstrip(".,;:")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


async def _load(
    url: str,
    model_id: str,
    fmt: str,
    decode: Callable[[Artifact], T],
    *,
    storage_options: Mapping[str, Any] | None,
    config: StorageConfig | None,
) -> T:
    try:
        return await fetch_and_decode(
            url,
            lambda artifact: _decode(artifact, fmt, decode),
            storage_options=storage_options,
            config=config,
        )
    except ModelNotFoundError as exc:
        # The id is the client's own: naming it tells nothing the URL would.
        exc.client_message = f"model {model_id!r} not found in storage"
        raise


def _decode(artifact: Artifact, fmt: str, decode: Callable[[Artifact], T]) -> T:
    try:
        return decode(artifact)
    except ModelFormatError:
        raise
    except pickle.UnpicklingError as exc:
        # torch's weights_only unpickler refuses globals outside its allow-list
        # before calling them: the payload never ran.
        refused = _refused_global(str(exc))
        if refused is None:
            raise ModelFormatError(artifact.url, fmt, "not a loadable torch file") from exc
        hint = _TRUST_HINT.get(fmt, "load it only if you trust its source")
        raise UnsafePickleError(
            artifact.url, fmt, f"it calls {refused}, which a safe load refuses; {hint}"
        ) from exc
    except (PermissionError, FileNotFoundError) as exc:
        # A local file (or a mapped one) that this process may not read, or
        # one removed between the fetch and the read, is what the fetch
        # would have said (access denied, not found), not a file in another
        # format.
        raise translate_storage_error(exc, artifact.url) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelFormatError(artifact.url, fmt, _reason(exc)) from exc
    except Exception as exc:  # safetensors raises its own SafetensorError
        if type(exc).__name__ == "SafetensorError":
            raise ModelFormatError(artifact.url, fmt, _reason(exc)) from exc
        raise


def _state_dict(map_location: MapLocation, trusted: bool, artifact: Artifact) -> dict[str, Any]:
    import torch

    obj = _unpickle(map_location, trusted, artifact)
    if trusted and isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise ModelFormatError(artifact.url, "state_dict", f"holds a {type(obj).__name__}")
    return dict(obj)


async def load_state_dict(
    root: str,
    model_id: str,
    filename: str = "model.pt",
    *,
    trusted: bool = False,
    map_location: MapLocation = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> dict[str, Any]:
    """Load a ``torch.save``d state dict from ``root/model_id/filename``.

    Uses ``torch.load(weights_only=True)``, so a file that would run code,
    including a pickled whole ``nn.Module``, is refused
    (:class:`UnsafePickleError`) without running it; cached files are
    memory-mapped.

    Args:
        root: Storage root URL or path, e.g. ``"s3://bucket/models"``.
        model_id: Model id; refused if it would leave ``root``.
        filename: File below the model's folder.
        trusted: Unpickle fully, as :func:`load_pickled_module` does (it can
            run any code in the file, so an :class:`UntrustedPickleWarning`
            is emitted); a pickled ``nn.Module`` is returned as its
            ``state_dict()``. Only for files you produced.
        map_location: As for ``torch.load``.
        storage_options: fsspec options for this call, over the configured ones.
        config: Storage configuration (default: the process-wide one).

    Raises:
        InvalidModelIdError: ``model_id`` or ``filename`` would leave ``root``.
        ModelNotFoundError: No such file.
        UnsafePickleError: The file needs code to load and ``trusted`` is false.
        ModelFormatError: Not a state dict (corrupt, truncated, other format).
        StorageUnavailableError: Storage kept failing transiently.
        StorageAccessDeniedError: Storage credentials missing or refused.
    """
    url = join_model_url(root, model_id, filename)
    return await _load(
        url,
        model_id,
        "state_dict",
        partial(_state_dict, map_location, trusted),
        storage_options=storage_options,
        config=config,
    )


def _torchscript(map_location: MapLocation, artifact: Artifact) -> torch.jit.ScriptModule:
    import torch

    loaded = torch.jit.load(  # type: ignore[no-untyped-call]
        _source(artifact), map_location=map_location
    )
    return loaded  # type: ignore[no-any-return]


async def load_torchscript(
    root: str,
    model_id: str,
    filename: str = "model.ts",
    *,
    map_location: MapLocation = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> torch.jit.ScriptModule:
    """Load a TorchScript module (``torch.jit.save``) from ``root/model_id/filename``.

    TorchScript archives hold code, but only TorchScript, which cannot call
    arbitrary Python. TorchScript is deprecated in torch 2.13 (``torch.jit``
    emits a ``DeprecationWarning``); prefer :func:`load_exported_program`
    for new models. Arguments and errors as for :func:`load_state_dict`.
    """
    url = join_model_url(root, model_id, filename)
    return await _load(
        url,
        model_id,
        "torchscript",
        partial(_torchscript, map_location),
        storage_options=storage_options,
        config=config,
    )


def _exported_program(trusted: bool, artifact: Artifact) -> torch.export.ExportedProgram:
    import torch

    if not trusted:
        # Checked before reading a byte: nothing in the file runs.
        raise UnsafePickleError(
            artifact.url,
            "exported_program",
            "torch.export.load unpickles parts of a .pt2 archive without "
            "weights_only (sample inputs, custom objects), so it can run code; "
            "pass trusted=True for files you produced",
        )
    warnings.warn(
        f"Loading the exported program {artifact.url} with trusted=True: torch.export.load "
        "unpickles parts of it, which can run arbitrary code; load only files you produced.",
        UntrustedPickleWarning,
        stacklevel=2,
    )
    return torch.export.load(_source(artifact))


async def load_exported_program(
    root: str,
    model_id: str,
    filename: str = "model.pt2",
    *,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> torch.export.ExportedProgram:
    """Load a ``torch.export.save``d program (``.pt2``) from ``root/model_id/filename``.

    The successor of TorchScript (deprecated in torch 2.13): call
    ``.module()`` on the result for a callable ``nn.Module``. Weights
    stay on the device they were exported on.

    ``torch.export.load`` falls back to full unpickling for some archive
    entries, so like :func:`load_pickled_module` it is refused
    (:class:`UnsafePickleError`, before anything is deserialised) unless
    ``trusted=True`` is passed, which also emits an
    :class:`UntrustedPickleWarning`. Other arguments and errors as for
    :func:`load_state_dict`.
    """
    url = join_model_url(root, model_id, filename)
    return await _load(
        url,
        model_id,
        "exported_program",
        partial(_exported_program, trusted),
        storage_options=storage_options,
        config=config,
    )


def _device(map_location: MapLocation) -> str:
    import torch

    if map_location is None:
        return "cpu"
    if isinstance(map_location, torch.device):
        return str(map_location)
    if isinstance(map_location, str):
        return map_location
    raise TypeError("safetensors needs a device, not a mapping, as map_location")


def _safetensors(map_location: MapLocation, artifact: Artifact) -> dict[str, torch.Tensor]:
    import safetensors.torch

    device = _device(map_location)
    if artifact.path is not None:
        # safe_open memory-maps the file.
        return safetensors.torch.load_file(artifact.path, device=device)
    assert artifact.data is not None
    tensors = safetensors.torch.load(artifact.data)
    return {name: t.to(device) for name, t in tensors.items()}


async def load_safetensors(
    root: str,
    model_id: str,
    filename: str = "model.safetensors",
    *,
    map_location: MapLocation = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file from ``root/model_id/filename`` as a state dict.

    ``map_location`` must name a device here. Arguments and errors as for
    :func:`load_state_dict`.
    """
    url = join_model_url(root, model_id, filename)
    return await _load(
        url,
        model_id,
        "safetensors",
        partial(_safetensors, map_location),
        storage_options=storage_options,
        config=config,
    )


def _unpickle(map_location: MapLocation, trusted: bool, artifact: Artifact) -> object:
    import torch

    if trusted:
        warnings.warn(
            f"Loading the pickle {artifact.url} with trusted=True: a pickle "
            "can run arbitrary code; load only files you produced.",
            UntrustedPickleWarning,
            stacklevel=2,
        )
    # Untrusted: weights_only=True, which refuses every global outside torch's
    # allow-list (extend it with torch.serialization.add_safe_globals).
    return torch.load(
        _source(artifact),
        map_location=map_location,
        weights_only=not trusted,
        mmap=_mmap_ok(artifact),
    )


def _pickled(map_location: MapLocation, trusted: bool, artifact: Artifact) -> torch.nn.Module:
    import torch

    obj = _unpickle(map_location, trusted, artifact)
    if not isinstance(obj, torch.nn.Module):
        raise ModelFormatError(artifact.url, "pickled_module", f"holds a {type(obj).__name__}")
    return obj


async def load_pickled_module(
    root: str,
    model_id: str,
    filename: str = "model.pt",
    *,
    trusted: bool = False,
    map_location: MapLocation = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> torch.nn.Module:
    """Load a whole ``torch.save(module)`` from ``root/model_id/filename``.

    Unpickling a module imports and calls whatever the file names, so it is
    refused (:class:`UnsafePickleError`, nothing runs) unless ``trusted=True``
    is passed, which also emits an :class:`UntrustedPickleWarning`. Classes
    allow-listed with ``torch.serialization.add_safe_globals`` load without it.
    Arguments and other errors as for :func:`load_state_dict`.
    """
    url = join_model_url(root, model_id, filename)
    return await _load(
        url,
        model_id,
        "pickled_module",
        partial(_pickled, map_location, trusted),
        storage_options=storage_options,
        config=config,
    )
