"""``muxgate status [URL]``: a running gateway's ``/-/replicas`` for a terminal.

``render(snapshot)`` is pure (the snapshot is the decoded JSON), so its
output is tested without a gateway; ``fetch`` is the I/O around it.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["StatusError", "base_url", "fetch", "render"]


class StatusError(Exception):
    """The gateway could not be asked (not running, refused, bad token)."""


def base_url(url: str) -> str:
    """``url`` without a trailing ``/``; ``http://`` added to a bare
    ``HOST:PORT`` (what ``muxgate serve`` prints after "serving on" has one),
    ``http://127.0.0.1:`` to a bare port, and the status page's ``/-/`` (the
    URL ``muxgate demo`` prints) taken off."""
    if url.isdigit():
        url = f"127.0.0.1:{url}"
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url.removesuffix("/-")


def fetch(url: str, token: str | None, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET {url}/-/replicas`` with the bearer token when one is given."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    target = base_url(url) + "/-/replicas"
    try:
        response = httpx.get(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise StatusError(
            f"cannot reach {target}: {exc} (is `muxgate serve` running there?"
            " give its address: muxgate status http://HOST:PORT)"
        ) from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        if token:
            hint = " (the token given was refused: check --token or MUXGATE_ADMIN_TOKEN)"
        else:
            hint = " (give the admin token with --token or MUXGATE_ADMIN_TOKEN)"
        raise StatusError(
            f"{target} answered {response.status_code}: {message}"
            + (hint if response.status_code == 401 else "")
        )
    body: dict[str, Any] = response.json()
    return body


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"  # unreachable


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render(snapshot: dict[str, Any], url: str = "") -> str:
    """The snapshot as text: per deployment a header line, its replicas as a
    table (models least recently used first), start failures and
    quarantined models."""
    lines = [f"muxgate at {url}" if url else "muxgate"]
    for name, dep in sorted(snapshot.get("deployments", {}).items()):
        replicas = dep.get("replicas", [])
        running = sum(1 for r in replicas if r.get("state") == "running")
        scaling = dep.get("autoscaling")
        bounds = (
            f" (autoscaling {scaling['min_replicas']}..{scaling['max_replicas']})"
            if scaling
            else ""
        )
        lines.append("")
        lines.append(
            f"{name}: {running} running of {dep.get('target_replicas', '?')} wanted{bounds},"
            f" {dep.get('in_flight', 0)} in flight, {dep.get('queued', 0)} queued"
        )
        if replicas:
            with_rss = any("rss_bytes" in r for r in replicas)
            header = ["REPLICA", "STATE", "PID", "IN FLIGHT", "MODELS (LRU first)", "LOADING"]
            rows = [header + (["RSS"] if with_rss else [])]
            for r in replicas:
                row = [
                    str(r.get("id", "")),
                    str(r.get("state", "")),
                    str(r.get("pid") or "-"),
                    str(r.get("in_flight", 0)),
                    " ".join(r.get("models", [])) or "-",
                    " ".join(r.get("loading", [])) or "-",
                ]
                if with_rss:
                    row.append(_bytes(r.get("rss_bytes")))
                rows.append(row)
            lines.extend(_table(rows))
        else:
            lines.append("  no replicas")
        lease = dep.get("lease")
        if lease:
            lines.append(_lease_line(lease))
        if dep.get("last_failure"):
            lines.append(f"  last start failure: {dep['last_failure']}")
        quarantined = dep.get("quarantined") or []
        if quarantined:
            ids = [str(q.get("model_id")) if isinstance(q, dict) else str(q) for q in quarantined]
            lines.append(f"  quarantined models: {' '.join(ids)}")
    return "\n".join(lines) + "\n"


def _lease_line(lease: dict[str, Any]) -> str:
    """Who sizes the shared pool: this gateway (the leader) or another."""
    if lease.get("role") == "leader":
        return f"  lease: leader (epoch {lease.get('epoch')}, holder {lease.get('holder')})"
    leader = lease.get("leader") or "none yet"
    return f"  lease: follower of {leader} (this gateway: {lease.get('holder')})"
