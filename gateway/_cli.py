"""The ``muxgate`` command.

``muxgate serve app.yaml``   gateway + local replicas in the foreground
``muxgate check app.yaml``   validate the config, import every class; every problem at once
``muxgate status [URL]``     the running gateway's replicas and models, for a terminal
``muxgate demo``             a self-contained tour
``muxgate replica app.yaml --deployment NAME --listen tcp:HOST:PORT --name SLOT``
                             one replica as a standalone server (``_replica_cmd``)
``muxgate --version``

``muxgate`` alone prints this help.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import cast

from muxgate.gateway._cli_args import log_level_arg, port_arg

__all__ = ["main"]

#: where ``muxgate status`` looks without a URL (``http:`` of the default config)
DEFAULT_URL = "http://127.0.0.1:8000"
#: environment variable with the admin token for ``muxgate status``
TOKEN_ENV = "MUXGATE_ADMIN_TOKEN"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("muxgate")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxgate", description="Serve many models from a small pool of replicas."
    )
    parser.add_argument("--version", action="version", version=f"muxgate {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the gateway and its replicas in the foreground",
        description="Run the gateway and its replicas in the foreground until Ctrl-C or"
        " SIGTERM (requests in flight get a grace period; a second signal stops at once)."
        " The status page is at /-/ of the URL it prints.",
    )
    serve.add_argument("config", help="application config (app.yaml, or .toml)")
    serve.add_argument("--host", default=None, help="override http.host")
    serve.add_argument("--port", type=port_arg, default=None, help="override http.port (0: any)")
    serve.add_argument(
        "--log-level",
        type=log_level_arg,
        default="INFO",
        help="log level of the gateway and its replicas (default INFO)",
    )
    check = sub.add_parser(
        "check",
        help="validate a config and import every deployment's class (in a separate process)",
        description="Validate the config as `serve` would and import every deployment's class"
        " in a separate process; print every problem found; exit 1 if there is any.",
    )
    check.add_argument("config", help="application config (app.yaml, or .toml)")
    status = sub.add_parser(
        "status",
        help="show a running gateway's replicas and their models",
        description="Show GET URL/-/replicas as text: replicas, their state and models (least"
        " recently used first), start failures.",
    )
    status.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        help=f"the gateway: a URL, HOST:PORT or a local PORT (default {DEFAULT_URL})",
    )
    status.add_argument("--token", default=None, help=f"admin bearer token (default: ${TOKEN_ENV})")
    sub.add_parser("demo", help="make demo models, serve them, drive traffic, print a summary")
    from muxgate.gateway import _replica_cmd

    _replica_cmd.add_parser(sub)
    return parser


def _serve(config_path: str, host: str | None, port: int | None, log_level: str) -> int:
    # Imported here: `muxgate --help` must not pay for the gateway's imports.
    from muxgate.gateway._check import ImportTarget, import_classes
    from muxgate.gateway._config import load_config
    from muxgate.gateway._errors import ConfigError
    from muxgate.gateway._serve import run

    logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s - %(message)s")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"muxgate: invalid config {exc}", file=sys.stderr)
        return 2
    # Deployments that start replicas are checked by them (a failed start
    # stops `serve`); those that start none are imported here, in a child.
    idle = [
        ImportTarget(d.name, d.import_path, config.app_dir, tuple(d.init_kwargs))
        for d in config.deployments
        if d.initial_replicas == 0
    ]
    failed = {name: p for name, p in import_classes(idle).items() if p is not None}
    for name, problem in failed.items():
        print(f"muxgate: deployment {name!r} cannot start: {problem}", file=sys.stderr)
    if failed:
        return 1
    code: int = run(config, host=host, port=port, replica_log_level=log_level)
    return code


def _check(config_path: str) -> int:
    from muxgate.gateway._check import check_config_file

    report = check_config_file(config_path)
    for problem in report.problems:
        print(f"error: {problem}")
    for name in report.imported:
        print(f"ok: deployment {name!r} imports")
    if report.problems:
        count = len(report.problems)
        print(f"{config_path}: {count} problem{'s' if count > 1 else ''}")
        return 1
    print(f"{config_path}: ok")
    return 0


def _status(url: str, token: str | None) -> int:
    from muxgate.gateway._status_view import StatusError, base_url, fetch, render

    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    url = base_url(url)
    try:
        snapshot = fetch(url, token)
    except StatusError as exc:
        print(f"muxgate: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(snapshot, url))
    return 0


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
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command took its signals (reading the config,
        # importing the gateway): a line, not a traceback of whatever
        # module was being imported. 130: killed by SIGINT, as shells say.
        print("muxgate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output went away (`muxgate status | head`): stop
        # quietly. stdout goes to /dev/null so that the flush at exit does
        # not fail again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:
        # The demo parses its own options (argparse's REMAINDER would stop
        # at the first "--option" and reject it).
        return _demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.host, args.port, args.log_level)
    if args.command == "check":
        return _check(args.config)
    if args.command == "status":
        return _status(args.url, args.token)
    if args.command == "replica":
        from muxgate.gateway._replica_cmd import run as run_replica

        return run_replica(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
