"""``muxgate check app.yaml``: every problem of a config, found before deploying.

Two passes, and every problem of both is reported at once:

1. The config: the whole file is validated as ``muxgate serve`` would; when
   that fails, each top-level section and each deployment is validated on
   its own too, so one bad part does not hide another's problem.
2. The classes: each deployment whose own config is valid has its
   ``import_path`` imported in *one separate Python process*, and the names
   of its ``init_kwargs`` bound to the class's signature (a misspelt or a
   missing argument is found; nothing is constructed), so the checking
   process stays free of user code and a class that crashes the interpreter
   is reported like any other failure.

``muxgate serve`` uses pass 2 for deployments that start with no replica
(``min_replicas: 0``): the others are constructed by their first replica,
and a failure there stops the start (see ``serve(fail_fast=True)``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from muxgate.gateway._config import (
    AppConfig,
    DeploymentConfig,
    parse_config,
    read_config_file,
    repeated_names,
)
from muxgate.gateway._errors import ConfigError

__all__ = ["CheckReport", "ImportTarget", "check_config_file", "import_classes"]

#: the child's result line starts with this (user code may print too)
_MARKER = "MUXGATE-CHECK "
#: a deployment that is valid, standing in for the real ones while the
#: top-level sections are checked on their own
_PLACEHOLDER = {"name": "placeholder", "import_path": "placeholder:Placeholder"}

# Runs in the child: imports each class the way a replica does
# (muxgate.replicas._server._import_class), reports one JSON line.
_CHILD = f"""
import inspect, json, sys, types
from muxgate.replicas._server import _import_class, failure_location

results = {{}}
for item in json.loads(sys.stdin.read()):
    try:
        where = types.SimpleNamespace(app_dir=item["app_dir"], import_path=item["import_path"])
        cls = _import_class(where)
        results[item["name"]] = None
    except BaseException as exc:
        error = f"{{type(exc).__name__}}: {{exc}}"
        results[item["name"]] = {{"error": error, "where": failure_location(exc)}}
        continue
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to check (e.g. a C type)
        continue
    try:
        signature.bind(**dict.fromkeys(item["init_kwargs"]))
    except TypeError as exc:
        results[item["name"]] = {{"error": str(exc), "init_kwargs": True}}
sys.stdout.write({_MARKER!r} + json.dumps(results) + "\\n")
"""


@dataclass(frozen=True)
class ImportTarget:
    """One deployment's class to import."""

    name: str
    import_path: str
    app_dir: str
    #: the names of its ``init_kwargs`` (bound to the class's signature)
    init_kwargs: tuple[str, ...] = ()


@dataclass
class CheckReport:
    """What ``check_config_file`` found."""

    config: AppConfig | None
    #: one line each, naming the field's path or the deployment
    problems: list[str]
    #: deployments whose class imported
    imported: list[str]


def _config_problems(data: Any, source: str, base_dir: str) -> tuple[AppConfig | None, list[str]]:
    """The whole config, or every problem of its parts."""
    try:
        return parse_config(data, source=source, base_dir=base_dir), []
    except ConfigError as whole:
        if not isinstance(data, dict) or not data:
            return None, [whole.reason]
        problems: list[str] = []
        # Each top-level section on its own (msgspec stops at the first error).
        for key, value in data.items():
            if key == "deployments":
                continue
            problems += _part_problems({key: value, "deployments": [_PLACEHOLDER]}, (key,), source)
        if not isinstance(data.get("deployments"), list):
            # Missing (a Ray Serve config has `applications:`) or not a list:
            # said after the sections' own problems, as one more.
            rest = {k: v for k, v in data.items() if k == "deployments"}
            problems += _part_problems(rest, ("deployments",), source)
            return None, problems or [whole.reason]
        valid: list[tuple[int, DeploymentConfig]] = []
        for i, deployment in enumerate(data["deployments"]):
            found = _part_problems({"deployments": [deployment]}, ("deployments", 0), source)
            problems += [r.replace("`$.deployments[0]", f"`$.deployments[{i}]") for r in found]
            if not found:
                valid.append((i, parse_config({"deployments": [deployment]}).deployments[0]))
        # The rules across deployments, among those valid on their own.
        problems += repeated_names(valid)
        return None, problems or [whole.reason]


#: where a msgspec error points: ``- at `$.a.b[0].c` `` (the end of its message)
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
#: problems found in one part before giving up on finding more in it
_MAX_PROBLEMS_PER_PART = 20


