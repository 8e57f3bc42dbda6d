"""Deployments that cannot start, for the fail-fast and ``muxgate check`` tests."""

from __future__ import annotations


class InitRaises:
    def __init__(self) -> None:
        raise RuntimeError("model registry unreachable (raised on purpose)")


class Fine:
    async def __call__(self, request: object) -> str:
        return "fine"
