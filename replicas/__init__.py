"""muxgate.replicas: the user SDK, and the code that runs inside a replica process.

Write a deployment class with :func:`deployment`, decorate its model loader
with :func:`multiplexed`, and read the request's model id with
:func:`get_multiplexed_model_id`: the same API as Ray Serve's model
multiplexing.
"""

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import DeploymentOptions, deployment, get_deployment_options
from muxgate.replicas._handle import (
    DeploymentHandle,
    DeploymentResponse,
    HandleBadRequestError,
    HandleCancelledError,
    HandleDeadlineError,
    HandleError,
    HandleNotFoundError,
    HandleUnavailableError,
    HandleUserError,
    aclose_handle_clients,
    get_deployment_handle,
)
from muxgate.replicas._http import Request, Response
from muxgate.replicas._multiplex import (
    ModelCache,
    ModelCacheClosedError,
    ModelTooLargeError,
    model_cache,
    model_caches,
    multiplexed,
)
from muxgate.replicas._tracing import configure_tracing, shutdown_tracing

__all__ = [
    "DeploymentHandle",
    "DeploymentOptions",
    "DeploymentResponse",
    "HandleBadRequestError",
    "HandleCancelledError",
    "HandleDeadlineError",
    "HandleError",
    "HandleNotFoundError",
    "HandleUnavailableError",
    "HandleUserError",
    "ModelCache",
    "ModelCacheClosedError",
    "ModelTooLargeError",
    "Request",
    "Response",
    "aclose_handle_clients",
    "configure_tracing",
    "deployment",
    "get_deployment_handle",
    "get_deployment_options",
    "get_multiplexed_model_id",
    "model_cache",
    "model_caches",
    "multiplexed",
    "shutdown_tracing",
]
