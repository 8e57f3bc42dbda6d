"""The ``deployment`` decorator: options attached to a user's class.

``@deployment`` returns the very class it decorates (it stays an ordinary,
testable class) with a :class:`DeploymentOptions` attached. The gateway reads
the options from each replica's handshake (the replica process calls
:func:`get_deployment_options`; the gateway never imports user code) and
lets the config file override them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, TypeVar, overload

import msgspec

__all__ = [
    "DEFAULT_MAX_ONGOING_REQUESTS",
    "DEFAULT_MAX_QUEUED_REQUESTS",
    "DEFAULT_NUM_CPUS",
    "DeploymentOptions",
    "deployment",
    "get_deployment_options",
]

DEFAULT_MAX_ONGOING_REQUESTS = 8
DEFAULT_MAX_QUEUED_REQUESTS = 1000
#: CPU budget of one replica (Ray's ``num_cpus``): torch's intra-op and
#: inter-op threads and ``OMP_NUM_THREADS`` follow it, rounded up
DEFAULT_NUM_CPUS = 1.0

_C = TypeVar("_C", bound=type)
_OPTIONS_ATTR = "__muxgate_deployment__"


class DeploymentOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Options of one deployment, as given to :func:`deployment`.

    Attributes:
        name: deployment name (routes, metrics, logs); defaults to the class name.
        max_ongoing_requests: requests one replica serves at once; beyond it the
            router looks elsewhere or queues.
        max_queued_requests: gateway queue per deployment, ``-1`` for no limit.
        num_replicas: fixed number of replicas, or ``None`` to leave it to the config.
        graceful_shutdown_timeout_s: how long a draining or stopping replica
            waits for its calls before it cancels them; ``inf`` (none of the
            class's own, the default): as long as the gateway's request
            timeout (``http.request_timeout_s``), which also bounds a value
            given here. (A number on the wire, so gateways of any version
            read it.)
        num_cpus: CPU budget of one replica; fractions allowed (rounded up
            for the thread count).
    """

    name: str
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    num_replicas: int | None = None
    graceful_shutdown_timeout_s: float = math.inf
    num_cpus: float = DEFAULT_NUM_CPUS


