"""CPU budgets: the ``num_cpus`` option and config field, the thread count
and environment a budget gives a replica, the host's cores from affinity
and cgroup v2 quotas, and the one warning when budgets oversubscribe them."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from muxgate.gateway._config import parse_config
from muxgate.gateway._errors import ConfigError
from muxgate.gateway.launchers._processes import (
    CpuBudgets,
    cgroup_cpu_limit,
    parse_cpu_max,
    usable_cores,
)
from muxgate.replicas import deployment, get_deployment_options
from muxgate.replicas._cpu import cpu_budget_env, thread_count_for


@pytest.mark.parametrize(
    ("num_cpus", "threads"), [(0.01, 1), (0.5, 1), (1, 1), (1.0, 1), (1.5, 2), (2, 2), (7.2, 8)]
)
def test_threads_are_the_budget_rounded_up(num_cpus: float, threads: int) -> None:
    assert thread_count_for(num_cpus) == threads
    assert cpu_budget_env(num_cpus) == {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
    }


def test_deployment_num_cpus_default_and_fractions() -> None:
    @deployment
    class Default:
        pass

    @deployment(num_cpus=0.25)
    class Quarter:
        pass

    @deployment(num_cpus=2)
    class Two:
        pass

    assert get_deployment_options(Default).num_cpus == 1.0
    assert get_deployment_options(Quarter).num_cpus == 0.25
    assert get_deployment_options(Two).num_cpus == 2.0
    assert type(get_deployment_options(Two).num_cpus) is float


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "num_cpus must be a finite number above 0, got 0."),
        (-1.5, ValueError, "num_cpus must be a finite number above 0, got -1.5."),
        (math.inf, ValueError, "num_cpus must be a finite number above 0, got inf."),
        (math.nan, ValueError, "num_cpus must be a finite number above 0, got nan."),
        ("2", TypeError, "num_cpus must be a number, got str."),
        (True, TypeError, "num_cpus must be a number, got bool."),
    ],
)
def test_deployment_num_cpus_is_validated(value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        deployment(num_cpus=value)


def test_config_num_cpus() -> None:
    config = parse_config(
        {
            "deployments": [
                {"name": "A", "import_path": "m:A"},
                {"name": "B", "import_path": "m:B", "route_prefix": "/b", "num_cpus": 0.5},
                {"name": "C", "import_path": "m:C", "route_prefix": "/c", "num_cpus": 3},
            ]
        }
    )
    assert [d.num_cpus for d in config.deployments] == [None, 0.5, 3.0]


@pytest.mark.parametrize(
    ("value", "why"),
    [(0, "> 0"), (-1, "> 0"), ("two", "Expected `float | null`"), (math.inf, "finite")],
)
def test_config_num_cpus_is_validated(value: Any, why: str) -> None:
    data = {"deployments": [{"name": "M", "import_path": "m:C", "num_cpus": value}]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="app.yaml")
    message = str(info.value)
    assert "$.deployments[0]" in message
    assert why in message


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("50000 100000", 0.5),
        ("200000 100000", 2.0),
        ("", None),
        ("garbage", None),
        ("0 100000", None),
        ("x 100000", None),
    ],
)
def test_parse_cpu_max(text: str, cores: float | None) -> None:
    assert parse_cpu_max(text) == cores


def test_cgroup_limit_is_the_tightest_quota_up_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "pods" / "gw"
    leaf.mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "pods" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("300000 100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("1:cpu:/\n0::/pods/gw\n")
    assert cgroup_cpu_limit(str(proc), str(root)) == 1.5
    (root / "pods" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(proc), str(root)) == 3.0
    # cgroup v1 only (no "0::" line), or no such file: no quota known.
    proc.write_text("4:cpu:/x\n")
    assert cgroup_cpu_limit(str(proc), str(root)) is None
    assert cgroup_cpu_limit(str(tmp_path / "missing"), str(root)) is None


def test_usable_cores_is_at_most_the_affinity() -> None:
    cores = usable_cores()
    assert 0 < cores <= len(os.sched_getaffinity(0))


def test_oversubscription_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    budgets = CpuBudgets(cores=2.0)
    with caplog.at_level(logging.WARNING, logger="muxgate.gateway.launcher"):
        assert not budgets.add("a#1", 1.0)
        assert not budgets.add("a#2", 1.0)  # exactly the cores: fine
        assert repr(budgets) == "<CpuBudgets 2/2 cores, 2 replicas>"
        assert budgets.add("b#1", 0.5)
        budgets.remove("b#1")
        assert not budgets.add("b#2", 4.0)  # warned already
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "add up to 2.5" in warnings[0].getMessage()
    assert "2 cores" in warnings[0].getMessage()
    assert budgets.total == 6.0
