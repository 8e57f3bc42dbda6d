"""muxgate.replicas: the user SDK, and the code that runs inside a replica process."""

from muxgate.replicas._context import get_multiplexed_model_id

__all__ = ["get_multiplexed_model_id"]
