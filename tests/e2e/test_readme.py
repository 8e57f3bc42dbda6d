"""The README's deployment example runs as written, against the README's own curl.

The Python block under "Writing a multiplexed deployment" is written to a
file as it is and served by a real gateway (one replica, port 0); models are
made with that block's own ``make_net``; the ``curl`` line under "Running
it" is run as it is, with only the gateway's address swapped in. So neither
can drift from what works.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest
import torch
from gateway_harness import MODEL

from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import serve

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.anyio


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_python_snippet() -> str:
    section = _section(README.read_text(), "Writing a multiplexed deployment")
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'Writing a multiplexed deployment'"
    return match.group(1)


def readme_curl() -> list[str]:
    section = _section(README.read_text(), "Running it")
    lines = [line for line in section.splitlines() if line.startswith("curl ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extracted_blocks_look_like_the_example() -> None:
    snippet = readme_python_snippet()
    assert "def make_net" in snippet and "@multiplexed" in snippet
    argv = readme_curl()
    assert argv[-1] == "http://127.0.0.1:8000/"


async def test_readme_snippet_serves_the_readme_curl(tmp_path: Path) -> None:
    app_file = tmp_path / "readme_app.py"
    app_file.write_text(readme_python_snippet())
    snippet = _import_file(app_file)
    root = tmp_path / "models"
    for model_id in ("1", "2"):
        torch.manual_seed(int(model_id))
        (root / model_id).mkdir(parents=True)
        torch.save(snippet.make_net().state_dict(), root / model_id / "model.pt")
    config = parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {
                    "name": "Model",
                    "import_path": "readme_app:Model",
                    "init_kwargs": {"model_root": root.as_uri()},
                    "num_replicas": 1,
                }
            ],
        },
        base_dir=str(tmp_path),
    )
    argv = readme_curl()
    async with serve(config) as url:
        argv[-1] = argv[-1].replace("http://127.0.0.1:8000", url)
        with anyio.fail_after(60):
            proc = await anyio.run_process(
                [*argv, "--silent", "--show-error", "--write-out", "\n%{http_code}"], check=False
            )
        body, _, status = proc.stdout.decode().rpartition("\n")
        assert proc.returncode == 0, proc.stderr.decode()
        assert status == "200", body
        y = json.loads(body)["y"]
        # The model the README's curl names, computed here from the same weights.
        model_id = argv[argv.index("-H") + 1].split(":", 1)[1].strip()
        net = snippet.make_net()
        net.load_state_dict(torch.load(root / model_id / "model.pt", weights_only=True))
        x = torch.tensor(json.loads(argv[argv.index("-d") + 1])["x"], dtype=torch.float32)
        assert y == pytest.approx(net(x).tolist(), rel=1e-5)
        # Without the header the README's deployment says what is missing.
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/", json={"x": [1, 2, 3, 4]})
        assert response.status_code == 400, response.text
        assert MODEL in response.json()["error"]["message"]
    sys.modules.pop("readme_app", None)
