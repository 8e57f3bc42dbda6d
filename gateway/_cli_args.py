"""argparse types of the ``muxgate`` command's options: a bad value is a
usage error naming the option and what it takes (exit 2), not a traceback
from ``bind()`` or ``logging`` once the gateway is half up."""

from __future__ import annotations

import argparse
import logging

__all__ = ["log_level_arg", "port_arg"]


def port_arg(text: str) -> int:
    """argparse type of a TCP port to listen on: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: 0..65535 (0: any free one)")
    return port


def log_level_arg(text: str) -> str:
    """argparse type of a log level name, any case; the upper-case name."""
    names = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if text.upper() not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: {', '.join(names)}")
    return text.upper()
