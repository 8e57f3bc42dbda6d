"""Friendlier config errors: Ray Serve's field names, and "did you mean".

Two steps around ``msgspec.convert`` in ``parse_config``:

* ``apply_aliases(data)`` before it: a deployment's ``autoscaling_config``
  (Ray Serve's name) is taken as ``autoscaling`` (ours). Both at once is an
  error naming the two.
* ``explain(message)`` after a failure: msgspec says ``Object contains
  unknown field `min_replica` - at `$.deployments[0].autoscaling```; this adds
  the closest known field of the struct at that path (``did you mean
  `min_replicas`?``), or, for a Ray Serve name that has no counterpart here,
  what to use instead. For a value outside a field's fixed set (``Invalid
  enum value 'nevr' - at `$.deployments[0].routing.spill```) it adds the
  nearest allowed value, else lists them; for a string that does not match
  its field's pattern (``import_path: torch_mlp.Model``), the form wanted.

The struct (or the field's type) at a path is found by walking ``msgspec.inspect.type_info`` of
``AppConfig``, so fields added to the config are known here with no change.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import msgspec

__all__ = ["RAY_ALIASES", "apply_aliases", "explain"]

#: Ray Serve's name of a deployment field -> ours (same meaning)
RAY_ALIASES: dict[str, str] = {"autoscaling_config": "autoscaling"}

#: Ray Serve names with no field of the same meaning here: what to do instead
_RAY_POINTERS: dict[str, str] = {
    "applications": "muxgate lists `deployments:` at the top level, each with its own"
    " `import_path` and `route_prefix`",
    "ray_actor_options": "replicas are local processes: there are no Ray actor options",
    "user_config": "pass settings to the class through `init_kwargs`",
    "runtime_env": "replicas run in the gateway's environment; `import_path` resolves"
    " next to the config file",
    "proxy_location": "the gateway is the only proxy",
    "http_options": "its name here is `http:` (`host`, `port`, `request_timeout_s`, ...)",
    "grpc_options": "the gateway serves HTTP only",
    "logging_config": "`muxgate serve --log-level` sets the level of the gateway and its replicas",
    "args": "pass arguments to the class through `init_kwargs`",
    "graceful_shutdown_timeout_s": "set it on the class, `@deployment("
    "graceful_shutdown_timeout_s=...)`; `http.request_timeout_s` bounds it",
    "health_check_period_s": "the gateway watches each replica's process and connection;"
    " there are no health-check settings",
    "health_check_timeout_s": "the gateway watches each replica's process and connection;"
    " there are no health-check settings",
    "max_concurrent_queries": "its current name, here too, is `max_ongoing_requests`",
    "target_num_ongoing_requests_per_replica": "its current name, here too, is"
    " `target_ongoing_requests`",
}

_UNKNOWN = re.compile(
    r"^Object contains unknown field `(?P<field>[^`]*)`(?: - at `(?P<path>[^`]*)`)?$"
)
_BAD_VALUE = re.compile(r"^Invalid enum value (?P<value>.*) - at `(?P<path>[^`]*)`$")
_NO_MATCH = re.compile(r"^Expected `str` matching regex .* - at `(?P<path>[^`]*)`$")

#: a field with a pattern -> the form it wants, in words (the regex alone
#: leaves a user guessing)
_PATTERN_HINTS: dict[str, str] = {
    "import_path": "`module:Class`, e.g. `torch_mlp:Model` (a colon before the class)",
    "name": "1-64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit",
    "namespace": "1-64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit",
    "multiplexed_loader": "the name of a method, e.g. `get_model`",
}
_STEP = re.compile(r"\.([A-Za-z_][\w]*)|\[(\d+)\]")


def apply_aliases(data: Any) -> tuple[Any, list[str]]:
    """``data`` with Ray Serve's field names renamed to ours (a copy where
    anything changed; ``data`` itself is left alone).

    Also returns the problems found (a field given under both names), each
    naming the path, so the caller can refuse the file.
    """
    problems: list[str] = []
    deployments = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(deployments, list):
        return data, problems
    renamed: list[Any] = []
    for i, deployment in enumerate(deployments):
        if isinstance(deployment, dict):
            for ray_name, ours in RAY_ALIASES.items():
                if ray_name not in deployment:
                    continue
                if ours in deployment:
                    problems.append(
                        f"`{ray_name}` (Ray Serve's name) and `{ours}` are the same field;"
                        f" give only `{ours}` - at `$.deployments[{i}]`"
                    )
                    continue
                deployment = {k if k != ray_name else ours: v for k, v in deployment.items()}
        renamed.append(deployment)
    return {**data, "deployments": renamed}, problems


def _type_at(root: type, path: str) -> msgspec.inspect.Type | None:
    """The type of the value at ``path`` (``$.a[0].b``), ``X | None`` unwrapped."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(root)
    for name, index in _STEP.findall(path.removeprefix("$")):
        info = _unwrap(info)
        if index:
            if not isinstance(info, msgspec.inspect.ListType):
                return None
            info = info.item_type
        elif isinstance(info, msgspec.inspect.StructType):
            fields = {f.encode_name: f.type for f in info.fields}
            if name not in fields:
                return None
            info = fields[name]
        else:
            return None
    return _unwrap(info)


def _struct_at(root: type, path: str) -> msgspec.inspect.StructType | None:
    info = _type_at(root, path)
    return info if isinstance(info, msgspec.inspect.StructType) else None


def _unwrap(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """``X | None`` -> ``X``."""
    if isinstance(info, msgspec.inspect.UnionType):
        real = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(real) == 1:
            return real[0]
    return info


def explain(message: str, root: type) -> str:
    """``message`` (a msgspec validation error against ``root``) with a hint
    for an unknown field (the nearest known name, or the Ray Serve pointer)
    or a value outside a field's fixed set (the nearest allowed value)."""
    match = _UNKNOWN.match(message)
    if match is None:
        no_match = _NO_MATCH.match(message)
        if no_match is not None:
            hint = _PATTERN_HINTS.get(no_match["path"].rsplit(".", 1)[-1])
            return message if hint is None else f"{message}: expected {hint}"
        bad = _BAD_VALUE.match(message)
        return message if bad is None else _explain_value(message, bad["value"], bad["path"], root)
    field, path = match["field"], match["path"] or "$"
    pointer = _RAY_POINTERS.get(field)
    if pointer is not None:
        return f"{message}: `{field}` is a Ray Serve field; {pointer}"
    struct = _struct_at(root, path)
    if struct is None:
        return message
    known = [f.encode_name for f in struct.fields]
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
    if close:
        return f"{message}: did you mean `{close[0]}`?"
    return f"{message}; known fields: {', '.join(known)}"


def _explain_value(message: str, value: str, path: str, root: type) -> str:
    info = _type_at(root, path)
    if not isinstance(info, msgspec.inspect.LiteralType):
        return message
    allowed = [str(v) for v in info.values]
    given = value.strip("'\"")
    # "Never" and "bounded-load" are near enough to name the value meant.
    lowered = {a.lower().replace("_", "-"): a for a in allowed}
    close = difflib.get_close_matches(given.lower().replace("_", "-"), lowered, n=1, cutoff=0.6)
    if close:
        return f"{message}: did you mean `{lowered[close[0]]}`?"
    return f"{message}; expected one of: {', '.join(allowed)}"
