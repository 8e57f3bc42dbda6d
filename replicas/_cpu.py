"""A replica's CPU budget (``num_cpus``) applied to its process.

Each replica gets ``ceil(num_cpus)`` threads: torch's intra-op and inter-op
pools, and ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` in its environment (for libraries loaded later and
for its subprocesses). Left alone, every replica would start as many intra-op
threads as the machine has cores, and replicas on one host would fight over
them (docs/benchmarks.md, "Peer benchmark", measures the cost).

Where it happens (``muxgate.replicas._server.run_replica``, shared by spawned
and forked replicas), in the replica's main thread, which is the thread that
runs the deployment's async code:

1. before the deployment's module is imported: the environment, and torch's
   intra-op threads when torch is already imported (a forked replica);
2. after the import, before ``__init__``: the budget again (the class's
   ``@deployment(num_cpus=...)`` is known now when the config was silent)
   and torch's inter-op threads, which torch lets a process set only once
   and only before any inter-op work.

A spawned replica also gets the variables from its launcher, so libraries
that read them once when loaded (OpenMP, OpenBLAS) see them from the start.
The fork server runs with one thread everywhere and never starts an OpenMP
or inter-op pool, so each child can still size its own
(``muxgate.replicas._forkserver``).
"""

from __future__ import annotations

import logging
import math
import os
import sys

__all__ = ["CPU_ENV_VARS", "apply_cpu_budget", "cpu_budget_env", "thread_count_for"]

_log = logging.getLogger("muxgate.replica")

#: Thread-count variables of OpenMP, MKL and OpenBLAS.
CPU_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_interop_set: int | None = None


def thread_count_for(num_cpus: float) -> int:
    """Threads for a budget: ``num_cpus`` rounded up, at least 1."""
    return max(1, math.ceil(num_cpus))


def cpu_budget_env(num_cpus: float) -> dict[str, str]:
    """The environment variables a replica with this budget runs with."""
    threads = str(thread_count_for(num_cpus))
    return dict.fromkeys(CPU_ENV_VARS, threads)


def apply_cpu_budget(num_cpus: float, *, interop: bool) -> int:
    """Size this process's thread pools for ``num_cpus``; the thread count.

    Sets the environment variables, and torch's intra-op threads when torch
    is imported (this function never imports it). With ``interop``, also
    torch's inter-op threads, at most once per process: torch refuses a
    second call, or one after inter-op work has started (logged, not
    raised: the replica still serves, with torch's inter-op default).
    Call it from the thread that runs the deployment's event loop: torch's
    OpenMP setting is per thread for threads that already ran a parallel op.
    """
    global _interop_set
    threads = thread_count_for(num_cpus)
    os.environ.update(cpu_budget_env(num_cpus))
    torch = sys.modules.get("torch")
    if torch is None:
        return threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if interop and _interop_set is None:
        _interop_set = threads
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:
            _log.warning(
                "num_cpus=%g: torch's inter-op threads stay at %d (%s).",
                num_cpus,
                torch.get_num_interop_threads(),
                " ".join(str(exc).split()),
            )
    return threads
