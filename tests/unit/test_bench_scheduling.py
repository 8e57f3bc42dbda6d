"""The scheduling models behind docs/benchmarks.md's "What the closed-loop p99
target asks of a schedule": ``bench/bench_tail_floor.py``'s simulated
schedules, and ``bench/bench_loader.py --beside`` (a load beside another
thread of its process)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the scripts import _common from their folder
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def floor() -> ModuleType:
    return _bench("bench_tail_floor")


def test_without_queueing_a_request_takes_its_own_cpu(floor: ModuleType) -> None:
    costs = floor.Costs(miss_rate=0.0, load_ms=6.0, hit_ms=0.3, data_plane_ms=1.0)
    for policy in ("fifo", "shared"):
        result = floor.simulate(policy, costs, clients=2, cores=2, requests=500)
        assert result.p50_ms == pytest.approx(1.3)
        assert result.p99_ms == pytest.approx(1.3)
        assert result.rps == pytest.approx(2 / 1.3 * 1000, rel=0.01)


def test_a_work_conserving_schedule_runs_the_cores_full(floor: ModuleType) -> None:
    costs = floor.Costs(miss_rate=0.25, load_ms=6.0, hit_ms=0.3, data_plane_ms=1.1)
    mean_cpu = 1.1 + 0.3 + 0.25 * 6.0
    for policy in ("fifo", "shared"):
        result = floor.simulate(policy, costs, clients=8, cores=2, requests=20_000)
        assert result.rps == pytest.approx(2 / mean_cpu * 1000, rel=0.03)
        # Little's law: the closed loop's mean latency is clients / throughput
        assert result.mean_ms == pytest.approx(8 / result.rps * 1000, rel=0.03)


def test_sharing_the_cores_trades_the_median_for_the_tail(floor: ModuleType) -> None:
    costs = floor.Costs(miss_rate=0.25, load_ms=6.0, hit_ms=0.3, data_plane_ms=1.1)
    fifo = floor.simulate("fifo", costs, requests=20_000)
    shared = floor.simulate("shared", costs, requests=20_000)
    assert shared.p50_ms < fifo.p50_ms / 1.5
    assert shared.p99_ms > fifo.p99_ms * 1.1


def test_a_serving_thread_at_the_loads_weight_lengthens_the_tail(floor: ModuleType) -> None:
    costs = floor.Costs(miss_rate=0.25, load_ms=6.0, hit_ms=0.77, data_plane_ms=0.64)
    loads_first = floor.simulate("threads", costs, requests=20_000, serving_weight=0.1)
    one_priority = floor.simulate("threads", costs, requests=20_000, serving_weight=1.0)
    assert loads_first.p99_ms < one_priority.p99_ms / 1.3
    assert one_priority.p50_ms < loads_first.p50_ms


def test_water_fill_shares_by_weight_at_most_a_core_each(floor: ModuleType) -> None:
    a, b, c = object(), object(), object()
    shares = dict((id(r), share) for r, share in floor._water_fill([(a, 1.0), (b, 0.1)], 1))
    assert shares[id(a)] == pytest.approx(1 / 1.1)
    assert shares[id(b)] == pytest.approx(0.1 / 1.1)
    shares = dict((id(r), x) for r, x in floor._water_fill([(a, 1.0), (b, 1.0), (c, 1.0)], 2))
    assert all(x == pytest.approx(2 / 3) for x in shares.values())
    assert floor._water_fill([(a, 1.0)], 2) == [(a, 1.0)]
    shares = dict((id(r), x) for r, x in floor._water_fill([(a, 1.0), (b, 0.1), (c, 0.1)], 2))
    assert shares[id(a)] == pytest.approx(1.0)
    assert shares[id(b)] == pytest.approx(0.5)


def test_an_unknown_policy_is_refused(floor: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown policy 'lifo'"):
        floor.simulate("lifo", floor.Costs(), requests=10)


def test_beside_times_both_recipes_beside_every_neighbour(tmp_path: Path) -> None:
    loader = _bench("bench_loader")
    results = loader.beside(str(tmp_path), reps=1, burst_ms=0.3, period_ms=1.0)
    assert next(iter(results)) == "alone"
    assert len(results) == 5
    for rows in results.values():
        assert set(rows) == {"random+copy", "meta+assign+mmap"}
        assert all(row["cpu_p50"] > 0 for row in rows.values())
