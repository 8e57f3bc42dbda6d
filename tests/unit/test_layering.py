"""The import layering of pyproject.toml's import-linter contracts holds, and
the check fails on a gateway import of a private replica module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(source_root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with the repository's contracts over the packages
    found first on ``source_root``."""
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=source_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _copy_packages(target: Path) -> Path:
    """A ``muxgate`` namespace in ``target`` holding copies of the three packages."""
    package = target / "muxgate"
    package.mkdir()
    for name in ("gateway", "replicas", "backends"):
        shutil.copytree(
            ROOT / name, package / name, ignore=shutil.ignore_patterns("__pycache__", "static")
        )
    return package


def test_the_contracts_hold(tmp_path: Path) -> None:
    _copy_packages(tmp_path)
    result = _lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


#: (module, import added to it, the contract it breaks); each under
#: TYPE_CHECKING, which counts too (a cycle of type-only imports is a cycle)
VIOLATIONS = [
    ("gateway/_ring.py", "import muxgate.replicas._server", "private replica modules"),
    ("replicas/_memory.py", "import muxgate.gateway._ring", "replicas never import"),
    ("backends/_urls.py", "import muxgate.replicas", "backends imports neither"),
    ("replicas/_codes.py", "import muxgate.replicas._counters", None),
    ("replicas/_counters.py", "import muxgate.replicas._codes", "no import cycles"),
    ("gateway/_lease.py", "import ray.util", "ray, an optional extra"),
]


def test_each_contract_fails_on_its_violation(tmp_path: Path) -> None:
    package = _copy_packages(tmp_path)
    for importer, line, _ in VIOLATIONS:
        module = package / importer
        module.write_text(
            module.read_text() + f"\nfrom typing import TYPE_CHECKING\n"
            f"if TYPE_CHECKING:\n    {line}\n"
        )
    result = _lint_imports(tmp_path)
    assert result.returncode == 1
    broken = sorted(
        ln
        for ln in result.stdout.splitlines()
        if re.search(r" BROKEN( \(\d+ ignored imports\))?$", ln)
    )
    expected = sorted(contract for _, _, contract in VIOLATIONS if contract is not None)
    assert all(ln.startswith(c) for ln, c in zip(broken, expected, strict=True)), result.stdout
    # the one a newcomer meets first: it names the import and the way out
    assert "- muxgate.gateway._ring -> muxgate.replicas._server" in result.stdout
    assert "export from" in result.stdout
