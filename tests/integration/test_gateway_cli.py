"""The ``muxgate`` command: ``serve`` in the foreground starts, serves, stops
cleanly on SIGTERM/SIGINT with no replica left behind, and fails fast on a
deployment that cannot start; ``serve()`` cleans up too; ``check``,
``status``, ``--version`` and help."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from gateway_harness import MODEL, running_gateway
from processes import descendants
from waiting import wait_until_sync

from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import serve

APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))

pytestmark = pytest.mark.slow


def _gone(pids: list[int], within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _wait_for_url(log: Path, proc: subprocess.Popen[bytes], within_s: float = 60.0) -> str:
    """The URL from the "serving on" line the command writes to stderr (a file:
    a pipe nobody drains could block the replicas, which log to it too)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "serving on" in line:
                return line.strip().rsplit(" ", 1)[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"muxgate serve did not report its URL:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_runs_and_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(
        f"app_dir: {APPS}\n"
        "deployments:\n"
        "  - {name: Cli, import_path: 'gateway_apps:Echo1', num_replicas: 2}\n"
    )
    log = tmp_path / "stderr.log"
    stderr = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "muxgate.gateway._cli",
            "serve",
            str(config),
            "--port",
            "0",
            "--log-level",
            "WARNING",
        ],
        stderr=stderr,
    )
    try:
        url = _wait_for_url(log, proc)
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(f"{url}/x", headers={"serve_multiplexed_model_id": "7"}, timeout=30)
        assert r.status_code == 200
        assert r.json()["model"] == "7"
        assert httpx.get(f"{url}/-/healthz", timeout=10).status_code == 200
        # --log-level is the replicas' too: their INFO lines (written before
        # the answer) are not there; test_sigterm... sees them at INFO.
        assert "Loading model '7'." not in log.read_text()
        assert "Replica ready" not in log.read_text()
        processes = descendants(proc.pid)  # 2 replicas, and the fork server if any
        assert len(processes) in (2, 3)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert _gone(processes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_ctrl_c_before_serve_took_its_signals_is_a_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Ctrl-C while `serve` still reads its config: the config is a FIFO, so
    the command is held in that read, before any handler of its own, until
    the test sends SIGINT."""
    config = tmp_path / "app.yaml"
    os.mkfifo(config)
    # Python raises KeyboardInterrupt only where SIGINT is not ignored (a
    # background job's children inherit it ignored): the entry point, with
    # Python's own handler put back first.
    entry = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " from muxgate.gateway._cli import main; sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, "serve", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = -1

    def reader_opened() -> bool:  # a FIFO opens for writing once a reader has it
        nonlocal writer
        try:
            writer = os.open(config, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return proc.poll() is not None
        return True

    def blocked_reading() -> bool:
        # Open is not enough: a SIGINT between the open and the read is
        # handled at Python's next bytecode, which the read's C code does
        # not reach while it waits for data (it hung, now and then, under
        # load). Once open, the read is the only place it sleeps.
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] == "S"
        except OSError:
            return True  # no /proc: the open is all there is to wait for

    try:
        wait_until_sync(reader_opened, within_s=30, what="serve to open its config")
        assert writer >= 0, proc.communicate()[1]
        wait_until_sync(blocked_reading, within_s=30, what="serve to wait in the read")
        proc.send_signal(signal.SIGINT)  # it is blocked reading: nothing written
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert err == "muxgate: interrupted\n"
    finally:
        if writer >= 0:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`muxgate check ... | head -1`: the reader gone, the rest of the output
    is dropped without a BrokenPipeError traceback."""
    config = tmp_path / "app.yaml"
    config.write_text("deployments:\n  - {name: M, import_path: 'm:M', route_prefix: api/}\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the first write fails
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "muxgate.gateway._cli", "check", str(config)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


@pytest.mark.anyio
@pytest.mark.parametrize("given", ["AppConfig", "path", "mapping"])
async def test_serve_context_manager_leaves_no_process(tmp_path: Path, given: str) -> None:
    data = {
        "app_dir": APPS,
        "http": {"port": 0},
        "deployments": [{"name": "Ctx", "import_path": "gateway_apps:Echo1"}],
    }
    config: Any = data
    if given == "AppConfig":
        config = parse_config(data)
    elif given == "path":
        config = tmp_path / "app.yaml"
        config.write_text(yaml.safe_dump(data))
    async with serve(config) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/")
        assert r.status_code == 200
        pid = r.json()["pid"]
    assert _gone([pid])


def _serve_until_it_gives_up(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, asyncio\n"
            "from muxgate.gateway._config import load_config\n"
            "from muxgate.gateway._serve import serve, GatewayStartError\n"
            "async def main():\n"
            "    try:\n"
            "        async with serve(load_config(sys.argv[1]), port=0, ready_timeout_s=60):\n"
            "            pass\n"
            "    except GatewayStartError as exc:\n"
            "        print('ERROR', exc)\n"
            "asyncio.run(main())\n",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_logs_the_traceback_of_a_start_failure_with_the_users_code_in_it(
    tmp_path: Path,
) -> None:
    config = _app(tmp_path, {"name": "Misuse", "import_path": "broken_apps:MisusesTheSdk"})
    proc = _serve_until_it_gives_up(config)
    assert "ERROR deployment 'Misuse' (broken_apps:MisusesTheSdk) failed" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert "Traceback" in proc.stderr, proc.stderr  # it shows the user's __init__
    assert "in __init__" in proc.stderr, proc.stderr


def test_serve_reports_replicas_that_cannot_start(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("deployments:\n  - {name: Broken, import_path: 'no_such_module:Thing'}\n")
    proc = _serve_until_it_gives_up(config)
    assert "ERROR deployment 'Broken' (no_such_module:Thing) failed to start:" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert (
        f"No module named 'no_such_module'; not in {tmp_path} (the app_dir: by default the"
        " config file's folder) nor an installed package (importing no_such_module:Thing)"
    ) in proc.stdout
    # Only muxgate's frames: no traceback, and no next try promised by a gateway that gives up.
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "failed to start (ModuleNotFoundError" in proc.stderr, proc.stderr
    assert "next try" not in proc.stderr, proc.stderr


def _muxgate(
    *args: str, timeout: float = 120, cwd: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muxgate.gateway._cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        cwd=cwd,
        check=False,
    )


def _app(tmp_path: Path, *deployments: dict[str, Any]) -> Path:
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"app_dir": APPS, "deployments": list(deployments)}))
    return config


def test_help_without_a_command_and_version() -> None:
    bare = _muxgate()
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.startswith("usage: muxgate")
    for command in ("serve", "check", "status", "demo"):
        assert f"    {command} " in bare.stdout
    version = _muxgate("--version")
    assert version.returncode == 0
    assert re.fullmatch(r"muxgate \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    config = _app(tmp_path, {"name": "Good", "import_path": "gateway_apps:Echo1"})
    result = _muxgate("check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok: deployment 'Good' imports", f"{config}: ok"]


def test_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    config = _app(
        tmp_path,
        {"name": "Typo", "import_path": "gateway_apps:Echo1", "max_ongoing_request": 2},
        {"name": "NoModule", "import_path": "no_such_module:Thing", "route_prefix": "/a"},
        {"name": "RaisesOnImport", "import_path": "broken_on_import:Thing", "route_prefix": "/b"},
        {"name": "NoClass", "import_path": "broken_apps:Missing", "route_prefix": "/c"},
        # only imported, never constructed: its __init__ raising is no problem here
        {"name": "InitRaises", "import_path": "broken_apps:InitRaises", "route_prefix": "/d"},
    )
    result = _muxgate("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0] == (
        "error: Object contains unknown field `max_ongoing_request` - at `$.deployments[0]`:"
        " did you mean `max_ongoing_requests`?"
    )
    assert out[1] == (
        "error: deployment 'NoModule': importing no_such_module:Thing:"
        f" ModuleNotFoundError: No module named 'no_such_module'; not in {APPS} (the"
        " app_dir: by default the config file's folder) nor an installed package"
    )
    broken = os.path.join(APPS, "broken_on_import.py")
    assert out[2] == (
        "error: deployment 'RaisesOnImport': importing broken_on_import:Thing: RuntimeError:"
        f" this module is broken at import (on purpose) (at {broken}:3 in <module>)"
    )
    assert out[3].startswith("error: deployment 'NoClass': importing broken_apps:Missing:")
    assert "AttributeError" in out[3]
    assert out[4:] == ["ok: deployment 'InitRaises' imports", f"{config}: 4 problems"]


def test_check_reports_every_problem_of_one_deployment_and_section(tmp_path: Path) -> None:
    # msgspec stops at the first problem; check drops the field it names and
    # validates again, so several problems in one part all show.
    from muxgate.gateway._check import check_config_file

    config = tmp_path / "app.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "http": {"port": 99999, "limits": {"max_header": 5, "max_headers": 0}},
                "deployments": [
                    {
                        "name": "Many",
                        "import_path": "gateway_apps:Echo1",
                        "max_ongoing_request": 3,
                        "routing": {"spill": "Never", "virtual_nodes": 0},
                        "preload": ["a b", "ok"],
                        "autoscaling": {"min_replicas": 3, "max_replicas": 2},
                    },
                    {"import_path": "gateway_apps:Echo1", "max_queued_requests": -5},
                ],
            }
        )
    )
    report = check_config_file(config)
    assert report.config is None
    # (yaml.safe_dump sorts the keys: the problems come in that order)
    assert report.problems == [
        "Object contains unknown field `max_header` - at `$.http.limits`:"
        " did you mean `max_headers`?",
        "Expected `int` >= 1 - at `$.http.limits.max_headers`",
        "Expected `int` <= 65535 - at `$.http.port`",
        "min_replicas (3) must be <= max_replicas (2) - at `$.deployments[0].autoscaling`",
        "Object contains unknown field `max_ongoing_request` - at `$.deployments[0]`:"
        " did you mean `max_ongoing_requests`?",
        "Expected `str` matching regex '^[!-~]{1,256}$' - at `$.deployments[0].preload[0]`",
        "Invalid enum value 'Never' - at `$.deployments[0].routing.spill`: did you mean `never`?",
        "Expected `int` >= 1 - at `$.deployments[0].routing.virtual_nodes`",
        "Expected `int` >= -1 - at `$.deployments[1].max_queued_requests`",
        # a missing required field ends the search in its part
        "Object missing required field `name` - at `$.deployments[1]`",
    ]


