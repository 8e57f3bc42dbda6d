"""End-to-end peer benchmark: muxgate against Ray Serve on Ray's own
model-multiplexing workload, through the shared peer harness.

The harness lives next to the repository, in ``../shared/peer-bench`` (from
the repository root): a system-agnostic load generator (``loadgen.py``), a
model writer (``make_models.py``, ~4 MB torch MLPs), a cache simulator
(``cache_sim.py``) and deploy hooks that start each system with empty
caches (``muxgate_hook.sh`` runs ``muxgate serve`` from this repository's
``.venv``; ``ray_hook.sh`` deploys the same app on a loopback-only Ray
cluster, ``ray_cluster.sh``). Both systems serve the same deployment code.

What it does, every step bounded and on 127.0.0.1 only:

1. writes the models (once) with ``make_models.py``;
2. measures the costs of the CPU limit in this process, one thread (each
   replica's budget): a model load as the apps do it and a forward pass
   (a hit), thread CPU time, median of 30;
3. for each run, for each system in turn (Ray first, then muxgate, then
   Ray again...): deploys with empty caches, waits up to 30 s for the host
   to be quiet (``--wait-quiet``, other jobs share the cores: the busy
   fraction before the run is recorded), runs ``loadgen.py`` on the same
   seeded id sequence, and probes the front process's ``/-/healthz`` every
   50 ms during the run (its latency is how long the gateway's event loop
   makes a trivial request wait while the replicas burn the CPU);
4. once per system, the same with the no-op app (``noop``: no model), which
   gives the data plane's CPU per request (everything but model work:
   front process, replica framework, client);
5. runs ``cache_sim.py`` on the same id sequence.

It prints one table: req/s, latency p50/p99, hit rate, loads, CPU-ms per
request by process group (front = muxgate's gateway or Ray's proxy;
replicas; Ray's control processes; the load generator), the simulator's
hash + LRU and static-optimum hit rates, and the CPU limit of each run::

    limit = cores / (data-plane CPU + hit rate x hit cost + miss rate x load cost)

with every cost measured as above; for muxgate also the same limit with the
load cost its replicas measured during the run (``muxgate_model_load_cpu_seconds_total``
over ``muxgate_model_loads_total``: a load sharing its core costs more than
one in this process's quiet loop); and the same limit on the cores that
other jobs left free during the run (their CPU is the host's busy time that
neither the system nor the load generator used). Raw JSON lines go to ``--out``.
For muxgate each run's line also gives what its gateway counted: requests
that joined a load under way, requests sent past their model's home
replica, and calls that waited out a load step (``hits_wait_for_loads``).

The data-plane CPU comes from the no-op run. With ``--no-noop`` it comes
from ``--data-plane-ms`` (``1.2`` for every system, or ``muxgate=1.2,ray=5``)
or else from the last no-op run of an earlier invocation with the same
``--out``, which saves what it measured to ``<out>.data-plane.json``; the
table's "data plane" column says which source each row used.

``--loader recipe`` runs both systems' apps with the load recipe of
docs/benchmarks.md ("Model load recipe": the network built on the ``meta``
device, ``torch.load(mmap=True)``, ``load_state_dict(assign=True)``)
instead of the harness's loader (random initialisation, then a copy of
every weight). The harness is read-only, so the run uses a copy of it in a
temporary folder with those three lines changed in ``muxgate_app.py`` and
``ray_app.py``; everything else (load generator, models, hooks) is the
harness's own. The load cost of the CPU limit is then measured the same way.

``--spill never`` (or ``bounded_load``; default: the config's default,
``priced``) sets muxgate's ``routing.spill``: ``never`` is the "no spills"
reference, at the same ``--max-ongoing`` as the run it is compared with.
``--eviction-policy tinylfu`` (or ``lru``, the default) sets muxgate's
``eviction_policy``, ``--hits-wait-for-loads false`` (or ``true``, the
default) its ``hits_wait_for_loads``, ``--pin-cpus`` its ``pin_cpus:
true``. The shared hook writes a fixed app
config (and the harness is read-only), so for any of these options the hook
is pointed at a one-file ``muxgate`` shim that adds the fields to that
config and then runs this repository's ``muxgate``.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_peer.py \\
        --ray-venv /tmp/raybench-venv --runs 3

Without ``--ray-venv`` (or ``/tmp/raybench-venv`` missing) only muxgate
runs. The benchmark is not a test: it takes minutes, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _find_peer() -> Path:
    """``../shared/peer-bench`` from the repository root; in a git worktree,
    from the main checkout's root too."""
    candidates = [REPO]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        common = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        candidates.append(Path(common).parent)
    for root in candidates:
        peer = (root / ".." / "shared" / "peer-bench").resolve()
        if (peer / "loadgen.py").is_file():
            return peer
    return (REPO / ".." / "shared" / "peer-bench").resolve()


