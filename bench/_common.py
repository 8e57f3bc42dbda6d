"""Helpers shared by the bench scripts: machine description and percentiles.

Each script is run as ``.venv/bin/python bench/NAME.py``, so this folder is
``sys.path[0]`` and the scripts import this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Sequence


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_line(extra: str = "") -> str:
    """``machine: nproc=.. cpu='..' python=..`` plus ``extra`` (e.g. library versions)."""
    line = f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()}"
    return f"{line} {extra}" if extra else line


def command_line() -> str:
    """``command: ..``: this process's command line, the interpreter relative to the cwd."""
    return f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}"


def print_machine() -> None:
    """Print the machine and the command, as every bench table states them."""
    print(machine_line())
    print(command_line())


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of ``values``, sorted or not."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
