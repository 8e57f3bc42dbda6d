"""How many bytes a loaded model holds, for the byte budget of a model cache
(``max_bytes_per_replica``).

Measured once, right after the model is built, in this order:

1. the ``sizeof`` function given to ``@multiplexed(sizeof=...)``;
2. the model's own ``__muxgate_nbytes__()`` method (for objects that are
   not tensors: a tokenizer plus a module, an ONNX session, a wrapper);
3. a ``torch.nn.Module``: its parameters and buffers; a mapping (a state
   dict) or a list/tuple: the tensors in it, one level deep plus nested
   mappings; a single tensor: itself.

Tensors are counted by their storage, once each, whatever device they are on
(CUDA memory counts as much as host memory): tied weights, views and a state
dict that shares storage with a module are not counted twice. Anything else
measures 0 bytes (it is then bounded only by the model count).

torch is looked up, never imported here: a deployment without torch pays
nothing, and an object cannot hold tensors unless torch was imported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from muxgate.replicas._logging import describe_exception

__all__ = ["NBYTES_HOOK", "model_nbytes", "release_device_memory"]

_log = logging.getLogger("muxgate.replicas")

#: the method a model may define to report its own size in bytes
NBYTES_HOOK = "__muxgate_nbytes__"


def model_nbytes(model: object, sizeof: Callable[[Any], int] | None = None) -> int:
    """Bytes held by ``model`` (see the module docstring for the rules).

    Raises:
        TypeError: ``sizeof`` or the model's hook returned something other than
            a non-negative int, or raised ``SystemExit``/``KeyboardInterrupt``
            (which, raised as they are, would stop the replica's event loop).
    """
    if sizeof is not None:
        return _checked(_call(sizeof, model, "sizeof"), "sizeof")
    hook = getattr(type(model), NBYTES_HOOK, None)
    if callable(hook):
        return _checked(_call(hook, model, NBYTES_HOOK), NBYTES_HOOK)
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    return _tensor_bytes(_tensors(model, torch), torch)


def _call(measure: Callable[[Any], object], model: object, source: str) -> object:
    try:
        return measure(model)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise TypeError(f"{source} raised {describe_exception(exc)}.") from exc


def _checked(value: object, source: str) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"{source} must return a non-negative int of bytes, got {value!r}.")
    return value


def _tensors(model: object, torch: Any) -> Iterable[Any]:
    if isinstance(model, torch.Tensor):
        yield model
    elif isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()
    elif isinstance(model, Mapping):
        for value in model.values():
            if isinstance(value, torch.Tensor | torch.nn.Module | Mapping):
                yield from _tensors(value, torch)
    elif isinstance(model, list | tuple):
        for value in model:
            if isinstance(value, torch.Tensor | torch.nn.Module):
                yield from _tensors(value, torch)


def _tensor_bytes(tensors: Iterable[Any], torch: Any) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor.is_meta:
            continue  # no memory behind it
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            total += tensor.element_size() * tensor.nelement()
            continue
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def release_device_memory() -> None:
    """Hand cached CUDA blocks back to the driver after an unload.

    PyTorch keeps freed device memory in its caching allocator; without this
    an unloaded model's memory stays reserved by the process (free for torch,
    not for anyone else). Does nothing unless torch already initialised CUDA.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return
    try:
        cuda.empty_cache()
    except RuntimeError:
        _log.warning("Releasing CUDA memory after an unload failed.", exc_info=True)
