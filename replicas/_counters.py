"""The counters a replica reports in ``Pong`` and ``Drained``: their keys and
the buckets of the model load duration histogram, which the replica's caches
count into and the gateway merges into its metrics.

Every counter is cumulative over the replica process's life, except the
``models_loaded`` gauge.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BUSY_SECONDS_KEY",
    "CACHE_COUNTER_KEYS",
    "CALLS_FINISHED_KEY",
    "CALL_COUNTER_KEYS",
    "MODELS_LOADED_KEY",
    "MODEL_LOAD_BUCKETS",
    "REPLICA_COUNTER_KEYS",
    "STORAGE_COUNTER_KEYS",
    "UNLOAD_REASONS",
    "load_bucket_key",
]

#: Upper bounds (s) of the model load duration histogram: a small local
#: state dict loads in ~10 ms, a large remote one in minutes.
MODEL_LOAD_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


def load_bucket_key(bound: float) -> str:
    """Counter key of the histogram bucket ``le=bound`` (loads that took at most ``bound`` s)."""
    return f"model_load_seconds_le_{bound:g}"


#: Why a model was unloaded, each counted as ``model_unloads_<reason>``:
#: evicted by the cache's policy, the replica's shutdown or drain, an
#: operator's unload (``ModelControl`` ``unload``, the admin API). A gateway
#: reads a reason a replica does not report as 0.
UNLOAD_REASONS: Final[tuple[str, ...]] = ("lru", "shutdown", "drain", "admin")

#: The model caches' cumulative counter keys. The buckets are cumulative like
#: Prometheus buckets; the ``+Inf`` bucket is ``model_loads``.
CACHE_COUNTER_KEYS: Final[tuple[str, ...]] = (
    "model_loads",
    "model_load_failures",
    *(f"model_unloads_{reason}" for reason in UNLOAD_REASONS),
    "cache_hits",
    "cache_misses",
    "model_load_seconds_sum",
    *(load_bucket_key(bound) for bound in MODEL_LOAD_BUCKETS),
    # Appended: the gateway reads a key an older replica does not report as 0.
    "model_load_cpu_seconds_sum",
    # calls with a loaded model that waited out a load step (hits_wait_for_loads), and how long
    "load_step_waits",
    "load_step_wait_seconds_sum",
    # failed loads whose id the storage refused (bad_model_id: the client's mistake)
    "model_load_refused_ids",
    # failed loads of an id the storage does not have (model_not_found: mostly clients' typos)
    "model_load_not_found",
)

#: Counted by muxgate.backends when a replica imported it: fetches answered
#: from the disk cache while storage was unreachable.
STORAGE_COUNTER_KEYS: Final[tuple[str, ...]] = ("storage_stale_serves",)

#: Calls the replica finished (answered, failed or cancelled).
CALLS_FINISHED_KEY: Final = "calls_finished"
#: Wall seconds with at least one call in flight. Between two reports,
#: busy seconds over calls finished is the interval between two calls
#: finishing while the replica is busy: the service time the gateways'
#: spill price uses (``muxgate.gateway._spill``), the same for every gateway.
BUSY_SECONDS_KEY: Final = "busy_seconds"
#: Counted by the replica server around its calls.
CALL_COUNTER_KEYS: Final[tuple[str, ...]] = (CALLS_FINISHED_KEY, BUSY_SECONDS_KEY)

#: Every cumulative counter key a replica reports, in report order.
REPLICA_COUNTER_KEYS: Final[tuple[str, ...]] = (
    CACHE_COUNTER_KEYS + STORAGE_COUNTER_KEYS + CALL_COUNTER_KEYS
)

#: The one gauge among the counters: models loaded in the process now.
MODELS_LOADED_KEY: Final = "models_loaded"
