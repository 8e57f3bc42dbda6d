"""muxgate.backends: model storage through fsspec, and model file formats."""

__all__: list[str] = []
