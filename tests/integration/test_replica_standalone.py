"""``muxgate replica``: a standalone replica over TCP, its identity, its
authenticated channel (the cluster secret, TLS, mutual TLS), SIGTERM, and the
command's refusals. Real processes and sockets throughout."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from standalone_replicas import (
    SECRET,
    Standalone,
    replica_command,
    replica_env,
    standalone_replica,
    write_config,
)
from tls_certs import CertificateAuthority
from waiting import wait_until

from muxgate.gateway._channel_client import ChannelClient
from muxgate.gateway._connection import HandshakeError, ReplicaConnection
from muxgate.replicas._channel import ChannelAuth, ChannelSettings, TlsSettings, client_ssl_context
from muxgate.replicas._protocol import HttpRequest, Reply

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

AUTH = ChannelAuth(SECRET.encode())


def pack(*args: Any) -> dict[str, bytes]:
    return {"args": msgspec.msgpack.encode(list(args)), "kwargs": msgspec.msgpack.encode({})}


def value(reply: Reply) -> Any:
    assert reply.error is None, reply.error
    return msgspec.msgpack.decode(reply.body)


def http(path: str) -> HttpRequest:
    return HttpRequest(method="GET", path=path, query="", headers=[], body=b"")


async def test_sigterm_finishes_calls_unloads_once_and_a_restart_keeps_the_name(
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "hooks.log"
    config = write_config(
        tmp_path,
        [
            {
                "name": "Hooked",
                "import_path": "autoscale_apps:Hooked",
                "init_kwargs": {"hook_log": str(hooks)},
            }
        ],
    )
    async with standalone_replica(config, "Hooked", "hooked-0", secret=None) as replica:
        # A replica without the secret proves nothing: a gateway holding it refuses it.
        with pytest.raises(HandshakeError, match="did not prove the cluster secret"):
            await ReplicaConnection.connect(replica.address, auth=AUTH)
        conn = await ReplicaConnection.connect(replica.address)
        assert (conn.replica_id, conn.deployment, conn.pid) == ("hooked-0", "Hooked", replica.pid)
        assert (await conn.call(request_id="r1", model_id="m1", http=http("/"))).status == 200
        # Its gateway leaving does not stop a standalone replica: the next one
        # finds the models still loaded.
        await conn.aclose()
        conn = await ReplicaConnection.connect(replica.address)
        assert conn.state.models == ["m1"]
        async with anyio.create_task_group() as tg:
            slow: list[Reply] = []

            async def call_slow() -> None:
                slow.append(
                    await conn.call(
                        request_id="r2",
                        model_id="m2",
                        http=HttpRequest("GET", "/slow", "s=1.5", [], b""),
                    )
                )

            tg.start_soon(call_slow)

            async def loaded() -> bool:
                return "m2" in (await conn.ping()).state.models

            await wait_until(loaded, within_s=10)
            assert await replica.stop() == 0  # SIGTERM, with the call in flight
        assert slow[0].status == 200 and slow[0].error is None
        await conn.aclose()
    assert sorted(hooks.read_text().splitlines()) == [f"m1 {replica.pid}", f"m2 {replica.pid}"]
    async with standalone_replica(config, "Hooked", "hooked-0", secret=None) as again:
        restarted = await ReplicaConnection.connect(again.address)
        assert restarted.replica_id == "hooked-0" and restarted.pid != replica.pid
        await restarted.aclose()


async def test_the_secret_is_required_and_proven_both_ways(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "Echo", "import_path": "echo:Echo"}])
    async with standalone_replica(config, "Echo", "echo-a") as replica:
        conn = await ReplicaConnection.connect(replica.address, auth=AUTH)
        assert conn.replica_id == "echo-a"
        assert value(await conn.call(request_id="a", method="add", **pack(2, 3))) == 5
        with pytest.raises(HandshakeError, match="requires the cluster secret"):
            await ReplicaConnection.connect(replica.address)
        wrong = ChannelAuth(b"another-secret-0123456789abcdef")
        # The replica's proof fails first: the gateway never sends its own.
        with pytest.raises(HandshakeError, match="failed to prove the cluster secret"):
            await ReplicaConnection.connect(replica.address, auth=wrong)
        # The authenticated connection was not disturbed.
        assert value(await conn.call(request_id="b", method="add", **pack(4, 5))) == 9
        await conn.aclose()
        # What the gateway builds from the config's cluster section.
        client = ChannelClient(ChannelSettings(), {"MUXGATE_CLUSTER_SECRET": SECRET})
        assert repr(client) == "<ChannelClient secret=True tls=False>"
        async with await client.connect(replica.address) as conn:
            assert value(await conn.call(request_id="c", method="add", **pack(1, 2))) == 3


async def test_mutual_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    server, client = ca.issue("replica"), ca.issue("gateway")
    stranger_ca = CertificateAuthority(tmp_path, "stranger")
    stranger = stranger_ca.issue("stranger")
    tls = {"ca": ca.ca, "cert": server.cert, "key": server.key, "mutual": True}
    config = write_config(
        tmp_path, [{"name": "Echo", "import_path": "echo:Echo"}], cluster={"tls": tls}
    )
    gateway_tls = TlsSettings(ca=ca.ca, cert=client.cert, key=client.key, mutual=True)
    # Mutual TLS alone is enough to listen beyond loopback; here it is on 127.0.0.1.
    async with standalone_replica(config, "Echo", "echo-tls", secret=SECRET) as replica:
        conn = await ReplicaConnection.connect(
            replica.address, auth=AUTH, ssl_context=client_ssl_context(gateway_tls)
        )
        assert value(await conn.call(request_id="t", method="echo", **pack("x" * 100_000))) == (
            "x" * 100_000
        )
        failures = (HandshakeError, ssl.SSLError, anyio.BrokenResourceError, OSError)
        # no client certificate
        with pytest.raises(failures):
            await ReplicaConnection.connect(
                replica.address, auth=AUTH, ssl_context=client_ssl_context(TlsSettings(ca=ca.ca))
            )
        # a client certificate from another CA
        foreign = TlsSettings(ca=ca.ca, cert=stranger.cert, key=stranger.key, mutual=True)
        with pytest.raises(failures):
            await ReplicaConnection.connect(
                replica.address, auth=AUTH, ssl_context=client_ssl_context(foreign)
            )
        # a gateway that does not trust the replica's CA
        with pytest.raises(ssl.SSLCertVerificationError):
            await ReplicaConnection.connect(
                replica.address,
                auth=AUTH,
                ssl_context=client_ssl_context(TlsSettings(ca=stranger_ca.ca)),
            )
        # plain TCP to a TLS listener
        with pytest.raises(failures):
            await ReplicaConnection.connect(replica.address, auth=AUTH, connect_timeout=5)
        assert value(await conn.call(request_id="u", method="add", **pack(1, 1))) == 2
        await conn.aclose()
        # The gateway's side as the config builds it: the secret file and TLS.
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        client = ChannelClient(ChannelSettings(secret_file=str(secret_file), tls=gateway_tls), {})
        assert repr(client) == "<ChannelClient secret=True tls=True>"
        async with await client.connect(replica.address) as conn:
            assert value(await conn.call(request_id="v", method="add", **pack(2, 2))) == 4


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_refusals_of_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "Echo", "import_path": "echo:Echo"}])
    # Open to other machines without the secret or mutual TLS: refused before user code runs.
    open_to_all = _run(replica_command(config, "Echo", "e0", "tcp:0.0.0.0:0"), replica_env(None))
    assert open_to_all.returncode == 1
    assert open_to_all.stdout.startswith("FAILED refusing to listen on tcp:0.0.0.0:0 without")
    short = _run(
        replica_command(config, "Echo", "e0", "tcp:127.0.0.1:0"), replica_env("tiny-secret")
    )
    assert short.returncode == 1 and "needs at least 16" in short.stdout
    assert "tiny-secret" not in short.stdout + short.stderr
    unknown = _run(replica_command(config, "Nope", "e0", "tcp:127.0.0.1:0"), replica_env(SECRET))
    assert unknown.returncode == 2 and "no deployment 'Nope'" in unknown.stderr
    bad_listen = _run(replica_command(config, "Echo", "e0", "unix:/tmp/x"), replica_env(SECRET))
    assert bad_listen.returncode == 2 and "is not tcp:HOST:PORT" in bad_listen.stderr
    bad_name = _run(
        replica_command(config, "Echo", "../e0", "tcp:127.0.0.1:0"), replica_env(SECRET)
    )
    assert bad_name.returncode == 2 and "is not a slot name" in bad_name.stderr


async def test_the_secret_is_never_in_the_log_or_the_command_line(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    config = write_config(
        tmp_path,
        [{"name": "Echo", "import_path": "echo:Echo"}],
        cluster={"secret_file": "secret"},
        http={"admin_token": "admin-token-never-on-argv"},
    )
    log = tmp_path / "replica.log"
    with log.open("wb") as err:
        process = await anyio.open_process(
            replica_command(config, "Echo", "echo-f", "tcp:127.0.0.1:0"),
            env=replica_env(None),
            stdout=subprocess.PIPE,
            stderr=err,
        )
        replica = None
        try:
            assert process.stdout is not None
            with anyio.fail_after(60):
                line = (await process.stdout.receive()).decode()
            assert line.startswith("READY "), line
            replica = Standalone(process, line.split()[1])
            argv = await anyio.Path(f"/proc/{process.pid}/cmdline").read_bytes()
            assert b"admin-token-never-on-argv" not in argv and SECRET.encode() not in argv
            conn = await ReplicaConnection.connect(replica.address, auth=AUTH)
            with pytest.raises(HandshakeError):
                await ReplicaConnection.connect(
                    replica.address, auth=ChannelAuth(b"x" * 32), connect_timeout=5
                )
            await conn.aclose()
        finally:
            if replica is not None:
                assert await replica.stop() == 0
            else:
                process.kill()
            await process.aclose()
    text = log.read_text()
    assert "Replica stopped" in text
    assert SECRET not in text and "admin-token-never-on-argv" not in text
    assert os.environ.get("MUXGATE_CLUSTER_SECRET") is None
