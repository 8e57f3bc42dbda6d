"""``muxgate replica CONFIG --deployment NAME --listen tcp:HOST:PORT --name SLOT``.

Runs one replica of a deployment as a standalone server: the container
command of a pod, a systemd unit, or what a launcher starts. The config is
read and validated here, the replica's spec built as ``muxgate serve`` builds
it (``make_spec``), and then this process *becomes* the replica
(``exec`` of ``python -m muxgate.replicas._server``): the pid a supervisor
signals is the replica's, and no gateway code stays around user code. The
spec goes through an unlinked temporary file's descriptor, not the command
line, since it may hold the admin token.

The replica's identity (the name the gateways' rings hash) is ``SLOT``,
which must stay the same across restarts (a pod ordinal, a unit instance):
a replica restarted under its name gets its models routed back to it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import msgspec

__all__ = ["SLOT_PATTERN", "add_parser", "run"]

#: What a slot name may look like (it names the replica in logs, metrics and URLs).
SLOT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.#:-]{0,127}$"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``replica`` subcommand to ``muxgate``'s subparsers."""
    replica = sub.add_parser(
        "replica",
        help="run one replica of a deployment as a standalone TCP server",
        description="Run one replica of a deployment from the app config, listening on"
        " tcp:HOST:PORT, for gateways elsewhere to connect to. It prints `READY tcp:HOST:PORT`"
        " (or `FAILED reason`) on stdout once it serves; SIGTERM finishes in-flight calls,"
        " unloads the models and exits.",
    )
    replica.add_argument("config", help="application config (app.yaml, or .toml)")
    replica.add_argument("--deployment", required=True, help="name of the deployment to serve")
    replica.add_argument(
        "--listen",
        required=True,
        help="tcp:HOST:PORT (port 0: any free port); a non-loopback host needs the cluster"
        " secret or mutual TLS",
    )
    replica.add_argument(
        "--name",
        required=True,
        help="the replica's stable identity (e.g. a pod name), kept across restarts",
    )
    replica.add_argument(
        "--gateway-url", default=None, help="base URL of a gateway, for deployment handles"
    )
    from muxgate.gateway._cli_args import log_level_arg

    replica.add_argument(
        "--log-level", type=log_level_arg, default="INFO", help="replica log level (default INFO)"
    )


def run(args: argparse.Namespace) -> int:
    """Validate, build the spec and exec the replica; returns only on an error."""
    from muxgate.gateway._config import load_config
    from muxgate.gateway._errors import ConfigError
    from muxgate.gateway._serve import make_spec

    problem = _check_arguments(args.listen, args.name)
    if problem:
        print(f"muxgate replica: {problem}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"muxgate: invalid config {exc}", file=sys.stderr)
        return 2
    try:
        deployment = config.deployment(args.deployment)
    except KeyError:
        names = ", ".join(d.name for d in config.deployments)
        print(
            f"muxgate replica: no deployment {args.deployment!r} in {args.config} (it has {names})",
            file=sys.stderr,
        )
        return 2
    spec = msgspec.structs.replace(
        make_spec(config, deployment, args.name, args.gateway_url, args.log_level.upper()),
        listen=args.listen,
        standalone=True,
        channel=config.cluster,
    )
    spec_file = tempfile.TemporaryFile()  # noqa: SIM115 - handed over to the exec'd process
    spec_file.write(msgspec.json.encode(spec))
    spec_file.seek(0)
    fd = spec_file.fileno()
    os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    python = sys.executable
    os.execv(python, [python, "-m", "muxgate.replicas._server", "--spec-fd", str(fd)])


def _check_arguments(listen: str, name: str) -> str | None:
    """What is wrong with ``--listen`` or ``--name``; None when both are fine."""
    scheme, _, rest = listen.partition(":")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit() or int(port) > 65535:
        return f"--listen {listen!r} is not tcp:HOST:PORT"
    if not re.match(SLOT_PATTERN, name):
        return (
            f"--name {name!r} is not a slot name (letters, digits and _.#:- , starting with a"
            " letter or digit, at most 128 characters)"
        )
    return None
