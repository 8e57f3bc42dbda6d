"""The application config (``app.yaml`` or ``app.toml``), decoded once at start.

``load_config(path)`` reads YAML (or TOML when the file ends in ``.toml``),
then decodes it into ``AppConfig`` with msgspec, so every type, bound and
cross-field rule is checked before anything starts. A bad file raises
``ConfigError`` naming the file, the field's path (``$.deployments[0].name``)
and the reason.
"""

from __future__ import annotations

import io
import math
import os
import tomllib
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
import yaml

from muxgate.backends._config import storage_config_from_section
from muxgate.gateway._config_hints import apply_aliases, explain
from muxgate.gateway._errors import ConfigError
from muxgate.gateway._policy import AutoscalingConfig
from muxgate.gateway._quarantine import QuarantineConfig
from muxgate.gateway._router import DEFAULT_BALANCE_FACTOR, DEFAULT_VIRTUAL_NODES
from muxgate.gateway._spill import SpillRule
from muxgate.replicas.contract import MAX_BODY_BYTES, ChannelSettings, TlsSettings

__all__ = [
    "AppConfig",
    "AutoscalingConfig",
    "DeploymentConfig",
    "HttpConfig",
    "HttpLimits",
    "LauncherConfig",
    "MetricsConfig",
    "QuarantineConfig",
    "RoutingConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
    "read_config_file",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
#: a model id as the ingress accepts it: 1 to 256 printable ASCII characters, no space
ModelId = Annotated[str, msgspec.Meta(pattern=r"^[!-~]{1,256}$")]


class HttpLimits(msgspec.Struct, forbid_unknown_fields=True):
    """What one HTTP client may hold of the gateway (see docs/http.md, "Limits")."""

    #: request line plus headers, counted while they arrive; over it: 431
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    #: number of header fields; over it: 431
    max_headers: Annotated[int, msgspec.Meta(ge=1)] = 100
    #: from a connection's first byte of a request (or from accepting it) to
    #: the end of the request's headers; past it: 408 (or a close when nothing came)
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: from the end of the headers to the end of the body, never past the
    #: request's deadline; past it: 408
    body_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: an idle keep-alive connection is closed after this long
    keep_alive_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: open connections; at the cap a new one closes the longest-idle one,
    #: or gets 503 when every connection has a request in flight
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: requests queued behind the one in flight on a connection (HTTP/1.1
    #: pipelining); the next one gets 503, after the answers before it
    max_pipelined: Annotated[int, msgspec.Meta(ge=1)] = 64
    #: bytes of request bodies the gateway holds at once, every connection's
    #: (at least ``http.max_body_bytes``); a body that would pass it: 503
    max_body_bytes_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 1 << 30


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The gateway's HTTP listener and per-request limits."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    #: at most what one message to a replica carries (``MAX_BODY_BYTES``, 1 GiB - 1 MiB)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY_BYTES)] = 10 * 1024 * 1024
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: when set, every ``/-/`` endpoint but the public ``/-/healthz`` and
    #: status page needs ``Authorization: Bearer <token>``; when unset, they
    #: answer only clients on the loopback interface
    admin_token: str | None = None
    limits: HttpLimits = msgspec.field(default_factory=HttpLimits)
    #: on shutdown, how long requests in flight may still run before they are
    #: answered 503 shutting_down; None: ``request_timeout_s``
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] | None = None

    @property
    def grace_s(self) -> float:
        """The shutdown grace in effect."""
        return self.request_timeout_s if self.shutdown_grace_s is None else self.shutdown_grace_s


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Parameters of the bounded-load consistent-hash router (docs/routing.md)."""

    #: c in the bounded-load rule; the default was chosen by
    #: bench/bench_routing_sim.py (see ``muxgate.gateway._router``)
    balance_factor: Annotated[float, msgspec.Meta(gt=1.0)] = DEFAULT_BALANCE_FACTOR
    virtual_nodes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = DEFAULT_VIRTUAL_NODES
    #: floor on the bounded-load capacity; None: half of ``max_ongoing_requests``
    min_capacity: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: how long the oldest queued request lets younger requests whose model is
    #: already on the freed replica go first (cache-affine queue); None: a
    #: moving estimate of the model load time the replicas report; 0: strict FIFO
    queue_affinity_wait_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    #: when a request whose model's holders are all full goes to another
    #: replica: ``priced`` only when the expected wait for a holder costs more
    #: than the load plus the misses of the model it evicts (docs/routing.md);
    #: ``bounded_load`` always; ``never`` not while a holder is in the pool
    #: (its requests wait for a holder, which takes up to max_ongoing_requests)
    spill: SpillRule = "priced"


class LauncherConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Where a deployment's replicas run (``muxgate.gateway.launchers``).

    ``local``: processes the gateway starts. ``static``: ``muxgate replica``
    servers started elsewhere, at ``addresses`` or behind the DNS name
    ``dns`` (``HOST:PORT``, resolved again every ``resolve_interval_s``);
    the gateway only watches them. ``ray``: Ray actors on the cluster at
    ``address`` (``auto``: the one this host belongs to), named in
    ``namespace``, sized by the gateway holding the lease (``lease_s``; see
    docs/remote.md).
    """

    kind: Literal["local", "static", "ray"] = "local"
    #: static: each replica's ``tcp:HOST:PORT``
    addresses: list[str] = []
    #: static: ``HOST:PORT`` whose name resolves to the replicas
    dns: str | None = None
    resolve_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: ray: the cluster's address (``auto``, ``HOST:PORT`` of the head, ``ray://...``)
    address: str | None = None
    #: ray: the namespace of the replica actors (None: ``muxgate``)
    namespace: Annotated[str, msgspec.Meta(pattern=_NAME)] | None = None
    #: ray: the leader lease's period in seconds (None: 10); only the gateway
    #: holding a deployment's lease creates, stops and replaces its actors
    lease_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] | None = None

    def __post_init__(self) -> None:
        ray_only = (self.address, self.namespace, self.lease_s)
        if self.kind != "ray" and any(v is not None for v in ray_only):
            raise ValueError(f"a {self.kind} launcher takes no address, namespace or lease_s")
        if self.kind in ("local", "ray"):
            if self.addresses or self.dns:
                raise ValueError(f"a {self.kind} launcher takes no addresses or dns")
            return
        if bool(self.addresses) == bool(self.dns):
            raise ValueError("a static launcher needs addresses or dns (one of the two)")
        for address in self.addresses:
            scheme, _, rest = address.partition(":")
            host, _, port = rest.rpartition(":")
            if scheme != "tcp" or not host or not port.isdigit():
                raise ValueError(f"static address {address!r} is not tcp:HOST:PORT")
        if self.dns is not None:
            host, _, port = self.dns.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"dns {self.dns!r} is not HOST:PORT")


class DeploymentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One deployment: a user class served by a pool of replica processes."""

    name: Annotated[str, msgspec.Meta(pattern=_NAME)]
    import_path: Annotated[str, msgspec.Meta(pattern=_IMPORT_PATH)]
    init_kwargs: dict[str, Any] = {}
    route_prefix: str = "/"
    #: None here and for the two below: the class's ``@deployment(...)``
    #: option (learnt from its first replica's handshake), else its default
    max_ongoing_requests: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: gateway queue bound for this deployment; -1 means unbounded
    max_queued_requests: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    num_replicas: Annotated[int, msgspec.Meta(ge=0)] | None = None
    autoscaling: AutoscalingConfig | None = None
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    #: model ids that keep killing replicas are refused for a while (503 quarantined)
    quarantine: QuarantineConfig = msgspec.field(default_factory=QuarantineConfig)
    #: a replica whose resident memory passes this is drained and replaced;
    #: None: no limit
    max_replica_rss_bytes: Annotated[int, msgspec.Meta(gt=0)] | None = None
    #: the replicas' model-cache eviction: ``lru`` (least recently used) or
    #: ``tinylfu`` (LRU with frequency admission); None: each loader's own
    #: ``@multiplexed(eviction_policy=...)``, else ``lru``
    eviction_policy: Literal["lru", "tinylfu"] | None = None
    #: ``evict_after`` (evict once the new model is built: a failed load costs
    #: no working model) or ``evict_first`` (memory never above the limit);
    #: None: each loader's own ``@multiplexed(load_order=...)``, else ``evict_after``
    load_order: Literal["evict_after", "evict_first"] | None = None
    #: run async ``@multiplexed`` loaders on the replica's event loop instead
    #: of a loader thread's (for loaders that await objects bound to that
    #: loop); None: each loader's own ``@multiplexed(load_on_loop=...)``, else false
    load_on_loop: bool | None = None
    #: a replica's loader thread goes before its calls when they compete for
    #: the CPU (the thread that serves calls runs at a lower priority once the
    #: loader thread starts); false: the same priority
    loads_first: bool = True
    #: a call whose model is loaded waits out the load step running on the
    #: replica's loader thread (at most 50 ms), so that the load has the
    #: interpreter lock to itself: a lower p99 under saturation
    #: (docs/model-cache.md, "Loads first"); false: hits run beside loads
    hits_wait_for_loads: bool = True
    #: CPU budget per replica (Ray's ``num_cpus``): torch threads and
    #: ``OMP_NUM_THREADS`` follow it, rounded up; None: the class's
    #: ``@deployment(num_cpus=...)``, else 1
    num_cpus: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: local replicas: each is pinned (CPU affinity) to cores of its own,
    #: as many as its budget rounded up, while the gateway's cores last;
    #: the others float (docs/config.md, "CPU budgets")
    pin_cpus: bool = False
    #: where the replicas run; None: the app-level ``launcher``
    launcher: LauncherConfig | None = None
    #: model ids each replica loads before it reports ready (docs/routing.md,
    #: "Warm models"); a failed load is logged and the replica starts anyway
    preload: list[ModelId] = []
    #: model ids each replica loads before ready and never evicts (they count
    #: against ``max_num_models_per_replica`` and ``max_bytes_per_replica``)
    pinned: list[ModelId] = []
    #: the ``@multiplexed`` method ``preload``, ``pinned`` and the admin
    #: load/unload use; None: every ``@multiplexed`` loader of the class
    multiplexed_loader: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_]\w*$")] | None = None
    #: byte budget of each model cache of a replica (models measured once
    #: loaded); None: each loader's own ``@multiplexed(max_bytes_per_replica=...)``
    max_bytes_per_replica: Annotated[int, msgspec.Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None and not math.isfinite(self.num_cpus):
            raise ValueError(f"num_cpus must be finite, got {self.num_cpus}")
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("num_replicas and autoscaling are mutually exclusive")
        module = self.import_path.partition(":")[0]
        if module.endswith(".py"):
            # "model.py:Model" imports a submodule "py" of a package "model".
            raise ValueError(
                f"import_path names a module, not a file: {module.removesuffix('.py')}:"
                f"{self.import_path.partition(':')[2]}, not {self.import_path}"
            )
        prefix = self.route_prefix
        if not prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if prefix != "/" and prefix.endswith("/"):
            raise ValueError("route_prefix must not end with '/' (except the root '/')")
        if prefix == "/-" or prefix.startswith("/-/"):
            raise ValueError("route_prefix under '/-/' is reserved for the admin API")
        if any(c.isspace() or c in "?#" for c in prefix):
            raise ValueError("route_prefix must not contain whitespace, '?' or '#'")

    @property
    def min_replicas(self) -> int:
        """Replicas that must be running for the deployment to be healthy."""
        if self.autoscaling is not None:
            return int(self.autoscaling.min_replicas)
        return self.num_replicas if self.num_replicas is not None else 1

    @property
    def initial_replicas(self) -> int:
        """Replicas started with the gateway."""
        if self.autoscaling is not None:
            initial = self.autoscaling.initial_replicas
            return int(initial if initial is not None else self.autoscaling.min_replicas)
        return self.num_replicas if self.num_replicas is not None else 1


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Span export. An ``exporter`` of ``None`` leaves the choice to the
    standard ``OTEL_*`` variables (``OTEL_TRACES_EXPORTER``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``), read when the gateway and each replica
    start: OTLP when an endpoint is named (here or there), else nothing."""

    exporter: Literal["otlp", "console", "none"] | None = None
    endpoint: str | None = None


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True):
    #: label request metrics with the model id (opt-in: a series per model)
    per_model_labels: bool = False
    #: model ids labelled per deployment; later ones share the label "(other)"
    max_model_labels: Annotated[int, msgspec.Meta(ge=1)] = 1000