def _part_problems(data: dict[str, Any], part: tuple[str | int, ...], source: str) -> list[str]:
    """Every problem of one part of a config (a top-level section, or a
    deployment at ``part``): msgspec reports the first, so the field it names
    is dropped (its default applies; a deployment's required ``name`` and
    ``import_path`` get a valid stand-in instead, so they are not reported
    missing next) and the part validated again, until it passes or a problem
    is not one field's (a required field, a rule across fields)."""
    data = copy.deepcopy(data)
    problems: list[str] = []
    while len(problems) < _MAX_PROBLEMS_PER_PART:
        try:
            parse_config(data, source=source)
            break
        except ConfigError as exc:
            problems.append(exc.reason)
            if not _drop_named_field(data, exc.reason, part):
                break
    return problems


def _drop_named_field(data: dict[str, Any], reason: str, part: tuple[str | int, ...]) -> bool:
    """Remove the field ``reason`` names from ``data``, if it names one below
    ``part``; whether it did."""
    where = _AT.search(reason)
    if where is None:
        return False
    keys: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where["path"]):
        keys.append(int(index) if index else name)
    unknown = _UNKNOWN_FIELD.match(reason)
    if unknown is not None:
        keys.append(unknown["field"])
    elif reason.startswith("Object missing required field"):
        return False
    # A problem inside a list (an element, or a field of one): drop the list.
    for i, key in enumerate(keys):
        if isinstance(key, int) and i >= len(part):
            keys = keys[:i]
            break
    if len(keys) <= len(part) or tuple(keys[: len(part)]) != part:
        return False  # the part itself (a rule across its fields)
    parent: Any = data
    for key in keys[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return False
    if not isinstance(parent, dict) or keys[-1] not in parent:
        return False
    if part == ("deployments", 0) and len(keys) == 3 and keys[-1] in _PLACEHOLDER:
        # A required field: dropped, it would be reported missing next.
        parent[keys[-1]] = _PLACEHOLDER[keys[-1]]
    else:
        del parent[keys[-1]]
    return True


def _valid_deployments(data: Any, base_dir: str) -> list[ImportTarget]:
    """The deployments of ``data`` that are valid on their own."""
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        return []
    app_dir = data.get("app_dir", "")
    folder = os.path.abspath(os.path.join(base_dir, app_dir if isinstance(app_dir, str) else ""))
    targets = []
    for deployment in data["deployments"]:
        try:
            config = parse_config({"deployments": [deployment]})
        except ConfigError:
            continue
        d = config.deployments[0]
        targets.append(ImportTarget(d.name, d.import_path, folder, tuple(d.init_kwargs)))
    return targets


def import_classes(
    targets: list[ImportTarget], *, timeout_s: float = 300.0
) -> dict[str, str | None]:
    """Import each target's class in one child process: name -> the problem
    (exception, and where in the user's code when it raised there), or None."""
    if not targets:
        return {}
    payload = json.dumps([t.__dict__ for t in targets])
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {t.name: f"importing took longer than {timeout_s:g} s" for t in targets}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        reason = f"the import process exited with code {proc.returncode}: {tail}"
        return {t.name: reason for t in targets}
    results: dict[str, Any] = json.loads(lines[-1][len(_MARKER) :])
    out: dict[str, str | None] = {}
    for target in targets:
        result = results.get(target.name)
        if result is None:
            out[target.name] = None
        elif result.get("init_kwargs"):
            given = ", ".join(target.init_kwargs) or "none"
            out[target.name] = (
                f"init_kwargs ({given}) do not fit {target.import_path}: {result['error']}"
            )
        else:
            at = f" (at {result['where']})" if result.get("where") else ""
            out[target.name] = f"importing {target.import_path}: {result['error']}{at}"
    return out


def _channel_problems(config: AppConfig) -> list[str]:
    """The cluster secret and TLS files, when a deployment's replicas are remote."""
    from muxgate.gateway._remote import RemoteLaunchers
    from muxgate.gateway.launchers import LauncherNotFoundError
    from muxgate.replicas.contract import ChannelError

    try:
        RemoteLaunchers(config, check_only=True)
    except ChannelError as exc:
        return [f"cluster: {exc}"]
    except LauncherNotFoundError as exc:
        return [str(exc)]
    return []


def check_config_file(path: str | os.PathLike[str]) -> CheckReport:
    """Validate the config at ``path`` and import every deployment's class;
    every problem found is in the report (none are raised)."""
    source = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(source))
    try:
        data = read_config_file(source)
    except ConfigError as exc:
        return CheckReport(None, [exc.reason], [])
    config, problems = _config_problems(data, source, base_dir)
    if config is not None:
        problems += _channel_problems(config)
    targets = _valid_deployments(data, base_dir)
    imported: list[str] = []
    for name, problem in import_classes(targets).items():
        if problem is None:
            imported.append(name)
        else:
            problems.append(f"deployment {name!r}: {problem}")
    return CheckReport(config, problems, imported)
