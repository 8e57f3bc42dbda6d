"""The replica's drain fence: tokens from its supervisor's pipe, each used once."""

from __future__ import annotations

import os

from muxgate.replicas._drain_fence import MAX_TOKENS, DrainFence


def test_a_drain_fence_admits_each_supervisor_token_once() -> None:
    fence = DrainFence(None)
    assert not fence.admits(None) and not fence.admits("a")
    fence.feed(b"DRAIN a\nDRA")  # a line may come in pieces
    fence.feed(b"IN b\nnoise\nDRAIN\n")
    assert not fence.admits("c") and not fence.admits("DRAIN")
    assert fence.admits("b") and fence.admits("a")
    assert not fence.admits("a")  # used up
    for i in range(MAX_TOKENS + 1):
        fence.feed(f"DRAIN t{i}\n".encode())
    assert not fence.admits("t0") and fence.admits(f"t{MAX_TOKENS}")  # the newest kept
    assert repr(fence) == f"<DrainFence fd=None tokens={MAX_TOKENS - 1}>"


def test_a_drain_fence_reads_the_pipe_before_deciding() -> None:
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        fence = DrainFence(read)
        assert not fence.admits("x")  # nothing in the pipe yet
        os.write(write, b"DRAIN x\n")
        assert fence.admits("x")  # written before the Drain came: seen
    finally:
        os.close(read)
        os.close(write)
