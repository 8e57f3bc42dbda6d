"""The ``muxgate`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("muxgate: not implemented yet", file=sys.stderr)
    return 2
