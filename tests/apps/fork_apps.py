"""Deployments for the fork server tests (``fork_apps:Class`` with
``tests/apps`` as the app dir)."""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import torch

from muxgate.replicas import deployment
from muxgate.replicas._http import Request


class TorchOps:
    """Runs real torch ops in the replica (a forked child of the fork server)."""

    def __init__(self, threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        # A parallel op during __init__ (a worker thread of the replica).
        self.ready = float(torch.ones(256, 256).matmul(torch.ones(256, 256)).sum())

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"pid": os.getpid(), "path": request.path, "ready": self.ready}

    def matmul(self, n: int, threads: int = 0) -> dict[str, Any]:
        """A matmul large enough for torch's intra-op thread pool; sync, so
        it runs in one of the replica's worker threads."""
        if threads:
            torch.set_num_threads(threads)
        a = torch.ones(n, n)
        total = float((a @ a).sum())
        return {"sum": total, "threads": torch.get_num_threads()}

    def facts(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "random": random.random(),
            "threads": threading.active_count(),
            "stdin_is_devnull": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
        }


class CpuFacts:
    """Reports the thread pools and variables its replica runs with."""

    def facts(self) -> dict[str, Any]:
        """Seen from a worker thread (where sync user code runs)."""
        return _cpu_facts()

    async def loop_facts(self) -> dict[str, Any]:
        """Seen from the event loop's thread (where async user code runs)."""
        return _cpu_facts()


@deployment(num_cpus=2)
class CpuFactsTwo(CpuFacts):
    """Asks for two CPUs in its decorator."""


def _cpu_facts() -> dict[str, Any]:
    a = torch.ones(384, 384)
    return {
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
        "sum": float((a @ a).sum()),
    }
