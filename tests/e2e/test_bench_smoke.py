"""Every script in bench/ runs at its smallest size: a smoke test, not a
measurement.

Nothing else runs the benchmarks, so a refactor that breaks one would go
unnoticed until someone benchmarks. Each script runs as its docstring says
(this interpreter, ``bench/NAME.py``) with arguments that make it do about a
second of work; its test asserts exit code 0 and a line of its report. The
scripts are subprocesses, ``PARALLEL`` at a time, all started by one module
fixture in the order of the tests (the slowest first), so the module costs
about their sum over ``PARALLEL``; each test waits for its own script.

Skipped, with the reason: ``bench_peer.py`` where the shared peer harness
is not beside the repository (a clean clone) or curl is missing, and
``bench_ray_launcher.py`` unless ``MUXGATE_BENCH_SMOKE_RAY=1`` (a Ray
cluster's start alone takes longer than this whole module should).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from storage_servers import free_port

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
#: scripts running at once (the CI machine has 2 cores; the scripts also wait
#: on process starts and replies)
PARALLEL = 3
#: one script's bound; the module's per-test timeout is above it
SCRIPT_TIMEOUT_S = 300

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)]


@functools.cache
def peer_unavailable() -> str | None:
    """Why bench_peer.py cannot run here, or None. Asks the script where it
    looks for the harness (next to the repository, or to the main checkout
    of a worktree)."""
    spec = importlib.util.spec_from_file_location("bench_peer", BENCH / "bench_peer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    peer: Path = module.PEER
    if not (peer / "loadgen.py").is_file():
        return f"the shared peer harness is not at {peer} (a clean clone has none)"
    if shutil.which("curl") is None:
        return "bench_peer.py's muxgate hook needs curl"
    return None


@functools.cache
def ray_unwanted() -> str | None:
    if os.environ.get("MUXGATE_BENCH_SMOKE_RAY") != "1":
        return (
            "starts a Ray cluster (tens of seconds on 2 cores, over this module's budget); "
            "MUXGATE_BENCH_SMOKE_RAY=1 runs it"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Smoke:
    """How one script runs small: its arguments, split as a shell would
    (``{tmp}``: a fresh folder, ``{port}``: a free port), the regular
    expressions its stdout matches (each somewhere, ``re.MULTILINE``) and
    why it cannot run here, if it cannot."""

    args: str
    expect: tuple[str, ...]
    unavailable: Callable[[], str | None] = lambda: None


# Slowest first (measured on a busy host), so the fixture starts them first.
SCRIPTS: dict[str, Smoke] = {
    "bench_peer": Smoke(
        "--systems muxgate --runs 1 --requests 40 --no-noop -n 4 -k 2 -r 1 --quiet 1"
        " --port {port} --models {tmp}",
        (r"^# muxgate run 1: [\d.]+ req/s",),
        peer_unavailable,
    ),
    "bench_ray_launcher": Smoke("--requests 3 --rounds 1", (r"^mlp: ray/local p50",), ray_unwanted),
    "bench_two_gateways": Smoke(
        "--models 4 --clients 2 --requests 3 --setups two", (r"^\{'setup': 'two', .*'ok': 6,",)
    ),
    "bench_hostile": Smoke(
        "--poison-requests 1 --seconds 0.1 --leak-requests 1 --leak-mb 1",
        (r"^\{'quarantine': True, 'poison'", r"^\{'limit_mib': 512, "),
    ),
    "bench_warm_scaling": Smoke(
        "--app sized --models 4 --clients 2 --window 0.3",
        (r"^warming: off$", r"^warming: on$", r"^\{'window': 'after 3 -> 2'"),
    ),
    "bench_cold_start": Smoke(
        "--runs 1 --mode spawn --hidden 16 --models 1 --burst 6 --hold 1 --max-replicas 2",
        (r"^scale_up_2nd +\d+",),
    ),
    "bench_warm_from_zero": Smoke(
        "--models 4 --requests 8 --k 2 --width 16 --rounds 1",
        (r"^on: waking request median \d+ ms",),
    ),
    "bench_edge": Smoke(
        "all --clients 2 --header-mib 0.1 --unknown 3 --unauthorized 3",
        (r"^logs: 3 unknown-model 404s",),
    ),
    "bench_gateway": Smoke(
        "--seconds 0.2 --concurrency 1 --only gateway,replica-direct",
        (r"^c=1: gateway adds [\d.]+ ms p50 over replica-direct",),
    ),
    "bench_byte_budget": Smoke(
        "--models 5 --budget-mib 9", (r"^peak resident model bytes: .* within",)
    ),
    "bench_handles": Smoke("--calls 5 --rounds 1", (r"^handle +5 ",)),
    "bench_replica_protocol": Smoke(
        "--calls 20 --loops asyncio --transports unix --max-seconds 2",
        (r"^unix +asyncio +handle +32 ",),
    ),
    "bench_storage": Smoke("--skip-remote --sizes 1 --rounds 1", (r"^ +1 MB: +[\d.]+ ms -> ",)),
    "bench_loader": Smoke("--reps 2", (r'"bench": "loader"',)),
    "bench_routing_sim": Smoke("--quick --requests 200 --seeds 1 --scenario hot", (r"^wall time",)),
    "bench_tail_floor": Smoke("--requests 400 --seeds 1", (r"^\| threads \| \d+ \|",)),
    "bench_router": Smoke("--decisions 500 --models 500 --replicas 10", (r"^ +10 +[\d.]+ ",)),
    "bench_metrics": Smoke("--calls 500 --repeats 1", (r"observe_request +\d+",)),
    "bench_write_path": Smoke("--frames 100 --repeat 1", (r"^_write \(now\) +[\d.]+",)),
    "bench_cache_hit": Smoke("--calls 500", (r"^hit inside a request \(pins\) +[\d.]+",)),
}


@dataclasses.dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_script(name: str, tmp: Path) -> Ran:
    tmp.mkdir()
    args = [a.format(tmp=tmp, port=free_port()) for a in shlex.split(SCRIPTS[name].args)]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH / f"{name}.py"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        out, err = (
            b.decode(errors="replace") if isinstance(b, bytes) else b or ""
            for b in (exc.stdout, exc.stderr)
        )
        return Ran(-1, out, f"{err}\n(killed after {SCRIPT_TIMEOUT_S} s)", SCRIPT_TIMEOUT_S)
    return Ran(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def launched(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Ran]]]:
    """The scripts this session's selected tests want, started in test order."""
    wanted = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None:
            name = callspec.params.get("script")
            if name in SCRIPTS and SCRIPTS[name].unavailable() is None:
                wanted.append(name)
    root = tmp_path_factory.mktemp("bench")
    with ThreadPoolExecutor(PARALLEL, thread_name_prefix="bench-smoke") as pool:
        yield {name: pool.submit(run_script, name, root / name) for name in wanted}


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_every_bench_script_has_a_smoke_run() -> None:
    assert {p.stem for p in BENCH.glob("bench_*.py")} == set(SCRIPTS)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_bench_script_runs_small(script: str, launched: dict[str, Future[Ran]]) -> None:
    smoke = SCRIPTS[script]
    reason = smoke.unavailable()
    if reason is not None:
        pytest.skip(reason)
    ran = launched[script].result()
    report = f"stdout:\n{tail(ran.stdout)}\nstderr:\n{tail(ran.stderr)}"
    assert ran.returncode == 0, f"{script} exited {ran.returncode} ({ran.seconds:.0f} s)\n{report}"
    for expect in smoke.expect:
        assert re.search(expect, ran.stdout, re.MULTILINE), (
            f"{script}: no match for {expect!r} in its report\n{report}"
        )
    print(f"{script}: {ran.seconds:.1f} s")