PEER = _find_peer()
DEFAULT_RAY_VENV = Path("/tmp/raybench-venv")
LOADGEN_TIMEOUT_S = 300.0
HOOK_TIMEOUT_S = 240.0


def peer_dir() -> Path:
    if not (PEER / "loadgen.py").is_file():
        sys.exit(
            f"bench_peer: the shared peer harness is not at {PEER} "
            "(expected ../shared/peer-bench next to the repository, with loadgen.py, "
            "make_models.py, cache_sim.py and the deploy hooks)"
        )
    return PEER


# -- costs measured in this process ---------------------------------------------


def measure_costs(root: Path, reps: int = 30, *, recipe: bool = False) -> dict[str, float]:
    """Thread-CPU ms of one model load (as the apps load: build, torch.load,
    load_state_dict, eval; with ``recipe``, as ``--loader recipe`` makes them
    load) and of one forward pass on the fixed input."""
    import torch

    sys.path.insert(0, str(PEER))
    from make_models import build_mlp, fixed_input  # type: ignore[import-not-found]

    torch.set_num_threads(1)
    arch = json.loads((root / "manifest.json").read_text())["arch"]
    x = fixed_input(arch["in_dim"])
    loads: list[float] = []
    hits: list[float] = []
    for i in range(reps + 1):
        path = root / str(1 + i % 20) / "model.pt"
        c0 = time.thread_time()
        if recipe:
            with torch.device("meta"):
                model = build_mlp(**arch)
            model.load_state_dict(torch.load(path, weights_only=True, mmap=True), assign=True)
        else:
            model = build_mlp(**arch)
            model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        c1 = time.thread_time()
        with torch.inference_mode():
            model(x)
        c2 = time.thread_time()
        if i:  # the first of each is a warm-up
            loads.append((c1 - c0) * 1000)
            hits.append((c2 - c1) * 1000)
    return {
        "load_cpu_ms": round(statistics.median(loads), 3),
        "hit_cpu_ms": round(statistics.median(hits), 3),
    }


#: ``--loader recipe``: (pattern, replacement) for the harness apps' loader
#: lines, each of which must match exactly once in each app
_RECIPE_EDITS: tuple[tuple[str, str], ...] = (
    (
        r"^(?P<indent>[ ]*)model = build_mlp\(\*\*self\.arch\)$",
        '\\g<indent>with torch.device("meta"):\n\\g<indent>    model = build_mlp(**self.arch)',
    ),
    # (in code, not ray_app's docstring, which quotes the call)
    (r"(?<= )weights_only=True\)", "weights_only=True, mmap=True)"),
    (r"model\.load_state_dict\(state\)", "model.load_state_dict(state, assign=True)"),
)


def recipe_harness(peer: Path) -> Path:
    """A copy of the harness whose two apps load with the load recipe."""
    copy = Path(tempfile.mkdtemp(prefix="peer-recipe-", dir=tempfile.gettempdir()))
    shutil.copytree(peer, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("results"))
    for app in ("muxgate_app.py", "ray_app.py"):
        text = (copy / app).read_text()
        for pattern, replacement in _RECIPE_EDITS:
            text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
            if count != 1:
                shutil.rmtree(copy, ignore_errors=True)
                sys.exit(
                    f"bench_peer: --loader recipe expects one match of {pattern!r} in "
                    f"{peer / app}, found {count}: the harness's loader changed"
                )
        (copy / app).write_text(text)
    return copy


# -- systems ------------------------------------------------------------------


