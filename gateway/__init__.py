"""muxgate.gateway: the HTTP edge: Litestar app, router, replica pool, autoscaler, CLI.

Start a gateway in-process (tests, embedding)::

    from muxgate.gateway import serve

    async with serve("app.yaml") as base_url:   # or an AppConfig, or a dict
        ...

or from the shell with ``muxgate serve app.yaml``.
"""

from muxgate.gateway._autoscaler import Autoscaler
from muxgate.gateway._config import (
    AppConfig,
    DeploymentConfig,
    HttpConfig,
    MetricsConfig,
    RoutingConfig,
    TracingConfig,
    load_config,
    parse_config,
)
from muxgate.gateway._connection import (
    HandshakeError,
    ReplicaConnection,
    ReplicaConnectionError,
    ReplicaDiedError,
    ReplicaUnavailableError,
)
from muxgate.gateway._errors import ConfigError, GatewayError
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._policy import AutoscalingConfig, PolicyState, Sample, decide
from muxgate.gateway._router import HashRing, RouteDecision, Router
from muxgate.gateway._serve import ConfigSource, Gateway, GatewayStartError, serve, start_gateway
from muxgate.gateway.launchers import ReplicaStartError
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess

__all__ = [
    "AppConfig",
    "Autoscaler",
    "AutoscalingConfig",
    "ConfigError",
    "ConfigSource",
    "DeploymentConfig",
    "Gateway",
    "GatewayError",
    "GatewayMetrics",
    "GatewayStartError",
    "HandshakeError",
    "HashRing",
    "HttpConfig",
    "LocalLauncher",
    "MetricsConfig",
    "PolicyState",
    "ReplicaConnection",
    "ReplicaConnectionError",
    "ReplicaDiedError",
    "ReplicaProcess",
    "ReplicaStartError",
    "ReplicaUnavailableError",
    "RouteDecision",
    "Router",
    "RoutingConfig",
    "Sample",
    "TracingConfig",
    "decide",
    "load_config",
    "parse_config",
    "serve",
    "start_gateway",
]
