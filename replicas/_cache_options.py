"""What a model cache is configured with and how it fails: the defaults and
checks of its options (shared by :func:`~muxgate.replicas.multiplexed` and
:class:`~muxgate.replicas._cache.ModelCache`) and its two errors."""

from __future__ import annotations

from typing import Final, Literal

from muxgate.replicas._http import empty_model_id_error

__all__ = [
    "DEFAULT_LOAD_ORDER",
    "DEFAULT_MAX_CONCURRENT_LOADS",
    "LOAD_ORDERS",
    "LoadOrder",
    "ModelCacheClosedError",
    "ModelTooLargeError",
    "check_limit",
    "check_load_order",
    "check_model_id",
]

DEFAULT_MAX_CONCURRENT_LOADS = 4

LoadOrder = Literal["evict_after", "evict_first"]
LOAD_ORDERS: Final[tuple[LoadOrder, ...]] = ("evict_after", "evict_first")
DEFAULT_LOAD_ORDER: Final[LoadOrder] = "evict_after"


class ModelCacheClosedError(RuntimeError):
    """The cache was closed (replica shutdown or drain) while a model was loading."""


class ModelTooLargeError(Exception):
    """A model measured more bytes than its cache's byte budget can ever hold.

    It was not cached (its unload hook ran); the cache's other models are untouched.

    Attributes:
        model_id: the model.
        nbytes: what it measured.
        max_bytes: the budget (``max_bytes_per_replica``).
    """

    def __init__(self, message: str, *, model_id: str, nbytes: int, max_bytes: int) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.nbytes = nbytes
        self.max_bytes = max_bytes


def check_limit(name: str, value: object, *, allow_unlimited: bool) -> None:
    if type(value) is not int:  # bool is an int subclass, and is refused too
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if allow_unlimited and (value == 0 or value < -1):
        raise ValueError(f"{name} must be -1 (no limit) or at least 1, got {value}.")
    if not allow_unlimited and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")


def check_model_id(model_id: object) -> None:
    if type(model_id) is not str:
        called = getattr(model_id, "__name__", "") == "get_multiplexed_model_id"
        hint = " (call it: get_multiplexed_model_id())" if called else ""
        raise TypeError(f"The model ID must be a str, got {type(model_id).__name__}{hint}.")
    if not model_id:
        raise empty_model_id_error()


def check_load_order(load_order: object) -> None:
    if load_order not in LOAD_ORDERS:
        raise ValueError(f"load_order must be 'evict_after' or 'evict_first', got {load_order!r}.")