class System:
    name = ""

    def __init__(self, root: Path, port: int, max_ongoing: int) -> None:
        self.root = root
        self.port = port
        self.max_ongoing = max_ongoing

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ROOT": str(self.root),
            "PORT": str(self.port),
            "MAX_ONGOING": str(self.max_ongoing),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def deploy(self, app: str, k: int, replicas: int) -> None:
        raise NotImplementedError

    def watch_regex(self) -> str:
        """The system's processes by command line (other jobs on the host
        may run muxgate too: they are not ours)."""
        raise NotImplementedError

    def stop_app(self) -> None:
        """Stop serving (the two systems take turns on one port and two cores)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    @staticmethod
    def group(proc: str) -> str:
        """Process group of a loadgen ``watched_cpu_s`` name."""
        raise NotImplementedError


class Muxgate(System):
    name = "muxgate"

    def __init__(
        self,
        root: Path,
        port: int,
        max_ongoing: int,
        spill: str | None = None,
        eviction_policy: str | None = None,
        hits_wait_for_loads: bool | None = None,
        pin_cpus: bool = False,
    ) -> None:
        super().__init__(root, port, max_ongoing)
        self.spill = spill
        self.eviction_policy = eviction_policy
        self.hits_wait_for_loads = hits_wait_for_loads
        self.pin_cpus = pin_cpus

    def config_changes(self) -> dict[str, Any]:
        """The deployment fields the options set, as the app config spells them."""
        changes: dict[str, Any] = {}
        if self.spill is not None:
            changes["routing"] = {"spill": self.spill}
        if self.eviction_policy is not None:
            changes["eviction_policy"] = self.eviction_policy
        if self.hits_wait_for_loads is not None:
            changes["hits_wait_for_loads"] = self.hits_wait_for_loads
        if self.pin_cpus:
            changes["pin_cpus"] = True
        return changes

    def run_counters(self) -> dict[str, Any]:
        """What the gateway counted in the run just made (its metrics):

        - ``load_cpu_ms_in_run``: CPU-ms per load as the replicas measured it
          (their loaders' own code, on whichever thread ran it), None before
          any load;
        - ``joins``: requests that waited for a load of their model already
          under way (cache misses less loads);
        - ``past_home``: requests sent past their model's home replica
          (spills, and models held nowhere placed off their home);
        - ``step_waits``: calls that waited out a load step
          (``hits_wait_for_loads``).
        """
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/metrics", timeout=10) as r:
            text = r.read().decode()
        totals = {
            family.name: sum(s.value for s in family.samples if s.name.endswith("_total"))
            for family in text_string_to_metric_families(text)
        }
        # the text format's counter family names drop their "_total"
        loads = totals.get("muxgate_model_loads", 0.0)
        cpu = totals.get("muxgate_model_load_cpu_seconds", 0.0)
        return {
            "load_cpu_ms_in_run": round(cpu / loads * 1000, 3) if loads else None,
            "joins": int(totals.get("muxgate_cache_misses", 0.0) - loads),
            "past_home": int(totals.get("muxgate_spillovers", 0.0)),
            "step_waits": int(totals.get("muxgate_load_step_waits", 0.0)),
        }

    def deploy(self, app: str, k: int, replicas: int) -> None:
        changes = self.config_changes()
        venv = self._shim_venv(changes) if changes else REPO / ".venv"
        env = {**self.env(), "MUXVENV": str(venv)}
        run([str(PEER / "muxgate_hook.sh"), app, str(k), str(replicas)], env)

    def _shim_venv(self, changes: dict[str, Any]) -> Path:
        """A folder whose ``bin/muxgate`` adds ``changes`` to every deployment
        of the hook's app config, then runs this repository's ``muxgate`` in
        its place."""
        # One per checkout: the shim names this checkout's muxgate.
        tag = hashlib.blake2b(str(REPO).encode(), digest_size=4).hexdigest()
        shim = Path(tempfile.gettempdir()) / "bench-peer" / f"config-shim-{tag}"
        (shim / "bin").mkdir(parents=True, exist_ok=True)
        real = REPO / ".venv" / "bin" / "muxgate"
        script = shim / "bin" / "muxgate"
        script.write_text(
            f"#!{REPO / '.venv' / 'bin' / 'python'}\n"
            "# written by bench/bench_peer.py (--spill, --eviction-policy,"
            " --hits-wait-for-loads, --pin-cpus)\n"
            "import json, os, sys, yaml\n"
            f"changes = json.loads({json.dumps(changes)!r})\n"
            "if sys.argv[1:2] == ['serve']:\n"
            "    with open(sys.argv[2]) as f:\n"
            "        config = yaml.safe_load(f)\n"
            "    for deployment in config['deployments']:\n"
            "        for key, value in changes.items():\n"
            "            if isinstance(value, dict):\n"
            "                deployment.setdefault(key, {}).update(value)\n"
            "            else:\n"
            "                deployment[key] = value\n"
            "    with open(sys.argv[2], 'w') as f:\n"
            "        yaml.safe_dump(config, f)\n"
            f"os.execv({str(real)!r}, [{str(real)!r}, *sys.argv[1:]])\n"
        )
        script.chmod(0o755)
        return shim

    def env(self) -> dict[str, str]:
        # The hook keeps its pid file and app under $TMPDIR/muxbench-work and
        # stops whatever that pid file names: a folder of our own, so it
        # never stops another job's server.
        folder = Path(tempfile.gettempdir()) / "bench-peer"
        folder.mkdir(exist_ok=True)
        return {**super().env(), "TMPDIR": str(folder)}

    def stop_app(self) -> None:
        run([str(PEER / "muxgate_hook.sh"), "stop"], self.env())

    def close(self) -> None:
        self.stop_app()

    def watch_regex(self) -> str:
        # Gateway, fork server and replicas run this repository's venv.
        return re.escape(str(REPO / ".venv" / "bin")) + "/"

    @staticmethod
    def group(proc: str) -> str:
        return "replicas" if "muxgate.replicas" in proc else "front"


class Ray(System):
    name = "ray"

    def __init__(self, root: Path, port: int, max_ongoing: int, venv: Path) -> None:
        super().__init__(root, port, max_ongoing)
        self.venv = venv
        self._started_cluster = False

    def env(self) -> dict[str, str]:
        # "auto" would find any other Ray cluster on the host; ours is on 6390.
        return {**super().env(), "VENV": str(self.venv), "RAY_ADDRESS": "127.0.0.1:6390"}

    def start_cluster(self) -> None:
        status = subprocess.run(
            [str(self.venv / "bin" / "ray"), "status", "--address", "127.0.0.1:6390"],
            env=self.env(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if status.returncode != 0:
            run([str(PEER / "ray_cluster.sh"), "start"], self.env())
            self._started_cluster = True

    def deploy(self, app: str, k: int, replicas: int) -> None:
        run([str(PEER / "ray_hook.sh"), app, str(k), str(replicas)], self.env())

    def watch_regex(self) -> str:
        return "ray::|gcs_server|raylet|" + re.escape(str(self.venv))

    def stop_app(self) -> None:
        python = str(self.venv / "bin" / "python")
        run([python, str(PEER / "ray_app.py"), "shutdown"], self.env())

    def close(self) -> None:
        with contextlib.suppress(SystemExit):
            self.stop_app()
        if self._started_cluster:
            run([str(PEER / "ray_cluster.sh"), "stop"], self.env())

    @staticmethod
    def group(proc: str) -> str:
        if proc.startswith("ray::ServeReplica"):
            return "replicas"
        if proc.startswith("ray::ProxyActor"):
            return "front"
        control = ("ray::", "gcs_server", "raylet", "log_monitor", "dashboard", "monitor.py")
        if any(c in proc for c in control) or "ray." in proc:
            return "control"
        return "other"


def run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=HOOK_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        sys.exit(f"bench_peer: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


# -- one measured run -----------------------------------------------------------


class HealthProbe:
    """GET /-/healthz every ``every_s`` in a thread; latencies in ms."""

    def __init__(self, port: int, every_s: float = 0.05) -> None:
        self.url = f"http://127.0.0.1:{port}/-/healthz"
        self.every_s = every_s
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.samples.append((time.perf_counter() - t0) * 1000)
            except OSError:
                self.failures += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[HealthProbe]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)

    def summary(self) -> dict[str, float | int | None]:
        s = sorted(self.samples)
        if not s:
            return {"n": 0, "failures": self.failures}
        return {
            "n": len(s),
            "p50": round(s[len(s) // 2], 2),
            "p99": round(s[min(len(s) - 1, int(0.99 * len(s)))], 2),
            "max": round(s[-1], 2),
            "failures": self.failures,
        }


def loadgen(
    python: str, system: System, args: argparse.Namespace, label: str, app: str
) -> dict[str, Any]:
    cmd = [
        python,
        str(PEER / "loadgen.py"),
        "--url",
        f"http://127.0.0.1:{system.port}/",
        "--system",
        system.name,
        "--label",
        label,
        "-n",
        str(args.n),
        "--dist",
        args.dist,
        "-s",
        str(args.zipf_s),
        "--requests",
        str(args.requests),
        "--duration",
        "170",
        "--seed",
        str(args.seed),
        "--watch-regex",
        system.watch_regex(),
        "--wait-quiet",
        str(args.quiet),
        "--wait-quiet-max",
        "30",
    ]
    cmd += ["--rate", str(args.rate)] if args.rate else ["-c", str(args.concurrency)]
    if app == "mux":
        cmd += ["--manifest", str(system.root / "manifest.json")]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=LOADGEN_TIMEOUT_S, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"bench_peer: loadgen failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def cpu_by_group(system: System, result: dict[str, Any]) -> dict[str, float]:
    """CPU-ms per OK request by process group, from one loadgen result."""
    ok = max(1, int(result["ok"]))
    groups = {"front": 0.0, "replicas": 0.0, "control": 0.0, "other": 0.0}
    for proc, usage in (result.get("watched_cpu_s") or {}).items():
        groups[system.group(proc)] += float(usage["cpu_s"])
    groups["client"] = float(result.get("client_cpu_s") or 0.0)
    # Other jobs on the host: busy CPU neither the client nor the system used.
    groups["other"] = float((result.get("host_cpu") or {}).get("unattributed_core_s") or 0.0)
    return {k: round(v * 1000 / ok, 2) for k, v in groups.items()}


def measured_run(
    python: str, system: System, args: argparse.Namespace, app: str, label: str
) -> dict[str, Any]:
    # A hook that finds another server on the port would measure that one.
    deadline = time.monotonic() + 60
    while not port_free(system.port):
        if time.monotonic() > deadline:
            sys.exit(f"bench_peer: 127.0.0.1:{system.port} still in use before {system.name}")
        time.sleep(0.5)
    system.deploy(app, args.k, args.replicas)
    probe = HealthProbe(system.port)
    try:
        with probe.running():
            result = loadgen(python, system, args, label, app)
        if isinstance(system, Muxgate) and app == "mux":
            result.update(system.run_counters())
    finally:
        system.stop_app()
    result["cpu_ms_per_request"] = cpu_by_group(system, result)
    result["healthz_ms_under_load"] = probe.summary()
    return result


# -- the table ------------------------------------------------------------------


def system_cpu_ms(cpu: dict[str, float]) -> float:
    """CPU per request of the system and its client (not other jobs)."""
    return cpu["front"] + cpu["replicas"] + cpu["control"] + cpu["client"]


def cpu_limit(
    cores: float, data_plane_ms: float, hit_rate: float, costs: dict[str, float]
) -> float:
    per_request = (
        data_plane_ms + hit_rate * costs["hit_cpu_ms"] + (1 - hit_rate) * costs["load_cpu_ms"]
    )
    return cores * 1000 / per_request


def parse_data_plane(value: str | None) -> dict[str, float]:
    """``--data-plane-ms``: ``1.2`` (every system, key ``*``) or ``muxgate=1.2,ray=5``."""
    if not value:
        return {}
    out: dict[str, float] = {}
    for part in value.split(","):
        name, _, ms = part.rpartition("=")
        try:
            out[name.strip() or "*"] = float(ms)
        except ValueError:
            sys.exit(f"bench_peer: --data-plane-ms {value!r}: expected MS or SYSTEM=MS,...")
    return out


def data_plane_file(out: Path | None) -> Path | None:
    """Where the last measured data-plane CPU is kept: next to ``--out``."""
    return None if out is None else out.with_name(out.name + ".data-plane.json")


def data_plane_ms(
    name: str, noop: dict[str, dict[str, Any]], given: dict[str, float], saved: dict[str, Any]
) -> tuple[float | None, str]:
    """The data-plane CPU-ms per request of system ``name`` and its source:
    this invocation's no-op run, ``--data-plane-ms``, or the saved file."""
    if name in noop:
        return system_cpu_ms(noop[name]["cpu_ms_per_request"]), "no-op run"
    for key in (name, "*"):
        if key in given:
            return given[key], "--data-plane-ms"
    if name in saved:
        return float(saved[name]["ms"]), f"saved {saved[name]['measured_at']}"
    return None, "none (no-op skipped)"


def row(
    result: dict[str, Any],
    limit: float | None,
    left: float | None = None,
    data_plane: str = "-",
    in_run: float | None = None,
) -> list[str]:
    cpu = result["cpu_ms_per_request"]
    lat = result["latency_ms"]
    probe = result["healthz_ms_under_load"] or {}
    return [
        result["system"],
        result["label"],
        f"{result['pre_run_host_busy']}",
        f"{result['throughput_rps']:.0f}",
        f"{lat['p50']:.1f} / {lat['p99']:.1f}" if lat else "- (no request answered)",
        f"{result['hit_rate']}",
        f"{result['loads']}",
        f"{result['errors']}",
        f"{cpu['front']} / {cpu['replicas']} / {cpu['control']} / {cpu['client']} ({cpu['other']})",
        f"{system_cpu_ms(cpu):.2f}",
        f"{limit:.0f} ({result['throughput_rps'] / limit:.0%})" if limit else "-",
        f"{in_run:.0f} ({result['throughput_rps'] / in_run:.0%}; a load"
        f" {result['load_cpu_ms_in_run']:.2f} ms)"
        if in_run
        else "-",
        f"{left:.0f} ({result['throughput_rps'] / left:.0%})" if left else "-",
        data_plane,
        f"{probe.get('p50')} / {probe.get('p99')}",
    ]


HEADER = [
    "system",
    "run",
    "host busy before",
    "req/s",
    "p50 / p99 ms",
    "hit rate",
    "loads",
    "errors",
    "CPU-ms/req front / replicas / control / client (other jobs)",
    "CPU-ms/req total",
    "CPU limit req/s (achieved)",
    "the same with the load's CPU measured in the run (achieved; load cost)",
    "limit on cores left by other jobs (achieved)",
    "data plane CPU-ms/req (source)",
    "healthz p50 / p99 ms",
]


def print_table(rows: list[list[str]]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def median_of(results: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in results]
    return float(statistics.median(values))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray-venv", type=Path, default=None, help="venv with ray[serve]")
    parser.add_argument("--systems", default="ray,muxgate")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("-n", type=int, default=20, help="models")
    parser.add_argument("--dist", choices=["zipf", "uniform"], default="zipf")
    parser.add_argument("-s", "--zipf-s", type=float, default=1.1)
    parser.add_argument("-k", type=int, default=4, help="models per replica")
    parser.add_argument("-r", "--replicas", type=int, default=2)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=None, help="open loop at this rate")
    parser.add_argument("--max-ongoing", type=int, default=5)
    parser.add_argument(
        "--spill",
        choices=["priced", "bounded_load", "never"],
        default=None,
        help="muxgate's routing.spill (default: the config's default); never: no spills",
    )
    parser.add_argument(
        "--eviction-policy",
        choices=["lru", "tinylfu"],
        default=None,
        help="muxgate's eviction_policy (default: the config's default, lru)",
    )
    parser.add_argument(
        "--hits-wait-for-loads",
        choices=["true", "false"],
        default=None,
        help="muxgate's hits_wait_for_loads (default: the config's default, true)",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="muxgate's pin_cpus: true (each replica on cores of its own; default false)",
    )
    parser.add_argument(
        "--loader",
        choices=["harness", "recipe"],
        default="harness",
        help="the apps' model loader: the harness's, or the load recipe (both systems)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quiet", type=float, default=0.3, help="host busy to wait for")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--models", type=Path, default=Path("/tmp/muxgate-peer-models"))
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op runs")
    parser.add_argument(
        "--data-plane-ms",
        default=None,
        help="with --no-noop: data-plane CPU-ms/req for the CPU limit (MS, or SYSTEM=MS,...);"
        " default: the last no-op run saved next to --out",
    )
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    given_data_plane = parse_data_plane(args.data_plane_ms)
    saved_path = data_plane_file(args.out)
    saved_data_plane: dict[str, Any] = {}
    if saved_path is not None and saved_path.is_file():
        saved_data_plane = json.loads(saved_path.read_text())
    global PEER
    peer_dir()
    recipe_copy = recipe_harness(PEER) if args.loader == "recipe" else None
    if recipe_copy is not None:
        PEER = recipe_copy
    try:
        return _main(args, given_data_plane, saved_path, saved_data_plane)
    finally:
        if recipe_copy is not None:
            shutil.rmtree(recipe_copy, ignore_errors=True)


def _main(
    args: argparse.Namespace,
    given_data_plane: dict[str, float],
    saved_path: Path | None,
    saved_data_plane: dict[str, Any],
) -> int:
    from muxgate.gateway.launchers._processes import usable_cores

    python = sys.executable  # the project venv has torch and aiohttp
    ray_venv = args.ray_venv or (DEFAULT_RAY_VENV if DEFAULT_RAY_VENV.is_dir() else None)
    wanted = args.systems.split(",")
    if "ray" in wanted and (ray_venv is None or not (ray_venv / "bin" / "ray").exists()):
        print("bench_peer: no Ray venv (--ray-venv); running muxgate only", file=sys.stderr)
        wanted = [w for w in wanted if w != "ray"]
    if not port_free(args.port):
        sys.exit(f"bench_peer: 127.0.0.1:{args.port} is in use; pick --port")
    if shutil.which("curl") is None:
        sys.exit("bench_peer: the muxgate hook needs curl")

    models = args.models
    manifest = models / "manifest.json"
    if not manifest.exists() or int(json.loads(manifest.read_text())["num_models"]) < args.n:
        run(
            [
                python,
                str(PEER / "make_models.py"),
                "--root",
                str(models),
                "-n",
                str(max(args.n, 20)),
            ],
            dict(os.environ),
        )
    costs = measure_costs(models, recipe=args.loader == "recipe")
    cores = usable_cores()
    sim_cmd = [python, str(PEER / "cache_sim.py"), "-n", str(args.n), "--dist", args.dist]
    sim_cmd += ["-s", str(args.zipf_s), "--seed", str(args.seed), "--requests", str(args.requests)]
    sim_cmd += ["-r", str(args.replicas), "-k", str(args.k)]
    sim_run = subprocess.run(sim_cmd, capture_output=True, text=True, timeout=120, check=True)
    sim = json.loads(sim_run.stdout)
    systems: dict[str, System] = {}
    if "ray" in wanted:
        assert ray_venv is not None
        systems["ray"] = Ray(models, args.port, args.max_ongoing, ray_venv)
    if "muxgate" in wanted:
        systems["muxgate"] = Muxgate(
            models,
            args.port,
            args.max_ongoing,
            args.spill,
            args.eviction_policy,
            None if args.hits_wait_for_loads is None else args.hits_wait_for_loads == "true",
            args.pin_cpus,
        )
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, {cores:g} usable, Python "
        f"{platform.python_version()}; N={args.n} {args.dist} s={args.zipf_s} "
        f"K={args.k} R={args.replicas} max_ongoing={args.max_ongoing} loader={args.loader} "
        + (f"spill={args.spill} " if args.spill else "")
        + (f"eviction_policy={args.eviction_policy} " if args.eviction_policy else "")
        + (f"hits_wait_for_loads={args.hits_wait_for_loads} " if args.hits_wait_for_loads else "")
        + ("pin_cpus=true " if args.pin_cpus else "")
        + (f"rate={args.rate}" if args.rate else f"c={args.concurrency}")
        + f" requests={args.requests} seed={args.seed}",
        flush=True,
    )
    print(f"# costs (thread CPU, 1 thread): {costs}", flush=True)
    print(
        f"# cache_sim: hash+LRU {sim['hit_rate']['hash']}, static optimum "
        f"{sim['static_opt_hit_rate']}, hash+LFU {sim['hit_rate']['hash_lfu']}, "
        f"hash+TinyLFU {sim['hit_rate']['hash_tinylfu']}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    noop: dict[str, dict[str, Any]] = {}
    try:
        if "ray" in systems:
            assert isinstance(systems["ray"], Ray)
            systems["ray"].start_cluster()
        if not args.no_noop:
            for name, system in systems.items():
                noop[name] = measured_run(python, system, args, "noop", "noop")
                print(f"# {name} no-op: {json.dumps(noop[name]['cpu_ms_per_request'])}", flush=True)
            if saved_path is not None:
                stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
                for name, result in noop.items():
                    ms = system_cpu_ms(result["cpu_ms_per_request"])
                    saved_data_plane[name] = {"ms": round(ms, 3), "measured_at": stamp}
                saved_path.write_text(json.dumps(saved_data_plane, indent=1) + "\n")
        for i in range(args.runs):
            for name, system in systems.items():
                result = measured_run(python, system, args, "mux", f"run {i + 1}")
                if isinstance(system, Muxgate):
                    result["spill"] = system.spill or "default"
                    result["eviction_policy"] = system.eviction_policy or "default"
                    wait = system.hits_wait_for_loads
                    result["hits_wait_for_loads"] = "default" if wait is None else wait
                    result["pin_cpus"] = system.pin_cpus
                results[name].append(result)
                print(
                    f"# {name} run {i + 1}: {result['throughput_rps']} req/s, p99 "
                    f"{(result['latency_ms'] or {}).get('p99', '-')} ms, "
                    f"hit {result['hit_rate']}, errors {result['errors']}, busy before "
                    f"{result['pre_run_host_busy']}"
                    + (
                        f", joins {result['joins']}, past home {result['past_home']}, "
                        f"step waits {result['step_waits']}"
                        if "joins" in result
                        else ""
                    ),
                    flush=True,
                )
    finally:
        for system in systems.values():
            system.close()
    rows: list[list[str]] = []
    for name, runs in results.items():
        dp, source = data_plane_ms(name, noop, given_data_plane, saved_data_plane)
        shown = f"{dp:.2f} ({source})" if dp is not None else source
        if name in noop:
            rows.append(row(noop[name], None, None, shown))
        for result in runs:
            limit = left = in_run = None
            if dp is not None and result["hit_rate"] is not None:
                limit = cpu_limit(cores, dp, result["hit_rate"], costs)
                if result.get("load_cpu_ms_in_run"):
                    measured = {**costs, "load_cpu_ms": result["load_cpu_ms_in_run"]}
                    in_run = cpu_limit(cores, dp, result["hit_rate"], measured)
                # The same on the cores other jobs left free during the run.
                others = result["cpu_ms_per_request"]["other"] * result["throughput_rps"] / 1000
                left = cpu_limit(max(0.1, cores - others), dp, result["hit_rate"], costs)
            result["cpu_limit_rps"] = round(limit, 1) if limit else None
            result["cpu_limit_left_rps"] = round(left, 1) if left else None
            result["cpu_limit_in_run_rps"] = round(in_run, 1) if in_run else None
            result["data_plane_ms"] = {"ms": dp, "source": source}
            rows.append(row(result, limit, left, shown, in_run))
    print_table(rows)
    # A run that answered no request has no latency: it shows in the table, not here.
    ray_runs, mux_runs = (
        [r for r in results.get(system, []) if r["latency_ms"]] for system in ("ray", "muxgate")
    )
    if ray_runs and mux_runs:
        rps = median_of(mux_runs, "throughput_rps") / median_of(ray_runs, "throughput_rps")
        p99 = statistics.median(r["latency_ms"]["p99"] for r in mux_runs) / statistics.median(
            r["latency_ms"]["p99"] for r in ray_runs
        )
        print(f"\nmedians, muxgate / ray: req/s {rps:.2f}x, p99 {p99:.2f}x")
        for a, b in zip(ray_runs, mux_runs, strict=False):
            print(
                f"  {b['label']}: req/s {b['throughput_rps'] / a['throughput_rps']:.2f}x, "
                f"p99 {b['latency_ms']['p99'] / a['latency_ms']['p99']:.2f}x"
            )
    if args.out:
        with args.out.open("a") as f:
            meta = {"costs": costs, "cores": cores, "sim": sim, "args": vars(args)}
            f.write(json.dumps({"bench": "peer", **meta}, default=str) + "\n")
            for result in [*noop.values(), *(r for runs in results.values() for r in runs)]:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
