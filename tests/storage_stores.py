"""One storage root per backend for tests: a fresh root, a writer, options.

    @pytest.fixture(params=STORES)
    def store(request, tmp_path):
        with open_store(request.param, request, tmp_path) as store:
            yield store

The servers behind ``s3``, ``gs`` and ``http`` are the session fixtures of
tests/conftest.py (started once, on 127.0.0.1); each store writes below a
fresh prefix of its own.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from storage_servers import BUCKET, GcsServer, HttpFiles, S3Server

from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig

#: Every backend a store can be opened on.
STORES = ["file", "memory", "s3", "gs", "http"]


@dataclass
class Store:
    """One backend under test: a fresh root, a writer and matching options.

    Attributes:
        name: The backend (one of ``STORES``).
        root: The root URL to load from.
        put: Writes bytes at a ``/``-separated key below the root.
        cached: Whether loads go through the disk cache (remote backends).
    """

    name: str
    root: str
    put: Callable[[str, bytes], None]
    storage_options: dict[str, Any]
    config: StorageConfig
    cached: bool

    def kwargs(self) -> dict[str, Any]:
        return {"storage_options": self.storage_options, "config": self.config}


def store_config(tmp_path: Path) -> StorageConfig:
    """A disk cache below ``tmp_path``, quick retries, 1 MiB parts (so that a
    few-MB file is a real multi-part ranged download)."""
    return StorageConfig(
        cache=CacheConfig(directory=tmp_path / "cache", max_bytes=1 << 30),
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, deadline=10),
        part_size=1 << 20,
        concurrency=4,
    )


@contextlib.contextmanager
def open_store(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh :class:`Store` on backend ``name`` for the block."""
    prefix = uuid.uuid4().hex
    config = store_config(tmp_path)
    if name == "file":
        folder = tmp_path / "models"

        def put_file(key: str, data: bytes) -> None:
            target = folder.joinpath(*key.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        yield Store(name, folder.as_uri(), put_file, {}, config, cached=False)
    elif name == "memory":
        fs = fsspec.filesystem("memory")
        root = f"memory://muxgate-test-{prefix}"
        yield Store(
            name, root, lambda key, data: fs.pipe_file(f"{root}/{key}", data), {}, config, False
        )
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif name == "http":
        web: HttpFiles = request.getfixturevalue("http_server")
        yield Store(
            name,
            f"{web.endpoint}/{prefix}",
            lambda key, data: web.put(f"{prefix}/{key}", data),
            {},
            config,
            cached=True,
        )
    else:
        server: S3Server | GcsServer = request.getfixturevalue(
            "s3_server" if name == "s3" else "gcs_server"
        )
        yield Store(
            name,
            f"{name}://{BUCKET}/{prefix}",
            lambda key, data: server.put(BUCKET, f"{prefix}/{key}", data),
            server.storage_options,
            config,
            cached=True,
        )
