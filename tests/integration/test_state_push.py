"""A replica pushes its state to the gateways that asked (``StatePush``).

Real ``muxgate replica`` processes on loopback TCP with the cluster secret;
each "gateway" here is the gateway's own end of a connection
(``ReplicaConnection``), with an ``on_state`` callback standing in for the
router, as the pool wires it. One stand-in replica checks the gateway's
reader against frames a real replica only sends in a race (a push in the
same read as ``Welcome``) and against garbage after a push.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.abc
import msgspec
import pytest
from standalone_replicas import SECRET, Standalone, standalone_replica, write_config

from muxgate.gateway._connection import ReplicaConnection, ReplicaDiedError
from muxgate.replicas._protocol import (
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    ReplicaState,
    Reply,
    StatePush,
    Welcome,
    encode_frame,
)
from muxgate.replicas.contract import ChannelAuth

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: tests/apps/warm_apps.py Gated: loads wait for a ``release("load-<id>")`` call
GATED = {"name": "Gated", "import_path": "warm_apps:Gated"}


class Watch:
    """The states a connection handed to ``on_state``, and a wait for one."""

    def __init__(self) -> None:
        self.states: list[ReplicaState] = []
        self._changed = anyio.Event()

    def __call__(self, state: ReplicaState) -> None:
        self.states.append(state)
        self._changed.set()

    async def until(self, check: Callable[[ReplicaState], bool], what: str) -> ReplicaState:
        with anyio.fail_after(10):
            while not (self.states and check(self.states[-1])):
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.states[-1]


@pytest.fixture(scope="module")
async def gated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Standalone]:
    config = write_config(tmp_path_factory.mktemp("state-push"), [GATED])
    async with standalone_replica(config, "Gated", "gated-0") as replica:
        yield replica


async def _connect(
    replica: Standalone, *, on_state: Watch | None = None, push_state: bool = True
) -> ReplicaConnection:
    return await ReplicaConnection.connect(
        replica.address, on_state=on_state, auth=ChannelAuth(SECRET.encode()), push_state=push_state
    )


def _call(method: str, *args: object) -> dict[str, bytes]:
    return {"method": method, "args": msgspec.msgpack.encode(list(args))}


async def test_a_second_gateway_learns_of_a_load_it_never_asked_about(gated: Standalone) -> None:
    """Gateway ``first`` starts a load; ``second`` (pushes on) sees it loading,
    then loaded, without sending a frame; ``old`` (pushes off, as a gateway
    of an earlier release) gets no push, only its pong's state."""
    watch = Watch()
    first = await _connect(gated)
    second = await _connect(gated, on_state=watch)
    old = await _connect(gated, push_state=False)
    try:
        async with anyio.create_task_group() as tg:
            loaded: list[Reply] = []

            async def load() -> None:
                loaded.append(await first.control("load", "push-a"))

            tg.start_soon(load)
            state = await watch.until(lambda s: "push-a" in s.loading, "push-a loading")
            assert "push-a" not in state.models
            assert second.pushes >= 1 and second.state is state
            # The replica answered nothing of second's: only pushes moved its state.
            assert second.in_flight == 0 and second.counters == {}
            await first.call(request_id="release", **_call("release", "load-push-a"))
        assert loaded[0].error is None
        state = await watch.until(lambda s: "push-a" in s.models and not s.loading, "push-a")
        assert state.models == ["push-a"]
        assert state.cache_limit == 8  # Gated's max_num_models_per_replica
        # A push to old would have been written in the same turn as second's,
        # before the replica read old's ping: the pong comes after any push.
        pong = await old.ping()
        assert "push-a" in pong.state.models
        assert old.pushes == 0
        # The pushes answered no call: every connection still works.
        assert (await second.control("unload", "push-a")).error is None
        await watch.until(lambda s: "push-a" not in s.models, "push-a unloaded")
    finally:
        for conn in (first, second, old):
            await conn.aclose()
    assert first.close_reason == second.close_reason == "closed by gateway"


def _welcome() -> Welcome:
    return Welcome(
        version=PROTOCOL_VERSION, deployment="D", replica_id="fake", pid=1, state=ReplicaState()
    )


async def _stand_in(listener: anyio.abc.SocketListener, hellos: list[Hello]) -> None:
    """Serve one connection: Welcome and a push in one write; to the first
    Call two pushes, then the Reply; to the second, garbage."""
    async with listener:
        stream = await listener.accept()
        async with stream:
            decoder = FrameDecoder()
            (hello,) = decoder.feed(await stream.receive())
            assert isinstance(hello, Hello)
            hellos.append(hello)
            pushed = StatePush(state=ReplicaState(loading=["m"]))
            await stream.send(encode_frame(_welcome()) + encode_frame(pushed))
            messages: list[object] = []
            while len(messages) < 1:
                messages += decoder.feed(await stream.receive())
            call_id = messages[0].id  # type: ignore[attr-defined]
            await stream.send(
                encode_frame(StatePush(state=ReplicaState(in_flight=1, models=["m"])))
                + encode_frame(StatePush(state=ReplicaState(in_flight=1, models=["m", "n"])))
            )
            await stream.send(encode_frame(Reply(id=call_id, state=ReplicaState(models=["m"]))))
            while len(messages) < 2:
                messages += decoder.feed(await stream.receive())
            # A push whose state is not a ReplicaState: garbage in a known frame.
            bad = msgspec.msgpack.encode({"t": "state_push", "state": "not a state"})
            await stream.send(len(bad).to_bytes(4, "big") + bad)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await stream.receive()


async def test_pushes_move_only_the_state_and_garbage_closes_only_that_connection(
    gated: Standalone,
) -> None:
    path = f"/tmp/muxgate-push-{os.getpid()}.sock"
    hellos: list[Hello] = []
    real = await _connect(gated)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stand_in, await anyio.create_unix_listener(path), hellos)
            watch = Watch()
            fake = await ReplicaConnection.connect(
                f"unix:{path}", on_state=watch, connect_timeout=10
            )
            assert hellos[0].push_state
            # The push that came in the same read as Welcome was applied.
            assert fake.state == ReplicaState(loading=["m"]) and fake.pushes == 1
            reply = await fake.call(request_id="first")
            # Neither push was taken for the reply; each state was applied in order.
            assert reply.state == ReplicaState(models=["m"])
            assert [s.models for s in watch.states] == [[], ["m"], ["m", "n"], ["m"]]
            assert fake.pushes == 3
            with anyio.fail_after(10), pytest.raises(ReplicaDiedError):
                await fake.call(request_id="second")
            assert fake.close_reason is not None
            assert fake.close_reason.startswith("protocol error")
            await fake.aclose()
        # The gateway's other connection is untouched.
        assert real.close_reason is None
        assert (await real.ping()).state.in_flight == 0
    finally:
        await real.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