def test_check_does_not_report_an_invalid_required_field_missing_too(tmp_path: Path) -> None:
    from muxgate.gateway._check import check_config_file

    config = tmp_path / "app.yaml"
    deployment = {"name": "bad name", "import_path": "mod.Class", "max_ongoing_request": 3}
    config.write_text(yaml.safe_dump({"deployments": [deployment]}))
    problems = check_config_file(config).problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("Expected `str` matching regex")
    assert "at `$.deployments[0].import_path`: expected `module:Class`" in problems[0]
    assert "unknown field `max_ongoing_request`" in problems[1]
    assert "at `$.deployments[0].name`: expected 1-64 of" in problems[2]
    assert not [p for p in problems if "missing required field" in p]


def test_check_reports_a_problem_in_each_top_level_section(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "app_dir": APPS,
                "http": {"limits": {"max_header": 5}},
                "tracing": {"exporter": "jaeger"},
                "deployments": [{"name": "Good", "import_path": "gateway_apps:Echo1"}],
            }
        )
    )
    result = _muxgate("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0].endswith("at `$.http.limits`: did you mean `max_headers`?"), out
    assert out[1].startswith("error: Invalid enum value 'jaeger' - at `$.tracing.exporter`"), out
    assert out[2:] == ["ok: deployment 'Good' imports", f"{config}: 2 problems"]


def test_check_reports_every_ray_serve_field_of_a_config_without_deployments(
    tmp_path: Path,
) -> None:
    """A Ray Serve config (no `deployments:`) gets every pointer in one run,
    not one per run."""
    from muxgate.gateway._check import check_config_file

    config = tmp_path / "app.yaml"
    ray_config = {
        "proxy_location": "EveryNode",
        "http_options": {"port": 8000},
        "applications": [{"name": "app1", "import_path": "torch_mlp:Model"}],
    }
    config.write_text(yaml.safe_dump(ray_config, sort_keys=False))
    problems = check_config_file(config).problems
    assert [p.partition(":")[0] for p in problems] == [
        "Object contains unknown field `proxy_location`",
        "Object contains unknown field `http_options`",
        "Object contains unknown field `applications`",
        "Object missing required field `deployments`",
    ], problems
    assert "is a Ray Serve field; its name here is `http:`" in problems[1]
    config.write_text(yaml.safe_dump({"http": {"prot": 1}, "deployments": 3}))
    assert check_config_file(config).problems == [
        "Object contains unknown field `prot` - at `$.http`: did you mean `port`?",
        "Expected `array`, got `int` - at `$.deployments`",
    ]


def test_check_names_the_class_or_module_meant(tmp_path: Path) -> None:
    config = _app(
        tmp_path,
        {"name": "ClassTypo", "import_path": "broken_apps:Fien"},
        {"name": "ModuleTypo", "import_path": "broken_aps:Fine", "route_prefix": "/m"},
    )
    result = _muxgate("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[:2] == [
        "error: deployment 'ClassTypo': importing broken_apps:Fien: AttributeError:"
        " module 'broken_apps' has no attribute 'Fien'; did you mean 'Fine'?",
        "error: deployment 'ModuleTypo': importing broken_aps:Fine: ModuleNotFoundError:"
        " No module named 'broken_aps'; did you mean 'broken_apps'?",
    ]


def test_check_reports_repeated_names_beside_other_problems(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    echo = "gateway_apps:Echo1"
    deployments = [
        {"name": "Twice", "import_path": echo},
        {"name": "Twice", "import_path": echo, "route_prefix": "/m"},
        {"name": "Other", "import_path": echo, "route_prefix": "/m"},
    ]
    data = {"app_dir": APPS, "http": {"port": "x"}, "deployments": deployments}
    config.write_text(yaml.safe_dump(data))
    result = _muxgate("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[:3] == [
        "error: Expected `int`, got `str` - at `$.http.port`",
        "error: deployment name 'Twice' is used twice - at `$.deployments[1].name`",
        "error: route_prefix '/m' is used twice - at `$.deployments[2].route_prefix`",
    ]


def test_check_says_when_app_dir_is_not_a_folder(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    app = {"name": "Lost", "import_path": "broken_apps:Fine"}
    config.write_text(yaml.safe_dump({"app_dir": "nowhere", "deployments": [app]}))
    result = _muxgate("check", str(config), cwd=str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        "error: deployment 'Lost': importing broken_apps:Fine: ModuleNotFoundError:"
        f" No module named 'broken_apps' (app_dir {tmp_path / 'nowhere'} is not a folder)"
    )


def test_check_binds_init_kwargs_to_the_class(tmp_path: Path) -> None:
    flagged = "broken_apps:FailsWhenFlagged"
    config = _app(
        tmp_path,
        {"name": "Misspelt", "import_path": flagged, "init_kwargs": {"flg": "x"}},
        {
            "name": "Extra",
            "import_path": flagged,
            "init_kwargs": {"flag": "x", "more": 1},
            "route_prefix": "/extra",
        },
        {
            "name": "Right",
            "import_path": flagged,
            "init_kwargs": {"flag": "x"},
            "route_prefix": "/right",
        },
    )
    result = _muxgate("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"error: deployment 'Misspelt': init_kwargs (flg) do not fit {flagged}:"
        " missing a required argument: 'flag'",
        f"error: deployment 'Extra': init_kwargs (flag, more) do not fit {flagged}:"
        " got an unexpected keyword argument 'more'",
        "ok: deployment 'Right' imports",
        f"{config}: 2 problems",
    ]


def test_serve_names_the_constructor_call_that_failed(tmp_path: Path) -> None:
    # The TypeError is raised by Python's call, in no frame of the user's
    # code: the message says the class was being constructed, not imported.
    config = _app(
        tmp_path, {"name": "Typo", "import_path": "broken_apps:Fine", "init_kwargs": {"oops": 1}}
    )
    result = _muxgate("serve", str(config), "--port", "0", "--log-level", "CRITICAL")
    assert result.returncode == 1, result.stderr
    assert (
        "muxgate: deployment 'Typo' (broken_apps:Fine) failed to start: TypeError:"
        " Fine() takes no arguments (constructing broken_apps:Fine with init_kwargs ['oops'])"
    ) in result.stderr


@pytest.mark.anyio
async def test_a_deployment_that_exits_while_starting_is_a_start_failure_naming_it() -> None:
    # sys.exit() in __init__ (or at import: a module running argparse) is the
    # deployment's failure to start, named with where it happened, as any
    # exception there; it was "exited with code 70 before it was ready".
    from muxgate.gateway._serve import GatewayStartError

    config = {
        "http": {"port": 0},
        "deployments": [{"name": "Exits", "import_path": "broken_apps:ExitsInInit"}],
    }
    with pytest.raises(GatewayStartError) as info:
        async with running_gateway(config, fail_fast=True):
            pass
    where = f"{os.path.join(APPS, 'broken_apps.py')}:34 in __init__"
    assert str(info.value) == (
        "deployment 'Exits' (broken_apps:ExitsInInit) failed to start:"
        f" SystemExit: no config given (exits on purpose) (at {where})"
    )


def test_serve_stops_at_once_when_a_replica_cannot_start(tmp_path: Path) -> None:
    config = _app(
        tmp_path,
        {"name": "Fine", "import_path": "broken_apps:Fine"},
        {
            "name": "Broken",
            "import_path": "broken_apps:InitRaises",
            "num_replicas": 2,
            "route_prefix": "/broken",
        },
    )
    started = time.monotonic()
    result = _muxgate("serve", str(config), "--port", "0", "--log-level", "CRITICAL")
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    where = f"{os.path.join(APPS, 'broken_apps.py')}:10 in __init__"
    assert (
        "muxgate: deployment 'Broken' (broken_apps:InitRaises) failed to start: RuntimeError:"
        f" model registry unreachable (raised on purpose) (at {where})"
    ) in result.stderr
    assert took < 60, f"took {took:.1f} s"


def test_serve_on_a_port_in_use_says_how_to_choose_another(tmp_path: Path) -> None:
    config = _app(tmp_path, {"name": "Fine", "import_path": "broken_apps:Fine"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _muxgate("serve", str(config), "--port", str(port))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"muxgate: cannot listen on 127.0.0.1:{port}: Address already in use (another server"
        " listens there: stop it, or choose another port with --port or http.port;"
        " 0 picks a free one)"
    )


@pytest.mark.parametrize(
    ("command", "option", "value", "message"),
    [
        ("serve", "--port", "99999", "'99999' is not a port: 0..65535 (0: any free one)"),
        ("serve", "--port", "http", "'http' is not a port: 0..65535 (0: any free one)"),
        (
            "serve",
            "--log-level",
            "verbose",
            "'verbose' is not a log level: DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            "replica",
            "--log-level",
            "loud",
            "'loud' is not a log level: DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
    ],
)
def test_a_bad_port_or_log_level_is_a_usage_error_naming_it(
    tmp_path: Path, command: str, option: str, value: str, message: str
) -> None:
    """Not a traceback from bind() or logging once the gateway is half up."""
    config = _app(tmp_path, {"name": "Fine", "import_path": "broken_apps:Fine"})
    args = [command, str(config), option, value]
    if command == "replica":
        args += ["--deployment", "Fine", "--listen", "tcp:127.0.0.1:0", "--name", "r1"]
    result = _muxgate(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1].endswith(f"error: argument {option}: {message}")
    ), result.stderr
    # Any case is a level.
    assert _muxgate(command, "--log-level", "debug", "--help").returncode == 0


def test_serve_imports_deployments_that_start_without_replicas(tmp_path: Path) -> None:
    scale_to_zero = {"min_replicas": 0, "max_replicas": 1}
    broken = _app(
        tmp_path,
        {"name": "Lazy", "import_path": "no_such_module:Thing", "autoscaling": scale_to_zero},
    )
    result = _muxgate("serve", str(broken), "--port", "0")
    assert result.returncode == 1
    assert (
        "muxgate: deployment 'Lazy' cannot start: importing no_such_module:Thing:"
        " ModuleNotFoundError: No module named 'no_such_module'"
    ) in result.stderr
    assert "serving on" not in result.stderr


@pytest.mark.anyio
async def test_status_shows_the_pool_and_honours_the_token() -> None:
    config = {
        "http": {"port": 0, "admin_token": "s3cret"},
        "deployments": [{"name": "Shown", "import_path": "gateway_apps:Echo2", "num_replicas": 1}],
    }
    async with running_gateway(config) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            for model in ("a", "b"):
                r = await client.get("/", headers={MODEL: model})
                assert r.status_code == 200
        command = [sys.executable, "-m", "muxgate.gateway._cli", "status", gw.url]
        refused = await anyio.run_process(command, check=False)
        assert refused.returncode == 1
        assert "answered 401" in refused.stderr.decode()
        assert "give the admin token with --token or MUXGATE_ADMIN_TOKEN" in refused.stderr.decode()
        wrong = {**os.environ, "MUXGATE_ADMIN_TOKEN": "wrong"}
        rejected = await anyio.run_process(command, check=False, env=wrong)
        assert rejected.returncode == 1
        assert "the token given was refused" in rejected.stderr.decode()
        env = {**os.environ, "MUXGATE_ADMIN_TOKEN": "s3cret"}
        shown = await anyio.run_process(command, check=False, env=env)
        assert shown.returncode == 0, shown.stderr.decode()
        lines = shown.stdout.decode().splitlines()
        assert lines[0] == f"muxgate at {gw.url}"
        assert lines[2] == "Shown: 1 running of 1 wanted, 0 in flight, 0 queued"
        replica = next(iter(gw.pools["Shown"].targets))
        # RSS: "-" until the replica's first ping reports it
        row = rf"  {re.escape(replica)}\s+running\s+\d+\s+0\s+a b\s+-\s+([\d.]+ MiB|-)"
        assert re.fullmatch(row, lines[4]), lines[4]


def test_sigterm_lets_requests_finish_and_answers_the_rest_503(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(
        f"app_dir: {APPS}\n"
        "http: {shutdown_grace_s: 2, request_timeout_s: 30}\n"
        "deployments:\n"
        "  - {name: Term, import_path: 'gateway_apps:Echo1', num_replicas: 2}\n"
    )
    log = tmp_path / "stderr.log"
    stderr = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "muxgate.gateway._cli", "serve", str(config), "--port", "0"],
        stderr=stderr,
    )
    try:
        url = _wait_for_url(log, proc)
        processes = descendants(proc.pid)
        with httpx.Client(base_url=url, timeout=30) as client:
            # Keep-alive: the client's connection is open and idle at SIGTERM.
            assert client.get("/x", headers={MODEL: "1"}).status_code == 200
            assert "Loading model '1'." in log.read_text()  # replicas log at INFO

            def slow(seconds: float, out: list[httpx.Response]) -> None:
                out.append(client.get("/slow", params={"s": seconds}, headers={MODEL: "2"}))

            short: list[httpx.Response] = []
            long: list[httpx.Response] = []
            threads = [
                threading.Thread(target=slow, args=(0.5, short)),
                threading.Thread(target=slow, args=(60, long)),
            ]
            for thread in threads:
                thread.start()

            def both_in_flight() -> bool:
                view = client.get("/-/replicas").json()["deployments"]["Term"]
                return sum(r["in_flight"] for r in view["replicas"]) == 2

            deadline = time.monotonic() + 10
            while not both_in_flight():
                assert time.monotonic() < deadline, "requests not in flight"
                time.sleep(0.02)  # polling the admin view: nothing to wait on
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            for thread in threads:
                thread.join(timeout=30)
        assert short[0].status_code == 200  # finished within the grace
        assert long[0].status_code == 503  # still running when it ended
        assert long[0].json()["error"]["code"] == "shutting_down"
        assert long[0].headers["retry-after"] == "1"
        assert proc.wait(timeout=30) == 0
        assert 1.0 < time.monotonic() - sent < 15
        assert _gone(processes)
        assert "requests in flight get up to 2 s" in log.read_text()
        # uvicorn's messages, under the gateway's name: no "error" in INFO lines
        assert "muxgate.gateway.http - Shutting down" in log.read_text()
        assert "uvicorn.error" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
