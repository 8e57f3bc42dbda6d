"""What a replica is started with: the ``ReplicaSpec`` the gateway builds and
the replica server decodes (``python -m muxgate.replicas._server`` reads it
as JSON), so both sides agree on every field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from muxgate.replicas._channel import ChannelSettings

__all__ = ["ReplicaSpec", "TracingSettings"]


class TracingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Span export of a replica; None fields fall back to the ``OTEL_*``
    environment (see ``muxgate.replicas._tracing.configure_tracing``)."""

    exporter: str | None = None  # "otlp" | "console" | "none"
    endpoint: str | None = None
    service_name: str | None = None


class ReplicaSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a replica process needs to start; built by the gateway.

    Attributes:
        deployment: deployment name (logs, spans, ``Welcome``).
        import_path: ``"module:Class"`` of the deployment class.
        replica_id: unique id of this replica within its deployment.
        init_kwargs: keyword arguments for the class's ``__init__``.
        app_dir: folder put first on ``sys.path`` before importing.
        listen: ``"unix:/path"`` or ``"tcp:127.0.0.1:0"`` (port 0: any free
            port); ``""``: the launcher's choice (it sets one before the
            replica starts).
        max_ongoing_requests: calls this replica runs at once (its own guard,
            and the bound on worker threads for sync user code); None: the
            class's ``@deployment(max_ongoing_requests=...)``.
        log_level: level of the root logger in the replica.
        graceful_shutdown_timeout_s: how long a drain or SIGTERM waits for
            in-flight calls before cancelling them.
        event_loop: ``"auto"`` (uvloop when installed), ``"uvloop"`` or ``"asyncio"``.
        tracing: span export settings; None: the ``OTEL_*`` environment only.
        storage: the config's ``storage:`` section (fsspec options per
            protocol, and ``cache``/``retry``/``transfer`` settings), handed
            to ``configure_storage_section``.
        gateway_url: base URL of the gateway that started the replica; the
            default of ``get_deployment_handle`` inside it.
        admin_token: the gateway's admin token (handle calls need it when set).
        eviction_policy: the model caches' eviction policy (``"lru"``, ...);
            None: each ``@multiplexed`` loader's own.
        load_order: ``"evict_after"`` or ``"evict_first"``; None: each loader's own.
        num_cpus: CPU budget (threads, see ``muxgate.replicas._cpu``); None:
            the class's ``@deployment(num_cpus=...)``, 1 by default.
        standalone: started by ``muxgate replica``, not by a gateway: no
            parent to watch, and it keeps serving (models loaded) when its
            last gateway disconnects.
        channel: the listener's security (the cluster secret, TLS); None:
            none (a local replica on a Unix socket). A TCP listener on a
            non-loopback address needs the secret or mutual TLS.
        preload: model ids loaded before the replica reports ready (failures
            are logged; the replica starts anyway).
        pinned: model ids loaded before ready and never evicted.
        multiplexed_loader: the ``@multiplexed`` method ``preload`` and
            ``pinned`` use; None: every loader of the class.
        max_bytes_per_replica: byte budget of each model cache; None: each
            loader's own ``@multiplexed(max_bytes_per_replica=...)``.
        load_on_loop: run async loaders on the replica's event loop rather
            than a loader thread's; None: each loader's own
            ``@multiplexed(load_on_loop=...)``.
        loads_first: once the loader thread starts, the thread that serves
            calls runs at a lower CPU priority than it
            (``muxgate.replicas._loader_thread``, "Priority").
        hits_wait_for_loads: a call whose model is loaded waits out the load
            step under way on the loader thread, at most 50 ms
            (``muxgate.replicas._load_steps``).
        pin_cpus: a local launcher pins the replica to cores of its own
            (``muxgate.gateway.launchers._processes.CpuPins``).
        drain_fence: obey only a ``Drain`` carrying a token the replica's
            supervisor wrote on its stdin pipe (``muxgate.replicas._drain_fence``:
            a Ray replica actor, after checking the gateway's lease epoch).
    """

    deployment: str
    import_path: str
    replica_id: str
    init_kwargs: dict[str, Any] = {}
    app_dir: str | None = None
    listen: str = "tcp:127.0.0.1:0"
    max_ongoing_requests: int | None = None
    log_level: str = "INFO"
    graceful_shutdown_timeout_s: float = 20.0
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    tracing: TracingSettings | None = None
    storage: dict[str, dict[str, Any]] = {}
    gateway_url: str | None = None
    admin_token: str | None = None
    eviction_policy: str | None = None
    load_order: Literal["evict_after", "evict_first"] | None = None
    num_cpus: Annotated[float, msgspec.Meta(gt=0)] | None = None
    standalone: bool = False
    channel: ChannelSettings | None = None
    preload: list[str] = []
    pinned: list[str] = []
    multiplexed_loader: str | None = None
    max_bytes_per_replica: int | None = None
    load_on_loop: bool | None = None
    drain_fence: bool = False
    loads_first: bool = True
    hits_wait_for_loads: bool = True
    pin_cpus: bool = False
