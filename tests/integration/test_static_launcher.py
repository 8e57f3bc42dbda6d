"""A gateway with a ``static`` launcher over two ``muxgate replica``
processes on loopback: it serves, routes by model id, drops a replica that
dies and takes it back, under its name, when it answers again. Two gateways
over the same replicas route alike, and one leaving costs the other nothing."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from standalone_replicas import HOOKED, SECRET, standalone_replica, two_replicas, write_config
from tls_certs import CertificateAuthority
from waiting import wait_until

from muxgate.gateway._channel_client import ChannelClient
from muxgate.gateway._config import LauncherConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway.launchers import ReplicaReporter, get_launcher_class
from muxgate.gateway.launchers.static import StaticLauncher
from muxgate.replicas.contract import ChannelSettings, TlsSettings, client_ssl_context

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def served_by(client: httpx.AsyncClient, model: str) -> str:
    response = await client.get("/", headers={MODEL: model})
    assert response.status_code == 200, response.text
    replica: str = response.json()["replica"]
    return replica


async def test_gateway_follows_static_replicas(tmp_path: Path) -> None:
    async with two_replicas(tmp_path) as (_, r1, gateway_config):
        replica_config = tmp_path / "app.yaml"
        async with running_gateway(gateway_config) as gw:
            pool = gw.pools["Hooked"]

            async def both_running() -> bool:
                return sorted(pool.targets) == ["hooked-0", "hooked-1"]

            await wait_until(both_running, within_s=20)
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                # 8 ids: the two replicas' caches (4 models each) hold them all,
                # so none is evicted, and none is placed a second time.
                placement = {f"m{i}": await served_by(client, f"m{i}") for i in range(8)}
                # By model id: each id stays where it went; both replicas serve.
                for model, replica in placement.items():
                    assert await served_by(client, model) == replica
                assert set(placement.values()) == {"hooked-0", "hooked-1"}

                # hooked-1 dies with a request in flight: that one gets 502 at
                # once; it leaves the ring, hooked-0 serves everything.
                on_1 = next(m for m, r in placement.items() if r == "hooked-1")
                doomed = asyncio.ensure_future(
                    client.get("/slow", params={"s": "30"}, headers={MODEL: on_1})
                )

                async def in_flight_on_1() -> bool:
                    body = (await client.get("/-/replicas")).json()["deployments"]["Hooked"]
                    return any(r["id"] == "hooked-1" and r["in_flight"] for r in body["replicas"])

                await wait_until(in_flight_on_1, within_s=20)
                r1.process.send_signal(signal.SIGKILL)
                await r1.process.wait()
                with anyio.fail_after(10):
                    died = await doomed
                assert died.status_code == 502, died.text
                assert died.json()["error"]["code"] == "replica_died"

                async def only_hooked_0() -> bool:
                    return sorted(pool.targets) == ["hooked-0"]

                await wait_until(only_hooked_0, within_s=20)
                for model in placement:
                    assert await served_by(client, model) == "hooked-0"

                # It comes back on its address under its name, and is taken back.
                port = r1.address.rpartition(":")[2]
                async with standalone_replica(
                    replica_config, "Hooked", "hooked-1", listen=f"tcp:127.0.0.1:{port}"
                ):
                    await wait_until(both_running, within_s=20)
                    # (where new ids go is the router's choice; the one that
                    # came back takes its share)
                    fresh = {await served_by(client, f"new{i}") for i in range(12)}
                    assert "hooked-1" in fresh


async def test_static_launcher_reports_by_name_and_skips_the_unreachable(
    tmp_path: Path,
) -> None:
    echo_deployment = {"name": "Echo", "import_path": "echo:Echo", "route_prefix": "/echo"}
    config = write_config(tmp_path, [HOOKED, echo_deployment])
    async with (
        standalone_replica(config, "Hooked", "hooked-a", secret=None) as hooked,
        standalone_replica(config, "Echo", "echo-a", secret=None) as echo,
    ):
        cls = get_launcher_class("static")
        assert cls is StaticLauncher
        dead = "tcp:127.0.0.1:9"  # discard port: nothing listens
        launcher = StaticLauncher.from_config(
            LauncherConfig(kind="static", addresses=[hooked.address, echo.address, dead]),
            channel=ChannelClient(ChannelSettings(), {}),
        )
        assert isinstance(launcher, ReplicaReporter)
        reported = await launcher.ready_replicas("Hooked")
        assert [(r.name, r.deployment, r.address, r.pid) for r in reported] == [
            ("hooked-a", "Hooked", hooked.address, None)
        ]
        assert [r.name for r in await launcher.ready_replicas("Echo")] == ["echo-a"]
        assert "unreachable=1" in repr(launcher)
        await launcher.aclose()


async def test_an_address_failing_by_turns_for_two_reasons_is_logged_once_for_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, each change of reason was logged: a line per probe (one a
    # second) for an address that timed out and refused by turns.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted = 0

    async def by_turns(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        async with stream:
            await stream.receive()  # the Hello
            if accepted % 2:  # a frame that is no message; else closed
                await stream.send(b"\x00\x00\x00\x01\xc1")

    address = f"tcp:127.0.0.1:{port}"
    launcher = StaticLauncher(addresses=[address], channel=ChannelClient(ChannelSettings(), {}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, by_turns)
        for _ in range(6):
            assert await launcher.ready_replicas("Any") == []
        tg.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if address in r.getMessage()]
    assert accepted == 6
    assert len(lines) == 2, lines
    assert len(set(lines)) == 2


async def test_dns_names_are_resolved_again_after_the_interval(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "Echo", "import_path": "echo:Echo"}])
    async with standalone_replica(config, "Echo", "echo-dns", secret=None) as echo:
        port = echo.address.rpartition(":")[2]
        now = [0.0]
        launcher = StaticLauncher(
            dns=f"localhost:{port}", resolve_interval_s=10.0, clock=lambda: now[0]
        )
        reported = await launcher.ready_replicas("Echo")
        assert [r.name for r in reported] == ["echo-dns"]
        assert reported[0].address in (f"tcp:127.0.0.1:{port}", f"tcp:[::1]:{port}")
        launcher.dns = "localhost:9"  # the name now points elsewhere...
        now[0] = 5.0
        assert [r.name for r in await launcher.ready_replicas("Echo")] == ["echo-dns"]  # cached
        now[0] = 10.0
        assert await launcher.ready_replicas("Echo") == []  # ...and is looked up again


async def test_dns_mode_checks_certificates_for_the_name(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    named = ca.issue("replica", ip=False)  # valid for "localhost", not for 127.0.0.1
    tls = {"ca": ca.ca, "cert": named.cert, "key": named.key}
    config = write_config(
        tmp_path, [{"name": "Echo", "import_path": "echo:Echo"}], cluster={"tls": tls}
    )
    async with standalone_replica(config, "Echo", "echo-tls") as echo:
        port = echo.address.rpartition(":")[2]
        channel = ChannelClient(
            ChannelSettings(tls=TlsSettings(ca=ca.ca)), {"MUXGATE_CLUSTER_SECRET": SECRET}
        )
        # By address, the certificate does not hold: it names no IP.
        with pytest.raises(ssl.SSLCertVerificationError):
            await ReplicaConnection.connect(
                echo.address, ssl_context=client_ssl_context(TlsSettings(ca=ca.ca))
            )
        launcher = StaticLauncher(dns=f"localhost:{port}", channel=channel)
        (reported,) = await launcher.ready_replicas("Echo")
        assert reported.name == "echo-tls"
        async with await launcher.connect(reported.address) as conn:
            assert conn.replica_id == "echo-tls"


async def test_two_gateways_share_replicas_and_one_leaving_costs_the_other_nothing(
    tmp_path: Path,
) -> None:
    async with two_replicas(tmp_path) as (r0, r1, config):
        models = [f"m{i}" for i in range(4)]
        outcomes: list[int] = []
        async with running_gateway(config) as b, httpx.AsyncClient(base_url=b.url) as via_b:
            b_pool = b.pools["Hooked"]

            async def keep_asking_b() -> None:
                while True:
                    for m in models:
                        response = await via_b.get("/", headers={MODEL: m})
                        outcomes.append(response.status_code)

            async with anyio.create_task_group() as tg:
                async with (
                    running_gateway(config) as a,
                    httpx.AsyncClient(base_url=a.url) as via_a,
                ):
                    for pool in (a.pools["Hooked"], b_pool):
                        await wait_until(lambda p=pool: len(p.targets) == 2, what="both replicas")
                    placement = {m: await served_by(via_a, m) for m in models}

                    def b_sees_the_models() -> bool:
                        held = {m for c in b_pool.targets.values() for m in c.state.models}
                        return held >= set(models)

                    # B learns what A loaded from the replicas' own reports...
                    await wait_until(b_sees_the_models, within_s=10, what="B to see A's loads")
                    # ...and sends those ids where they are: no second load.
                    assert {m: await served_by(via_b, m) for m in models} == placement
                    tg.start_soon(keep_asking_b)
                    await wait_until(lambda: len(outcomes) > 20, what="B serving")
                # A has left (its connections closed) while B kept serving.
                served = len(outcomes)
                await wait_until(lambda: len(outcomes) > served + 40, what="B after A left")
                tg.cancel_scope.cancel()
            assert set(outcomes) == {200}
            assert r0.process.returncode is None and r1.process.returncode is None
            assert {m: await served_by(via_b, m) for m in models} == placement
