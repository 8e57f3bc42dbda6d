"""``muxgate status``: the /-/replicas snapshot as text (pure rendering), and
what it says when nothing answers."""

from __future__ import annotations

import socket

import pytest

from muxgate.gateway._status_view import StatusError, base_url, fetch, render

SNAPSHOT = {
    "deployments": {
        "Model": {
            "target_replicas": 2,
            "queued": 3,
            "in_flight": 5,
            "last_failure": None,
            "autoscaling": {"min_replicas": 0, "max_replicas": 4},
            "replicas": [
                {
                    "id": "Model#a1",
                    "state": "running",
                    "pid": 101,
                    "address": "unix:/tmp/a1.sock",
                    "in_flight": 4,
                    "models": ["3", "1", "2"],
                    "loading": [],
                    "rss_bytes": 3 * 1024 * 1024,
                },
                {
                    "id": "Model#b22",
                    "state": "starting",
                    "pid": None,
                    "address": None,
                    "in_flight": 0,
                    "models": [],
                    "loading": ["7"],
                },
            ],
            "quarantined": [
                {"model_id": "bad-model", "until": 0, "retry_after_s": 9, "deaths": 2, "strikes": 1}
            ],
        },
        "Broken": {
            "target_replicas": 1,
            "queued": 0,
            "in_flight": 0,
            "replicas": [],
            "last_failure": "RuntimeError: registry unreachable (at /app/m.py:3 in __init__)",
        },
    }
}


def test_render_shows_replicas_models_and_failures() -> None:
    text = render(SNAPSHOT, "http://127.0.0.1:8000")
    assert text.splitlines() == [
        "muxgate at http://127.0.0.1:8000",
        "",
        "Broken: 0 running of 1 wanted, 0 in flight, 0 queued",
        "  no replicas",
        "  last start failure: RuntimeError: registry unreachable (at /app/m.py:3 in __init__)",
        "",
        "Model: 1 running of 2 wanted (autoscaling 0..4), 5 in flight, 3 queued",
        "  REPLICA    STATE     PID  IN FLIGHT  MODELS (LRU first)  LOADING  RSS",
        "  Model#a1   running   101  4          3 1 2               -        3.0 MiB",
        "  Model#b22  starting  -    0          -                   7        -",
        "  quarantined models: bad-model",
    ]


def test_render_of_an_empty_gateway() -> None:
    assert render({"deployments": {}}) == "muxgate\n"


def test_render_says_who_holds_the_lease() -> None:
    def lease_lines(lease: dict[str, object]) -> list[str]:
        dep = {"target_replicas": 0, "replicas": [], "lease": lease}
        text = render({"deployments": {"D": dep}})
        return [ln for ln in text.splitlines() if "lease" in ln]

    leading = {"role": "leader", "holder": "gw1:42:ab", "leader": "gw1:42:ab", "epoch": 7}
    assert lease_lines(leading) == ["  lease: leader (epoch 7, holder gw1:42:ab)"]
    following = {"role": "follower", "holder": "gw2:9:cd", "leader": "gw1:42:ab", "epoch": None}
    assert lease_lines(following) == ["  lease: follower of gw1:42:ab (this gateway: gw2:9:cd)"]
    alone = {**following, "leader": None}
    assert lease_lines(alone) == ["  lease: follower of none yet (this gateway: gw2:9:cd)"]


def test_a_bare_host_and_port_is_an_http_url() -> None:
    assert base_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert base_url("localhost:8000/") == "http://localhost:8000"
    assert base_url("https://gw.example:443/") == "https://gw.example:443"
    assert base_url("8000") == "http://127.0.0.1:8000"  # a bare port: this host
    # the status page's address, as muxgate demo and serve print it
    assert base_url("http://127.0.0.1:8000/-/") == "http://127.0.0.1:8000"
    assert base_url("127.0.0.1:8000/-") == "http://127.0.0.1:8000"


def test_nothing_listening_says_how_to_point_it_at_a_gateway() -> None:
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        with pytest.raises(StatusError) as raised:
            fetch(url, None, timeout_s=5)
    assert str(raised.value).startswith(f"cannot reach {url}/-/replicas: ")
    assert str(raised.value).endswith(
        "(is `muxgate serve` running there? give its address: muxgate status http://HOST:PORT)"
    )
