"""Set-up and packaging: the Makefile finds a Python >= 3.11, the demo installs
no test tools, the wheel builds without setuptools warnings and ships the
status page, and docs cite nothing outside the repository."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fake_python(folder: Path, name: str, *, works: bool) -> None:
    script = folder / name
    if works:
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    else:  # a pyenv shim of a version that is not installed, or a Python < 3.11
        script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)


def _dry_run(target: str, path: Path, tmp_path: Path) -> str:
    make = shutil.which("make")
    assert make is not None
    env = {"PATH": f"{path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [make, "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_takes_the_first_python_that_is_at_least_3_11(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_python(bin_dir, "python3.13", works=False)
    _fake_python(bin_dir, "python3.12", works=True)
    _fake_python(bin_dir, "python3.11", works=True)
    out = _dry_run("demo", bin_dir, tmp_path)
    assert re.search(r"\|\| python3\.12 -m venv ", out), out


def test_make_demo_installs_no_test_extra_and_make_test_does(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_python(bin_dir, "python3.11", works=True)
    demo = _dry_run("demo", bin_dir, tmp_path)
    assert "pip install -q .\n" in demo
    assert "[test]" not in demo
    assert "muxgate demo" in demo
    test = _dry_run("test", bin_dir, tmp_path)
    assert "pip install -q -e '.[test,ray]'" in test


def test_system_deps_without_apt_get_goes_on_and_says_which_tests_skip(tmp_path: Path) -> None:
    """macOS, another distribution: no chromium, no promtool, no apt-get.
    `make test` goes on (the tests needing them skip) instead of failing on
    apt-get."""
    make = shutil.which("make")
    assert make is not None
    bin_dir = tmp_path / "bin"  # a shell and id: nothing else
    bin_dir.mkdir()
    for tool in ("sh", "id"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    proc = subprocess.run(
        [make, "-C", str(ROOT), "system-deps"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "apt-get cannot install it here" in proc.stderr
    assert "tests will be skipped" in proc.stderr


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_ships_the_status_page(tmp_path: Path) -> None:
    # A copy of the tree: the build writes build/ and *.egg-info next to it.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__"),
    )
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*pip_wheel, "-v", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # setuptools' own (BuildBackendWarning, SetuptoolsDeprecationWarning, ...)
    warnings = re.findall(r".*(?:[A-Za-z]Warning\b|[Dd]eprecat).*", output)
    assert not warnings, warnings
    (wheel,) = (tmp_path / "dist").glob("muxgate-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(n for n in names if n.endswith("METADATA"))
        assert "License-Expression: Apache-2.0" in zf.read(metadata).decode()
    assert "muxgate/gateway/static/status.html" in names
    assert "muxgate/gateway/py.typed" in names


def test_docs_cite_nothing_outside_the_repository() -> None:
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = page.read_text()
        assert "DESIGN" not in text, f"{page.name} cites DESIGN.md"


def test_docs_say_healthz_is_public() -> None:
    http = (ROOT / "docs" / "http.md").read_text()
    row = next(line for line in http.splitlines() if line.startswith("| `GET /-/healthz`"))
    assert "public" in row


#: import name -> distribution name, where they differ
_DISTRIBUTIONS = {"yaml": "pyyaml", "prometheus_client": "prometheus-client"}


#: module -> the optional extra it may import from (the registry imports it lazily)
_EXTRA_MODULES = {"gateway/launchers/ray.py": "ray", "gateway/launchers/_ray_lease.py": "ray"}


def test_every_third_party_import_is_a_base_dependency() -> None:
    """`make demo` installs the base dependencies only: the packages may
    import nothing else from outside the standard library, except a launcher
    module the registry imports only on demand, from its optional extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    imported: set[str] = set()
    for package in ("gateway", "replicas", "backends"):
        for source in (ROOT / package).rglob("*.py"):
            if source.relative_to(ROOT).as_posix() in _EXTRA_MODULES:
                continue
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {
        name
        for name in imported - set(sys.stdlib_module_names)
        if name not in ("muxgate", "__future__")
    }
    missing = {
        name
        for name in third_party
        if _DISTRIBUTIONS.get(name, name) not in base
        and not any(d.startswith(_DISTRIBUTIONS.get(name, name) + "-") for d in base)
    }
    assert missing == set(), f"imported but not in [project].dependencies: {missing}"
