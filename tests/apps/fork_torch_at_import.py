"""A deployment module that runs a parallel-sized torch op when imported:
preloaded into the fork server, it must not leave an OpenMP pool behind
(forking with one is unsafe), and children still get their own budget
(tests/integration/test_cpu_budget.py)."""

from __future__ import annotations

import torch
from fork_apps import CpuFacts

AT_IMPORT = float((torch.ones(512, 512) @ torch.ones(512, 512)).sum())


class ImportTimeTorch(CpuFacts):
    """CpuFacts from a module that used torch at import."""