def repeated_names(deployments: Iterable[tuple[int, DeploymentConfig]]) -> list[str]:
    """A problem for each deployment (with its index in the config) whose
    name or route prefix an earlier one already has."""
    names: set[str] = set()
    prefixes: set[str] = set()
    problems = []
    for i, d in deployments:
        # msgspec reports errors raised in __post_init__ at `$`; name the field ourselves.
        if d.name in names:
            problems.append(
                f"deployment name {d.name!r} is used twice - at `$.deployments[{i}].name`"
            )
        if d.route_prefix in prefixes:
            problems.append(
                f"route_prefix {d.route_prefix!r} is used twice"
                f" - at `$.deployments[{i}].route_prefix`"
            )
        names.add(d.name)
        prefixes.add(d.route_prefix)
    return problems


class AppConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The whole application: HTTP listener, deployments, storage, telemetry."""

    deployments: Annotated[list[DeploymentConfig], msgspec.Meta(min_length=1)]
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    #: fsspec storage options per protocol, e.g. ``{"s3": {"endpoint_url": ...}}``,
    #: and the ``cache``, ``retry`` and ``transfer`` settings of muxgate.backends
    storage: dict[str, dict[str, Any]] = {}
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    #: folder put on ``sys.path`` of replicas to resolve ``import_path``;
    #: ``load_config`` resolves it against the config file's folder
    app_dir: str = ""
    #: the replica channel over TCP: ``secret_file`` (else the
    #: ``MUXGATE_CLUSTER_SECRET`` variable) and ``tls`` (``ca``, ``cert``,
    #: ``key``, ``mutual``); paths resolved against the config file's folder
    cluster: ChannelSettings = msgspec.field(default_factory=ChannelSettings)
    #: where replicas run unless a deployment says (``kind: local`` by default)
    launcher: LauncherConfig = msgspec.field(default_factory=LauncherConfig)

    def __post_init__(self) -> None:
        repeats = repeated_names(enumerate(self.deployments))
        if repeats:
            raise ValueError(repeats[0])

    def launcher_for(self, deployment: DeploymentConfig) -> LauncherConfig:
        """The deployment's launcher settings, else the app-level ones."""
        return deployment.launcher if deployment.launcher is not None else self.launcher

    def deployment(self, name: str) -> DeploymentConfig:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)


