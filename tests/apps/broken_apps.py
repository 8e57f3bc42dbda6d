"""Deployments that cannot start, for the fail-fast and ``muxgate check`` tests."""

from __future__ import annotations

import os


class InitRaises:
    def __init__(self) -> None:
        raise RuntimeError("model registry unreachable (raised on purpose)")


class Fine:
    async def __call__(self, request: object) -> str:
        return "fine"


class FailsWhenFlagged:
    """Starts unless the file ``flag`` exists: a deployment that starts, then
    cannot start its replacements."""

    def __init__(self, flag: str) -> None:
        if os.path.exists(flag):
            raise RuntimeError(f"{flag} exists: refusing to start (on purpose)")

    async def __call__(self, request: object) -> str:
        return "up"


class ExitsInInit:
    """Exits as a script run without its arguments would (argparse does this)."""

    def __init__(self) -> None:
        raise SystemExit("no config given (exits on purpose)")


class MisusesTheSdk:
    """``__init__`` makes the SDK raise: the failure's innermost frames are
    muxgate's, but the user's code is in its traceback."""

    def __init__(self) -> None:
        from muxgate.replicas import multiplexed

        multiplexed(max_num_models_per_replica="three")  # type: ignore[call-overload]