def check_num_cpus(value: object) -> float:
    """``value`` as a CPU budget: a finite number above 0 (``TypeError`` or ``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"num_cpus must be a number, got {type(value).__name__}.")
    number = float(value)
    if not (number > 0 and math.isfinite(number)):  # also refuses NaN
        raise ValueError(f"num_cpus must be a finite number above 0, got {value}.")
    return number


#: Ray Serve's ``@serve.deployment`` options that are set elsewhere here
_RAY_OPTIONS: dict[str, str] = {
    "autoscaling_config": "set `autoscaling:` for the deployment in the app config",
    "user_config": "pass settings through `init_kwargs` in the app config",
    "ray_actor_options": "replicas are local processes: give `num_cpus=` here",
    "max_concurrent_queries": "its current name, here too, is `max_ongoing_requests`",
    "route_prefix": "set `route_prefix:` for the deployment in the app config",
    "health_check_period_s": "the gateway watches each replica's process and connection",
    "health_check_timeout_s": "the gateway watches each replica's process and connection",
}


def _unknown_option(option: str) -> str:
    """Why ``@deployment`` does not take ``option``, and where it goes instead."""
    where = _RAY_OPTIONS.get(option)
    if where is None:
        where = (
            "it takes name, max_ongoing_requests, max_queued_requests, num_replicas,"
            " graceful_shutdown_timeout_s and num_cpus; the rest is set in the app config"
        )
    return f"@deployment() got an unexpected keyword argument {option!r}: {where}."


def _int_option(name: str, value: object, minimum: int, *, allow_minus_one: bool = False) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum and not (allow_minus_one and value == -1):
        extra = " or -1 (no limit)" if allow_minus_one else ""
        raise ValueError(f"{name} must be at least {minimum}{extra}, got {value}.")
    return value


@overload
def deployment(
    cls: _C,
    *,
    name: str | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    num_replicas: int | None = None,
    graceful_shutdown_timeout_s: float | None = None,
    num_cpus: float = DEFAULT_NUM_CPUS,
) -> _C: ...


@overload
def deployment(
    cls: None = None,
    *,
    name: str | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    num_replicas: int | None = None,
    graceful_shutdown_timeout_s: float | None = None,
    num_cpus: float = DEFAULT_NUM_CPUS,
) -> Any: ...


def deployment(
    cls: type | None = None,
    *,
    name: str | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    num_replicas: int | None = None,
    graceful_shutdown_timeout_s: float | None = None,
    num_cpus: float = DEFAULT_NUM_CPUS,
    **others: Any,
) -> Any:
    """Mark a class as a deployment, bare (``@deployment``) or with options.

    Args:
        cls: the class, when used bare.
        name: deployment name; defaults to the class's ``__name__``.
        max_ongoing_requests: concurrent requests per replica, at least 1.
        max_queued_requests: gateway queue bound, at least 1 or ``-1``.
        num_replicas: fixed replica count (at least 0), or ``None``.
        graceful_shutdown_timeout_s: drain time limit in seconds, at least 0;
            ``None`` (the default): none of the class's own, the gateway's
            request timeout applies (it also bounds a value).
        num_cpus: CPU budget per replica, above 0; fractions allowed. A
            replica runs ``ceil(num_cpus)`` torch intra-op and inter-op
            threads and has ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
            ``OPENBLAS_NUM_THREADS`` set to that number.

    Returns:
        The same class, with its options attached.

    Raises:
        TypeError: not a class, or an option of the wrong type.
        ValueError: an option out of range.
    """
    if others:
        raise TypeError(_unknown_option(next(iter(others))))
    if name is not None and (type(name) is not str or not name.strip()):
        raise (TypeError if type(name) is not str else ValueError)(
            f"name must be a non-empty str, got {name!r}."
        )
    _int_option("max_ongoing_requests", max_ongoing_requests, 1)
    _int_option("max_queued_requests", max_queued_requests, 1, allow_minus_one=True)
    if num_replicas is not None:
        _int_option("num_replicas", num_replicas, 0)
    timeout = graceful_shutdown_timeout_s
    if timeout is not None:
        if type(timeout) not in (int, float):
            raise TypeError(
                f"graceful_shutdown_timeout_s must be a number, got {type(timeout).__name__}."
            )
        if not timeout >= 0:  # also refuses NaN
            raise ValueError(f"graceful_shutdown_timeout_s must be >= 0, got {timeout}.")
    cpus = check_num_cpus(num_cpus)

    def decorate(target: type) -> type:
        if not inspect.isclass(target):
            raise TypeError(
                f"@deployment decorates a class, not {type(target).__name__} "
                "(function deployments are not supported)."
            )
        options = DeploymentOptions(
            name=name if name is not None else target.__name__,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            num_replicas=num_replicas,
            graceful_shutdown_timeout_s=math.inf if timeout is None else float(timeout),
            num_cpus=cpus,
        )
        setattr(target, _OPTIONS_ATTR, options)
        return target

    if cls is None:
        return decorate
    return decorate(cls)


def get_deployment_options(cls: type) -> DeploymentOptions:
    """The options of a class; defaults (named after the class) if it was not decorated.

    Only the class's own decoration counts: a subclass of a deployment is not
    that deployment.
    """
    if not inspect.isclass(cls):
        raise TypeError(f"Expected a class, got {type(cls).__name__}.")
    options = cls.__dict__.get(_OPTIONS_ATTR)
    if isinstance(options, DeploymentOptions):
        return options
    return DeploymentOptions(name=cls.__name__)


def is_deployment(cls: type) -> bool:
    """Whether ``cls`` itself was decorated with :func:`deployment`."""
    return inspect.isclass(cls) and isinstance(cls.__dict__.get(_OPTIONS_ATTR), DeploymentOptions)
