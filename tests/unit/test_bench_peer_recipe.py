"""``bench_peer.py --loader recipe``: the copy of the harness whose two apps
load with the load recipe, made from a harness written here in the shape of
the shared one (its loader lines, and ray_app's docstring that quotes them);
and the deployment fields its muxgate options set."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

MUX_APP = '''"""muxgate side."""
import torch


class MuxModel:
    async def get_model(self, model_id: str):
        model = build_mlp(**self.arch)
        state = torch.load(os.path.join(self.root, model_id, "model.pt"), weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return model
'''

RAY_APP = '''"""Ray side: reads ROOT/<model_id>/model.pt (torch.load(weights_only=True))."""
import torch


def make_mux_deployment(k: int):
    class Mux:
        async def get_model(self, model_id: str):
            model = build_mlp(**self.arch)
            state = torch.load(os.path.join(self.root, model_id, "model.pt"),
                               weights_only=True)
            model.load_state_dict(state)
            return model
    return Mux
'''


@pytest.fixture(scope="module")
def bench_peer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peer", BENCH / "bench_peer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _harness(root: Path, mux: str = MUX_APP, ray: str = RAY_APP) -> Path:
    root.mkdir()
    (root / "muxgate_app.py").write_text(mux)
    (root / "ray_app.py").write_text(ray)
    (root / "loadgen.py").write_text("# the load generator, copied as it is\n")
    (root / "results").mkdir()
    (root / "results" / "old.json").write_text("{}")
    return root


def test_both_apps_load_with_the_recipe(bench_peer: ModuleType, tmp_path: Path) -> None:
    harness = _harness(tmp_path / "peer")
    copy = bench_peer.recipe_harness(harness)
    try:
        for app in ("muxgate_app.py", "ray_app.py"):
            text = (copy / app).read_text()
            compile(text, app, "exec")  # indentation kept
            assert 'with torch.device("meta"):' in text
            assert "weights_only=True, mmap=True)" in text
            assert "model.load_state_dict(state, assign=True)" in text
        ray = (copy / "ray_app.py").read_text()
        assert "(torch.load(weights_only=True))" in ray  # the docstring is left alone
        mux_lines = (copy / "muxgate_app.py").read_text().splitlines()
        built = mux_lines.index('        with torch.device("meta"):')
        assert mux_lines[built + 1] == "            model = build_mlp(**self.arch)"
        assert (copy / "loadgen.py").read_text() == (harness / "loadgen.py").read_text()
        assert not (copy / "results").exists()
        # the harness itself is read-only to the benchmark
        assert (harness / "muxgate_app.py").read_text() == MUX_APP
        assert (harness / "ray_app.py").read_text() == RAY_APP
    finally:
        shutil.rmtree(copy)


def test_a_changed_loader_is_refused_by_name(bench_peer: ModuleType, tmp_path: Path) -> None:
    changed = MUX_APP.replace(
        "model.load_state_dict(state)", "model.load_state_dict(state, strict=False)"
    )
    harness = _harness(tmp_path / "peer", mux=changed)
    before = set(Path(tempfile.gettempdir()).glob("peer-recipe-*"))
    with pytest.raises(SystemExit, match=r"load_state_dict.*found 0: the harness's loader changed"):
        bench_peer.recipe_harness(harness)
    assert set(Path(tempfile.gettempdir()).glob("peer-recipe-*")) == before  # no copy left


def test_the_muxgate_options_become_deployment_fields(bench_peer: ModuleType) -> None:
    plain = bench_peer.Muxgate(Path("/models"), 8400, 5)
    assert plain.config_changes() == {}
    tuned = bench_peer.Muxgate(Path("/models"), 8400, 5, "never", "tinylfu", False, True)
    assert tuned.config_changes() == {
        "routing": {"spill": "never"},
        "eviction_policy": "tinylfu",
        "hits_wait_for_loads": False,
        "pin_cpus": True,
    }
