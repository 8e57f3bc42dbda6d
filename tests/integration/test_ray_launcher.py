"""The ``ray`` launcher on a real Ray cluster: a head and two worker nodes on
this machine (``ray.cluster_utils.Cluster``: real GCS and raylets, loopback
only), shared by the module's tests; each test uses its own namespace.

A gateway serves requests through replicas running as Ray actors, scales
0 -> 3 across the nodes (requests that arrive meanwhile wait and are
served), replaces the replicas of a worker node that dies on the live ones,
and leaves its actors to the next gateway, which adopts them; one whose
config no longer has the deployment removes them. Two gateways on one
deployment: only the lease holder creates actors; when it dies the other
takes over within two lease periods, and a stale epoch is refused."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import APPS, MODEL, running_gateway
from processes import descendants, listening_addresses
from waiting import wait_until, wait_until_sync

# Ray reads these when it is imported: every Ray process on loopback, no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'muxgate[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: Fake CPUs per node, and each replica actor's request: three fit anywhere.
NODE_CPUS = 1
REPLICA_CPUS = 0.25


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    c = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        c.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def app(cluster: Any, namespace: str, deployments: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "http": {"port": 0},
        "launcher": {"kind": "ray", "address": cluster.address, "namespace": namespace},
        "deployments": deployments,
    }


def hooked(num_replicas: int) -> dict[str, Any]:
    return {
        "name": "Hooked",
        "import_path": "autoscale_apps:Hooked",
        "num_replicas": num_replicas,
        "num_cpus": REPLICA_CPUS,
    }


async def node_of(replica_id: str, namespace: str) -> str:
    actor = ray.get_actor(f"muxgate:{replica_id}", namespace=namespace)
    node: str = await actor.node_id.remote()
    return node


async def served_by(client: httpx.AsyncClient, model: str) -> str:
    response = await client.get("/", headers={MODEL: model})
    assert response.status_code == 200, response.text
    replica: str = response.json()["replica"]
    return replica


def actors_in(namespace: str) -> set[str]:
    """The replica actors in ``namespace`` (not its deployments' lease actors)."""
    return {
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and entry["name"].startswith("muxgate:")
    }


async def test_scales_over_nodes_and_replaces_a_dead_nodes_replicas(cluster: Any) -> None:
    ns = "scale"
    async with running_gateway(app(cluster, ns, [hooked(0)])) as gw:
        pool = gw.pools["Hooked"]
        pool.set_target(3)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            # Requests that arrive while the actors start wait for them.
            during = await asyncio.gather(*(served_by(client, f"w{i}") for i in range(6)))
        await wait_until(lambda: len(pool.targets) == 3, within_s=60, what="3 actor replicas")
        replicas = sorted(pool.targets)
        assert set(during) <= set(replicas)
        for replica_id in replicas:
            assert pool.targets[replica_id].address.startswith("tcp:127.0.0.1:")
        nodes = {rid: await node_of(rid, ns) for rid in replicas}
        assert len(set(nodes.values())) >= 2, nodes  # SPREAD over the three nodes
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            placement = {f"m{i}": await served_by(client, f"m{i}") for i in range(12)}
            assert set(placement.values()) <= set(replicas)
            assert len(set(placement.values())) >= 2

            worker_nodes = {n.node_id: n for n in cluster.worker_nodes}
            victim_id = next(node for node in nodes.values() if node in worker_nodes)
            lost = {rid for rid, node in nodes.items() if node == victim_id}
            cluster.remove_node(worker_nodes[victim_id])
            try:

                async def whole_again() -> bool:
                    current = set(pool.targets)
                    return len(current) == 3 and not current & lost

                await wait_until(whole_again, within_s=60, what="the pool whole again")
                for replica_id in pool.targets:
                    assert await node_of(replica_id, ns) != victim_id
                for model in placement:
                    assert await served_by(client, model) in pool.targets
            finally:
                cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
                cluster.wait_for_nodes()
    # The actors stay after the gateway; this test's are removed here.
    for name in actors_in(ns):
        ray.kill(ray.get_actor(name, namespace=ns))


async def test_actors_outlive_the_gateway_are_adopted_and_removed_with_the_deployment(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="muxgate")
    ns = "adopt"
    async with running_gateway(app(cluster, ns, [hooked(2)])) as gw:
        pool = gw.pools["Hooked"]
        await wait_until(lambda: len(pool.targets) == 2, within_s=60, what="2 actor replicas")
        first = {rid: conn.address for rid, conn in pool.targets.items()}
    assert actors_in(ns) == {f"muxgate:{rid}" for rid in first}

    async with running_gateway(app(cluster, ns, [hooked(2)])) as gw:
        pool = gw.pools["Hooked"]
        await wait_until(lambda: len(pool.targets) == 2, within_s=30, what="adoption")
        # The same replicas at the same addresses: adopted, none started.
        assert {rid: conn.address for rid, conn in pool.targets.items()} == first
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            assert await served_by(client, "m1") in first
    assert actors_in(ns) == {f"muxgate:{rid}" for rid in first}

    # No secret configured: one was generated for the namespace and kept in
    # the cluster (the second gateway proved it to the adopted replicas); it
    # is never logged.
    from ray.experimental import internal_kv

    secret = internal_kv._internal_kv_get(b"muxgate:cluster-secret", namespace=ns)
    assert secret is not None and len(secret) >= 32
    assert secret.decode() not in caplog.text

    other = {"name": "Other", "import_path": "autoscale_apps:Hooked", "num_replicas": 0}
    async with running_gateway(app(cluster, ns, [other])):
        assert actors_in(ns) == set()  # Hooked is gone from the config: so are its actors


async def test_a_replica_that_fails_to_start_leaves_no_actor(cluster: Any) -> None:
    ns = "broken"
    broken = {
        "name": "Broken",
        "import_path": "autoscale_apps:Broken",
        "num_replicas": 0,
        "num_cpus": REPLICA_CPUS,
    }
    async with running_gateway(app(cluster, ns, [broken])) as gw:
        pool = gw.pools["Broken"]
        pool.set_target(1)
        await wait_until(lambda: pool.last_failure, within_s=60, what="a start failure")
        assert "model registry unreachable" in str(pool.last_failure)
        # The failed replica's detached actor is gone, its CPUs free (no retry
        # may be under way meanwhile: each start's actor is named after it).
        await wait_until(
            lambda: not actors_in(ns) or pool.is_starting(), within_s=30, what="no leftover actor"
        )
    await wait_until(lambda: not actors_in(ns), within_s=30, what="no actor after the gateway")


LEASE_S = 2.0
LOOPBACK = {"127.0.0.1", "::1"}


def _serve_in_a_process(
    config: dict[str, Any], tmp_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """``muxgate serve`` of ``config`` as a process of its own (a gateway that
    can die); its URL once it serves."""
    path = tmp_path / "app.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({**config, "app_dir": APPS}))
    log = tmp_path / "leader.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxgate.gateway._cli", "serve", str(path), "--port", "0"],
            stderr=stderr,
        )

    def url() -> str | None:
        assert proc.poll() is None, log.read_text()[-3000:]
        lines = log.read_text(errors="replace").splitlines()
        return next((ln.rsplit(" ", 1)[-1] for ln in lines if "serving on" in ln), None)

    try:
        found = wait_until_sync(url, within_s=90, what="the leader gateway's URL")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, str(found)