def parse_config(data: Any, *, source: str = "<config>", base_dir: str = ".") -> AppConfig:
    """Validate already-parsed data (a dict) into an ``AppConfig``.

    Raises:
        ConfigError: naming ``source``, the field's path and the reason.
    """
    if data is None:  # an empty YAML file
        raise ConfigError(source, "the config is empty: it needs at least `deployments:`")
    if not isinstance(data, dict):
        raise ConfigError(source, "expected a mapping at the top level")
    data, problems = apply_aliases(data)  # Ray Serve's names (autoscaling_config)
    if problems:
        raise ConfigError(source, problems[0])
    try:
        config = msgspec.convert(data, AppConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, explain(str(exc), AppConfig)) from exc
    try:
        storage_config_from_section(config.storage)  # validated here, applied by each replica
    except ValueError as exc:
        raise ConfigError(source, str(exc)) from exc
    app_dir = os.path.abspath(os.path.join(base_dir, config.app_dir))
    return msgspec.structs.replace(
        config, app_dir=app_dir, cluster=_resolve_cluster_paths(config.cluster, base_dir)
    )


def _resolve_cluster_paths(cluster: ChannelSettings, base_dir: str) -> ChannelSettings:
    def resolve(path: str | None) -> str | None:
        return os.path.abspath(os.path.join(base_dir, path)) if path else path

    tls = cluster.tls
    if tls is not None:
        tls = TlsSettings(
            ca=resolve(tls.ca), cert=resolve(tls.cert), key=resolve(tls.key), mutual=tls.mutual
        )
    return msgspec.structs.replace(cluster, secret_file=resolve(cluster.secret_file), tls=tls)


def load_config(path: str | os.PathLike[str]) -> AppConfig:
    """Read and validate an application config file (YAML, or TOML by suffix).

    Raises:
        ConfigError: the file is missing, unparsable or invalid; the message
            names the file, the field's path and the reason.
    """
    source = os.fspath(path)
    data = read_config_file(source)
    return parse_config(data, source=source, base_dir=os.path.dirname(os.path.abspath(source)))


def read_config_file(source: str) -> Any:
    """The parsed but not yet validated contents of a YAML (or ``.toml``) file.

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror}") from exc
    try:
        if source.endswith(".toml"):
            return tomllib.loads(raw.decode())
        # A named stream: errors then say `in "app.yaml", line 3`, not "<byte string>".
        stream = io.BytesIO(raw)
        stream.name = source
        return yaml.safe_load(stream)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        kind = "TOML" if source.endswith(".toml") else "YAML"
        raise ConfigError(source, f"not valid {kind}: {exc}") from exc
