"""muxgate.gateway: the HTTP edge: Litestar app, router, replica pool, autoscaler, CLI."""

__all__: list[str] = []