async def test_one_gateway_leads_and_another_takes_over_within_two_lease_periods(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxgate")
    ns = "lease"
    config = app(cluster, ns, [hooked(2)])
    config["launcher"]["lease_s"] = LEASE_S
    leader, leader_url = _serve_in_a_process(config, tmp_path)
    try:
        created = actors_in(ns)
        assert len(created) == 2
        async with running_gateway(config) as gw:
            pool = gw.pools["Hooked"]
            leadership = pool._procs.leadership
            assert leadership is not None
            await wait_until(lambda: len(pool.targets) == 2, within_s=30, what="adoption")
            await wait_until(lambda: leadership.asks > 0, what="an answer from the lease actor")
            lease = pool.snapshot()["lease"]
            assert lease["role"] == "follower" and lease["leader"] not in (None, lease["holder"])
            assert 'muxgate_leader{deployment="Hooked"} 0.0' in gw.metrics.render()[0].decode()
            # A follower never creates: asked for more, it still only follows.
            pool.set_target(4)
            asks = leadership.asks
            await wait_until(lambda: leadership.asks >= asks + 3, what="three lease asks")
            assert actors_in(ns) == created and pool.counts()["starting"] == 0
            pool.set_target(2)
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                assert await served_by(client, "m1") in pool.targets
            # Both gateways route over the same replicas.
            async with httpx.AsyncClient(base_url=leader_url, timeout=30) as client:
                assert f"muxgate:{await served_by(client, 'm1')}" in created
            # Every process of the cluster (GCS, raylets, workers, replicas: all
            # below this one) and both gateways listen on loopback only.
            listening = listening_addresses([os.getpid(), *descendants(os.getpid())])
            assert len(listening) >= 8, listening
            assert {a for found in listening.values() for a in found} <= LOOPBACK, listening

            leader.kill()  # the leader's gateway dies: it stops renewing
            killed_at = time.monotonic()
            await wait_until(leadership.is_leader, within_s=4 * LEASE_S, what="the takeover")
            handover_s = time.monotonic() - killed_at
            print(f"handover after the leader died: {handover_s:.2f} s (lease_s {LEASE_S:g})")
            assert handover_s <= 2 * LEASE_S
            assert pool.snapshot()["lease"]["role"] == "leader"
            await wait_until(  # once the pool acts as leader
                lambda: (
                    'muxgate_leader{deployment="Hooked"} 1.0' in gw.metrics.render()[0].decode()
                ),
                what="the leader gauge at 1",
            )

            # The new leader keeps the replicas it adopted, and scales.
            pool.set_target(3)
            await wait_until(lambda: len(pool.targets) == 3, within_s=60, what="a third replica")
            assert created < actors_in(ns) and len(actors_in(ns)) == 3

            # Fencing: an action stamped with an older epoch is refused.
            epoch = leadership.epoch
            assert epoch is not None and epoch >= 2
            name = sorted(created)[0]
            with pytest.raises(ray.exceptions.RayTaskError, match="not the current leader"):
                await ray.get_actor(name, namespace=ns).stop.remote(1.0, epoch - 1)
            # So is a drain: no token for a stale epoch (the replica obeys no
            # Drain without one: tests/integration/test_fenced_drain.py).
            with pytest.raises(ray.exceptions.RayTaskError, match="not the current leader"):
                await ray.get_actor(name, namespace=ns).allow_drain.remote(epoch - 1)
            assert (await ray.get_actor(name, namespace=ns).status.remote())[0] == "running"
            # The leader's scale-down drains with the token its actor issued.
            caplog.clear()
            pool.set_target(2)
            await wait_until(lambda: len(actors_in(ns)) == 2, within_s=60, what="a drained actor")
            assert "did not drain cleanly" not in caplog.text
            assert "not drained" not in caplog.text

            # A gateway whose config no longer has the deployment leaves the
            # actors of one that another gateway leads alone.
            from muxgate.gateway.launchers.ray import RayLauncher

            other = RayLauncher(secret="x" * 32, connect=pool._connect, namespace=ns)
            assert await asyncio.to_thread(other.remove_absent, {"Other"}) == []
            assert len(actors_in(ns)) == 2
            await wait_until(leadership.is_leader, within_s=2 * LEASE_S, what="still leading")

            # The lease actor restarts (as when its node dies): it restores
            # the last epoch and its holder from the Ray cluster's key-value
            # store, and the holder takes its lease back at its next ask,
            # with the same epoch; anyone else would wait a period.
            lease_name = "muxgate-lease-Hooked"
            epoch = leadership.epoch
            ray.kill(ray.get_actor(lease_name, namespace=ns), no_restart=False)
            await wait_until(
                lambda: "no answer from the authority" in caplog.text, what="the lease actor gone"
            )
            asks = leadership.asks
            await wait_until(
                lambda: leadership.asks >= asks + 2 and leadership.is_leader(),
                within_s=4 * LEASE_S,
                what="answers from the restarted lease actor",
            )
            assert leadership.epoch == epoch
            lease = ray.get_actor(lease_name, namespace=ns)
            assert tuple(await lease.state.remote()) == (leadership.holder, epoch)
    finally:
        if leader.poll() is None:
            leader.kill()
        leader.wait()
        for name in actors_in(ns):
            ray.kill(ray.get_actor(name, namespace=ns))
