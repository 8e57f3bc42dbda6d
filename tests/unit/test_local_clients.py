"""Which clients the admin endpoints and handle calls answer without a token."""

from __future__ import annotations

import pytest

from muxgate.gateway._frontend import is_local_client


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.0.9", "::1", "localhost"])
def test_loopback_clients_are_local(host: str) -> None:
    assert is_local_client(host)


def test_an_ipv4_mapped_loopback_client_is_local() -> None:
    # what a gateway bound to "::" sees of a client at 127.0.0.1
    assert is_local_client("::ffff:127.0.0.1")


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.5", "::ffff:10.0.0.1", "2001:db8::1", "evil.example", "", None]
)
def test_other_clients_are_not(host: str | None) -> None:
    assert not is_local_client(host)
