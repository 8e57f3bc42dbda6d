"""The gateway <-> replica contract: everything both ends of a replica
connection must agree on, in one import.

The gateway imports this module and the public SDK (``muxgate.replicas``)
and no private module of this package; the import-linter contracts in
``pyproject.toml`` fail the lint when it does. The definitions live in
small private modules, one per subject:

================================  ==============================================
``muxgate.replicas._protocol``    frames and messages (``Call``, ``Reply``,
                                  ``Pong``...), the protocol version: all
                                  of its ``__all__``, which is not repeated
                                  here
``muxgate.replicas._spec``        ``ReplicaSpec``: what a replica is started with
``muxgate.replicas._channel``     the authenticated channel: the cluster
                                  secret's proofs, TLS contexts, settings
``muxgate.replicas._cpu``         the environment a spec's CPU budget sets
``muxgate.replicas._deployment``  defaults of the options ``Welcome`` carries
``muxgate.replicas._codes``       ``ErrorCode``: every error code and its status
``muxgate.replicas._counters``    counter keys and load-duration buckets
``muxgate.replicas._propagation`` trace context in a ``Call``
``muxgate.replicas._fastwrite``   writing frames to a socket without a task
``muxgate.replicas._tracing``     span export, set up alike in both processes
``muxgate.replicas._unix_streams`` a guard for anyio's Unix socket streams
================================  ==============================================

This is not user API: names here change with ``PROTOCOL_VERSION``.
"""

from muxgate.replicas import _protocol
from muxgate.replicas._channel import (
    SECRET_ENV,
    ChannelAuth,
    ChannelError,
    ChannelSettings,
    TlsSettings,
    client_ssl_context,
    is_loopback_host,
    load_secret,
)
from muxgate.replicas._codes import ErrorCode
from muxgate.replicas._counters import (
    MODEL_LOAD_BUCKETS,
    MODELS_LOADED_KEY,
    REPLICA_COUNTER_KEYS,
    UNLOAD_REASONS,
    load_bucket_key,
)
from muxgate.replicas._cpu import cpu_budget_env, thread_count_for
from muxgate.replicas._deployment import (
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_NUM_CPUS,
)
from muxgate.replicas._fastwrite import DirectWriter
from muxgate.replicas._propagation import extract_context, inject_traceparent
from muxgate.replicas._protocol import *  # noqa: F403
from muxgate.replicas._spec import ReplicaSpec, TracingSettings
from muxgate.replicas._tracing import exports_spans, flush_tracing, tracing_active
from muxgate.replicas._unix_streams import guard_unix_streams

__all__ = [
    "DEFAULT_MAX_ONGOING_REQUESTS",
    "DEFAULT_MAX_QUEUED_REQUESTS",
    "DEFAULT_NUM_CPUS",
    "MODELS_LOADED_KEY",
    "MODEL_LOAD_BUCKETS",
    "REPLICA_COUNTER_KEYS",
    "SECRET_ENV",
    "UNLOAD_REASONS",
    "ChannelAuth",
    "ChannelError",
    "ChannelSettings",
    "DirectWriter",
    "ErrorCode",
    "ReplicaSpec",
    "TlsSettings",
    "TracingSettings",
    "client_ssl_context",
    "cpu_budget_env",
    "exports_spans",
    "extract_context",
    "flush_tracing",
    "guard_unix_streams",
    "inject_traceparent",
    "is_loopback_host",
    "load_bucket_key",
    "load_secret",
    "thread_count_for",
    "tracing_active",
]
__all__ += _protocol.__all__
