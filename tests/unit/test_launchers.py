"""Launchers by kind (lazy imports, actionable errors) and the interface check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muxgate.gateway import launchers
from muxgate.gateway.launchers import (
    Launcher,
    LauncherNotFoundError,
    ReplicaReporter,
    can_create,
    get_launcher_class,
    register_launcher,
)
from muxgate.gateway.launchers.local import LocalLauncher


@pytest.fixture
def registry() -> Iterator[None]:
    """Registrations made by a test are gone after it."""
    known = {k: dict(v) for k, v in launchers.known_launchers.items()}
    loaded = dict(launchers._registry)
    yield
    launchers.known_launchers.clear()
    launchers.known_launchers.update(known)
    launchers._registry.clear()
    launchers._registry.update(loaded)


class Fixed:
    """Reports replicas, cannot create them."""

    async def ready_replicas(self, deployment: str) -> list[Any]:
        return []

    async def aclose(self) -> None:
        pass


def test_local_is_the_built_in_kind_and_creates_replicas(tmp_path: Path) -> None:
    cls = get_launcher_class("local")
    assert cls is LocalLauncher
    launcher = cls(fork_server=False, socket_dir=tmp_path)
    assert isinstance(launcher, Launcher) and can_create(launcher)
    assert isinstance(Fixed(), ReplicaReporter) and not can_create(Fixed())  # type: ignore[arg-type]


def test_unknown_kinds_name_the_known_ones(registry: None) -> None:
    known = r"\(known: local, ray, static\)"
    with pytest.raises(LauncherNotFoundError, match=rf"no launcher of kind 'pods' {known}"):
        get_launcher_class("pods")


def test_a_kind_is_imported_only_when_asked_for(registry: None) -> None:
    register_launcher("fixed", f"{__name__}.Fixed")
    assert "fixed" not in launchers._registry
    assert get_launcher_class("fixed") is Fixed
    launchers.known_launchers["pods"] = {
        "class": "muxgate_pods_not_installed.PodLauncher",
        "err": "install muxgate-pods to start replicas as pods",
    }
    with pytest.raises(LauncherNotFoundError, match="install muxgate-pods"):
        get_launcher_class("pods")
    with pytest.raises(ValueError, match="already registered"):
        register_launcher("local", Fixed)
    register_launcher("local", Fixed, clobber=True)
    assert get_launcher_class("local") is Fixed


def test_the_ray_kind_without_ray_says_what_to_install(
    registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "muxgate.gateway.launchers.ray", raising=False)
    launchers._registry.pop("ray", None)
    with pytest.raises(LauncherNotFoundError, match=r"Install muxgate\[ray\]"):
        get_launcher_class("ray")
