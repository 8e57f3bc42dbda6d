"""What the tests' processes are and where they listen, from /proc (Linux)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

__all__ = ["descendants", "listening_addresses"]


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid``: a gateway's replicas (its
    children when spawned, its fork server's when forked), a Ray cluster's
    raylets and workers (children of the test process that started it)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent]
        found += children
        frontier += children
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``/proc/net/tcp{,6}``'s ``HEX:PORT`` host part (32-bit words in host
    byte order, little-endian here); an IPv4-mapped IPv6 address as IPv4."""
    raw = bytes.fromhex(hex_address.split(":")[0])
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(swapped)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def listening_addresses(pids: list[int]) -> dict[int, set[str]]:
    """pid -> the host addresses its TCP sockets listen on (``127.0.0.1``,
    ``::1``, ``0.0.0.0``, ``::`` ...; IPv4-mapped ones as IPv4), for the processes in ``pids``
    that listen at all (processes gone meanwhile are skipped)."""
    listening: dict[str, str] = {}  # socket inode -> host address
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = str(_address(fields[1]))
    found: dict[int, set[str]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target.removeprefix("socket:[").removesuffix("]")
            if target.startswith("socket:[") and inode in listening:
                found.setdefault(pid, set()).add(listening[inode])
    return found
