"""The ``muxgate`` command: ``muxgate serve app.yaml``, ``muxgate demo``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import cast

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxgate", description="Serve many models from a small pool of replicas."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway and its replicas in the foreground")
    serve.add_argument("config", help="application config (app.yaml, or .toml)")
    serve.add_argument("--host", default=None, help="override http.host")
    serve.add_argument("--port", type=int, default=None, help="override http.port (0: any)")
    serve.add_argument("--log-level", default="INFO", help="gateway log level (default INFO)")
    demo = sub.add_parser(
        "demo", help="make demo models, serve them, drive traffic, print a summary"
    )
    demo.add_argument("args", nargs=argparse.REMAINDER, help="passed to the demo")
    return parser


def _serve(config_path: str, host: str | None, port: int | None, log_level: str) -> int:
    # Imported here: `muxgate --help` must not pay for the gateway's imports.
    from muxgate.gateway._config import load_config
    from muxgate.gateway._errors import ConfigError
    from muxgate.gateway._serve import run

    logging.basicConfig(
        level=log_level.upper(), format="%(levelname)s %(asctime)s %(name)s - %(message)s"
    )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"muxgate: invalid config {exc}", file=sys.stderr)
        return 2
    code: int = run(config, host=host, port=port)
    return code


def _demo(args: list[str]) -> int:
    try:
        module = importlib.import_module("muxgate.gateway._demo")
    except ModuleNotFoundError as exc:
        if exc.name != "muxgate.gateway._demo":
            raise
        print(
            "muxgate: the demo is not part of this build yet (muxgate.gateway._demo is missing)",
            file=sys.stderr,
        )
        return 2
    demo_main = cast(Callable[[list[str]], int | None], module.main)
    return int(demo_main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``muxgate`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        # The demo parses its own options (argparse's REMAINDER would stop
        # at the first "--option" and reject it).
        return _demo(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.host, args.port, args.log_level)
    return _demo(list(args.args))


if __name__ == "__main__":
    sys.exit(main())
