"""Pure parts of muxgate.backends: joins, redaction, retry rules, cache planning."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxgate.backends._artifact import Artifact
from muxgate.backends._cache import (
    CachedFile,
    DiskCache,
    KeyLock,
    cache_key,
    plan_eviction,
    version_token,
)
from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig
from muxgate.backends._deadline import storage_budget, storage_deadline
from muxgate.backends._errors import (
    InvalidModelIdError,
    ModelNotFoundError,
    StorageUnavailableError,
)
from muxgate.backends._fetch import Strategy, choose_strategy, plan_parts, source_of
from muxgate.backends._formats import _decode, _refused_global, _state_dict
from muxgate.backends._instances import FilesystemInstances, freeze_options
from muxgate.backends._registry import register_backend
from muxgate.backends._retry import is_access_denied, is_transient, with_retries
from muxgate.backends._urls import join_model_url, redact_url, split_protocol


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("s3://bucket", "s3://bucket/m1/model.pt"),
        ("s3://bucket/models/", "s3://bucket/models/m1/model.pt"),
        ("file:///srv/models", "file:///srv/models/m1/model.pt"),
        ("file:///", "file:///m1/model.pt"),
        ("/srv/models", "/srv/models/m1/model.pt"),
        ("/", "/m1/model.pt"),
        ("memory://root", "memory://root/m1/model.pt"),
    ],
)
def test_join(root: str, expected: str) -> None:
    assert join_model_url(root, "m1", "model.pt") == expected


def test_join_allows_nested_ids_and_ordinary_characters() -> None:
    assert (
        join_model_url("s3://b", "org/model-v1.2_x:tag", "w.pt")
        == "s3://b/org/model-v1.2_x:tag/w.pt"
    )


@pytest.mark.parametrize(
    ("root", "model_id", "expected"),
    [
        # Paths of http(s):// roots are URLs: each piece is percent-encoded.
        ("https://h/models", "a?b", "https://h/models/a%3Fb/model.pt"),
        ("http://h/", "org/a#b", "http://h/org/a%23b/model.pt"),
        ("http://h", "a%41", "http://h/a%2541/model.pt"),
        ("http://h", "a+b@c:d", "http://h/a%2Bb%40c%3Ad/model.pt"),
        # Elsewhere the same ids are the keys as they are.
        ("s3://b", "a?b#c%41", "s3://b/a?b#c%41/model.pt"),
        ("gs://b", "a?versionId=1", "gs://b/a?versionId=1/model.pt"),
        ("gs://b", "a?generation=1", "gs://b/a?generation=1/model.pt"),
        ("s3://b", "a?generation=1&x", "s3://b/a?generation=1&x/model.pt"),
        ("file:///srv", "a?b#c", "file:///srv/a?b#c/model.pt"),
        # adlfs keeps any other "?" and a "#" in the blob name
        ("az://c/models", "a?b#c", "az://c/models/a?b#c/model.pt"),
        ("abfs://c", "a?versionId=1", "abfs://c/a?versionId=1/model.pt"),
        ("hf://org/repo", "a?b#c", "hf://org/repo/a?b#c/model.pt"),
    ],
)
def test_join_writes_the_id_as_each_backend_reads_it(
    root: str, model_id: str, expected: str
) -> None:
    assert join_model_url(root, model_id, "model.pt") == expected


@pytest.mark.parametrize(
    ("root", "model_id", "refused"),
    [
        ("s3://bucket/models", "a?versionId=1", "?versionId="),
        ("s3a://bucket", "x/a?versionId=", "?versionId="),
        ("s3://bucket", "?versionId=null", "?versionId="),
        ("gs://bucket", "a?generation=1&x", "?generation=1&"),
        ("gcs://bucket", "a?b/&gener%61tion=2&c", "?b/&gener%61tion=2&"),
        ("az://container/models", "a?versionid=1", "?versionid="),
        ("abfs://container", "x/?versionid=2", "?versionid="),
        ("hf://org", "repo@v1", "@"),
        ("hf://org/repo/models", "a@b", "@"),
    ],
)
def test_join_refuses_what_a_backend_reads_as_a_version(
    root: str, model_id: str, refused: str
) -> None:
    with pytest.raises(InvalidModelIdError) as info:
        join_model_url(root, model_id, "model.pt")
    assert info.value.model_id == model_id
    protocol = root.split(":")[0]
    assert info.value.client_message.startswith(
        f"invalid model id {model_id!r}: {refused!r} is not allowed on {protocol}:// storage: "
    )
    assert "object version" in info.value.reason


def test_registered_backends_bring_their_id_rules() -> None:
    protocol = f"idrules{uuid.uuid4().hex[:8]}"
    register_backend(
        protocol,
        "fsspec.implementations.http.HTTPFileSystem",
        url_paths=True,
        reserved={"!+": "a revision marker"},
    )
    assert join_model_url(f"{protocol}://h", "a?b", "m") == f"{protocol}://h/a%3Fb/m"
    with pytest.raises(InvalidModelIdError, match=r"'!!!' is not allowed.*a revision marker"):
        join_model_url(f"{protocol}://h", "a!!!b")
    # An unregistered protocol joins as it did (its fetch fails later).
    assert join_model_url("nosuch://h", "a?b") == "nosuch://h/a?b"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        ".",
        "a/..",
        "../x",
        "/abs",
        "a//b",
        "a/",
        "s3://x",
        "http://h/x",
        "file:/etc",
        "C:x",
        "c:\\x",
        "a\\b",
        "a\nb",
        "a\x7fb",
        "%2e%2E",
        "a/%2f",
        "~user",
    ],
)
def test_join_refuses(bad: str) -> None:
    with pytest.raises(InvalidModelIdError) as info:
        join_model_url("s3://bucket/models", bad)
    assert isinstance(info.value, ValueError)
    assert info.value.model_id == bad
    with pytest.raises(InvalidModelIdError):
        join_model_url("s3://bucket/models", "ok", bad)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=30))
def test_join_never_leaves_root(model_id: str) -> None:
    root = "s3://bucket/models"
    try:
        url = join_model_url(root, model_id, "model.pt")
    except InvalidModelIdError:
        return
    assert url.startswith(root + "/")
    segments = url[len(root) + 1 :].split("/")
    assert all(s not in ("", ".", "..") for s in segments)
    assert "\\" not in url and "://" not in url[len("s3://") :]


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=30))
def test_join_under_an_http_root_is_one_path_below_it(model_id: str) -> None:
    # No query, fragment or escape of the id's own: decoding the path gives
    # back exactly root/id/model.pt.
    root = "https://h/models"
    try:
        url = join_model_url(root, model_id, "model.pt")
    except InvalidModelIdError:
        return
    parts = urlsplit(url)
    assert (parts.query, parts.fragment) == ("", "")
    assert unquote(parts.path) == f"/models/{model_id}/model.pt"


def test_split_and_redact() -> None:
    assert split_protocol("s3://b/k") == ("s3", "b/k")
    assert split_protocol("/srv/m") == ("file", "/srv/m")
    assert split_protocol("GS://b") == ("gs", "b")
    assert redact_url("https://user:secret@host/x.pt?X-Amz-Signature=abc") == "https://host/x.pt"
    assert redact_url("s3://bucket/k") == "s3://bucket/k"
    assert redact_url("/a/b") == "/a/b"


class _ClientError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.response = {"ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's: classified by name, botocore not imported."""


def _wrapped(inner: BaseException) -> OSError:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise OSError(errno.EIO, "translated") from exc
    except OSError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.ECONNREFUSED, "refused"), True),
        (_ClientError(503), True),
        (_ClientError(500), True),
        (_ClientError(429), True),
        (_ClientError(403), False),
        (_ClientError(404), False),
        (_wrapped(_ClientError(503)), True),
        (_wrapped(_ClientError(400)), False),
        (EndpointConnectionError(), True),
        (FileNotFoundError("x"), False),
        (PermissionError("x"), False),
        (ModelNotFoundError("s3://b/k"), False),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


class NoCredentialsError(Exception):
    """Named like botocore's: classified by name, botocore not imported."""


class _HttpError(Exception):
    """Like gcsfs's HttpError: the status in ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"status {code}")
        self.code = code


@pytest.mark.parametrize(
    ("exc", "denied"),
    [
        (PermissionError("Forbidden"), True),  # s3fs: AccessDenied, InvalidAccessKeyId, 403
        (_wrapped(PermissionError("Forbidden")), True),
        (_ClientError(403), True),
        (_HttpError(401), True),
        (_HttpError(403), True),
        (NoCredentialsError("Unable to locate credentials"), True),
        (_wrapped(NoCredentialsError()), True),
        (OSError("Forbidden: b/k\nno access"), True),  # gcsfs's 403
        (OSError(errno.EIO, "Forbidden: not gcsfs's shape"), False),
        (_HttpError(404), False),
        (_ClientError(503), False),
        (FileNotFoundError("x"), False),
        (ConnectionResetError(), False),
        (ValueError("Forbidden: a value"), False),
    ],
)
def test_is_access_denied(exc: BaseException, denied: bool) -> None:
    assert is_access_denied(exc) is denied
    if denied:
        assert not is_transient(exc)  # never retried


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy(base_delay=0.1, multiplier=2, max_delay=0.5)
    assert [policy.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.anyio
async def test_with_retries_gives_up_after_max_attempts() -> None:
    calls = 0

    async def op(left: float | None) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("reset")

    policy = RetryPolicy(max_attempts=3, base_delay=0, deadline=5)
    with pytest.raises(StorageUnavailableError) as info:
        await with_retries(op, policy=policy, url="s3://b/k")
    assert calls == 3
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, ConnectionResetError)


@pytest.mark.anyio
async def test_with_retries_respects_deadline_and_permanent_errors() -> None:
    now = [0.0]

    async def slow_failure(left: float | None) -> int:
        now[0] += 4.0  # each attempt "takes" 4 s on the fake clock
        raise TimeoutError

    policy = RetryPolicy(max_attempts=100, base_delay=0, deadline=10)
    with pytest.raises(StorageUnavailableError) as info:
        await with_retries(slow_failure, policy=policy, url="u", clock=lambda: now[0])
    assert info.value.attempts == 3

    async def missing(left: float | None) -> int:
        raise FileNotFoundError("k")

    with pytest.raises(FileNotFoundError):
        await with_retries(missing, policy=policy, url="u")

    results: Iterator[BaseException | int] = iter([ConnectionResetError(), 7])

    async def flaky(left: float | None) -> int:
        item = next(results)
        if isinstance(item, BaseException):
            raise item
        return item

    assert await with_retries(flaky, policy=RetryPolicy(base_delay=0), url="u") == 7


def test_version_token_prefers_store_versions() -> None:
    assert version_token({"size": 3, "generation": "17", "mtime": 1}) == "generation=17;size=3"
    assert version_token({"size": 3, "ETag": '"abc"'}) == 'ETag="abc";size=3'
    assert version_token({"size": 3, "mtime": 12.5}) == "mtime=12.5;size=3"
    assert cache_key("s3://b/k@", "ETag=1") != cache_key("s3://b/k@", "ETag=2")
    assert cache_key("s3://b/k@http://a", "t") != cache_key("s3://b/k@http://b", "t")


def test_plan_eviction_lru_and_keep() -> None:
    files = [CachedFile(Path(f"/c/{n}"), 10, mtime) for n, mtime in (("a", 1), ("b", 2), ("c", 3))]
    assert plan_eviction(files, 30, None) == []
    assert plan_eviction(files, 25, None) == [Path("/c/a")]
    assert plan_eviction(files, 10, None) == [Path("/c/a"), Path("/c/b")]
    assert plan_eviction(files, 10, Path("/c/a")) == [Path("/c/b"), Path("/c/c")]
    assert plan_eviction(files, 0, Path("/c/c")) == [Path("/c/a"), Path("/c/b")]


def test_disk_cache_commit_lookup_evict(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=15)
    keys = [cache_key(f"file:///{i}@", "t") for i in range(3)]
    for key in keys[:2]:
        temp = cache.temp_path(key)
        temp.write_bytes(b"x" * 10)
        assert cache.lookup(key) is None  # a temp file is never visible
        final = cache.commit(temp, key)
        cache.evict(keep=final)
    assert cache.lookup(keys[0]) is None  # evicted: 20 > 15
    assert cache.lookup(keys[1], 10) is not None
    assert cache.lookup(keys[1], 11) is None  # wrong size: dropped
    assert cache.files() == []
    assert "max_bytes=15" in repr(cache)


def test_disk_cache_remembers_the_last_confirmed_version(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=15)
    identity = "s3://b/m/model.pt@http://127.0.0.1:9000"
    assert cache.last_confirmed(identity) is None
    old, new = cache_key(identity, "v1"), cache_key(identity, "v2")
    for key in (old, new):
        temp = cache.temp_path(key)
        temp.write_bytes(b"x" * 5)
        cache.commit(temp, key)
    cache.confirm(identity, old)
    assert cache.last_confirmed(identity) == cache.path_for(old)
    cache.confirm(identity, new)  # the remote named another version
    assert cache.last_confirmed(identity) == cache.path_for(new)
    assert cache.confirmed_key("s3://b/other@") is None
    cache.path_for(new).unlink()  # evicted by another process
    assert cache.last_confirmed(identity) is None
    assert cache.confirmed_key(identity) == new
    cache.evict()  # a cleanup drops links whose file is gone
    assert cache.confirmed_key(identity) is None
    assert cache.lookup(old) is not None  # and nothing else


def test_storage_budget_keeps_time_to_answer() -> None:
    assert storage_budget(10.0) == 9.0
    assert storage_budget(2.0) == 1.5
    assert storage_budget(0.0) == storage_budget(-1.0) == 0.0
    assert storage_deadline() is None  # outside a request


@pytest.mark.anyio
async def test_with_retries_bounds_each_attempt_by_the_deadline() -> None:
    now = [0.0]
    given_left: list[float | None] = []

    async def hangs_until_timeout(left: float | None) -> int:
        given_left.append(left)
        assert left is not None
        now[0] += left  # the attempt waits out all it was given
        raise TimeoutError

    policy = RetryPolicy(max_attempts=100, base_delay=0, deadline=30)
    with pytest.raises(StorageUnavailableError) as info:
        await with_retries(
            hangs_until_timeout, policy=policy, url="u", deadline=2.5, clock=lambda: now[0]
        )
    assert given_left == [2.5]  # no retry after the deadline
    assert info.value.attempts == 1
    with pytest.raises(StorageUnavailableError, match="no time left"):
        await with_retries(
            hangs_until_timeout, policy=policy, url="u", deadline=2.0, clock=lambda: now[0]
        )
    assert len(given_left) == 1  # nothing started past the deadline


def test_strategy_and_parts() -> None:
    kw = {"size": 10, "part_size": 4}
    assert choose_strategy(is_local=True, cached=False, **kw) is Strategy.LOCAL_FILE
    assert choose_strategy(is_local=False, cached=True, **kw) is Strategy.CACHED
    assert choose_strategy(is_local=False, cached=False, **kw) is Strategy.TEMP_FILE
    assert choose_strategy(is_local=False, cached=False, size=4, part_size=4) is Strategy.BYTES
    assert plan_parts(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_parts(0, 4) == []
    # One request below the threshold, parts from it up.
    assert plan_parts(7, 4, parallel_threshold=8) == [(0, 7)]
    assert plan_parts(8, 4, parallel_threshold=8) == [(0, 4), (4, 8)]
    assert plan_parts(0, 4, parallel_threshold=8) == []
    assert StorageConfig(part_size=4).single_request_below() == 8
    assert StorageConfig(part_size=4, parallel_threshold=100).single_request_below() == 100


def test_fetch_source_attribute() -> None:
    assert source_of(cache_hit=True, remote=True) == "cache"
    assert source_of(cache_hit=False, remote=True) == "remote"
    assert source_of(cache_hit=False, remote=False) == "local"


def test_filesystem_instances_keyed_by_option_values() -> None:
    a = {"endpoint_url": "http://x", "client_kwargs": {"region_name": "r"}, "list": [1, 2]}
    b = {"list": [1, 2], "client_kwargs": {"region_name": "r"}, "endpoint_url": "http://x"}
    assert freeze_options(a) == freeze_options(b) and hash(freeze_options(a)) == hash(
        freeze_options(b)
    )
    assert freeze_options({**a, "client_kwargs": {"region_name": "s"}}) != freeze_options(a)
    assert freeze_options({"x": [1]}) != freeze_options({"x": (1,)})
    with pytest.raises(TypeError):
        freeze_options({"unhashable": bytearray(b"x")})
    instances = FilesystemInstances(max_size=2)
    fs = [object(), object(), object()]
    for i, f in enumerate(fs):
        instances.put(i, f)
    assert instances.get(0) is None  # least recently used went first
    assert instances.get(2) is fs[2]
    assert "size=2" in repr(instances)
    instances.clear()
    assert instances.get(2) is None


def test_key_lock_is_exclusive_and_stale_locks_go_only_when_idle(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=100)
    cached, gone, busy = (cache_key(f"file:///{n}@", "t") for n in ("c", "g", "b"))
    for key in (cached, gone, busy):
        lock = cache.lock(key)
        lock.acquire(1)
        assert lock.is_locked
        other = cache.lock(key)
        assert not other.try_acquire()  # exclusive, also within one process
        lock.release()
    temp = cache.temp_path(cached)
    temp.write_bytes(b"x")
    cache.commit(temp, cached)
    holder = cache.lock(busy)
    assert holder.try_acquire()
    cache.evict()
    names = sorted(p.name for p in cache.lock_files())
    # gone: no cache file and idle, removed; busy: held, kept; cached: kept.
    assert names == sorted(f"{k}.lock" for k in (cached, busy))
    assert "held=True" in repr(holder)
    holder.release()
    cache.evict()
    assert [p.name for p in cache.lock_files()] == [f"{cached}.lock"]
    # A lock taken after its file was removed is a lock on the new file.
    again = cache.lock(gone)
    assert again.try_acquire()
    assert not KeyLock(tmp_path / "locks" / f"{gone}.lock").try_acquire()
    again.release()


def test_eviction_waits_for_a_running_cleanup(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10)
    keys = [cache_key(f"file:///{i}@", "t") for i in range(2)]
    for key in keys:
        temp = cache.temp_path(key)
        temp.write_bytes(b"x" * 10)
        cache.commit(temp, key, fsync=False)
    other = KeyLock(tmp_path / ".evict.lock")  # another process's cleanup
    assert other.try_acquire()
    assert cache.evict(timeout=0.05) == []  # gave up waiting: nothing removed
    result: list[list[Path]] = []
    waiter = threading.Thread(target=lambda: result.append(cache.evict(timeout=30)))
    waiter.start()
    other.release()
    waiter.join(timeout=30)
    assert result == [[cache.path_for(keys[0])]] or result == [[cache.path_for(keys[1])]]
    assert cache.total_bytes() <= 10


def test_storage_config_validation_and_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StorageConfig(part_size=0)
    with pytest.raises(ValueError):
        StorageConfig(parallel_threshold=0)
    assert CacheConfig().fsync
    config = StorageConfig(cache=CacheConfig(directory=tmp_path, enabled=False))
    assert not config.cache.enabled_for("s3")
    assert CacheConfig(protocols={"file": True}).enabled_for("file")
    assert config.options_for("s3")["config_kwargs"]["retries"]["total_max_attempts"] == 1


def test_errors_pickle_with_their_fields() -> None:
    err = StorageUnavailableError("s3://b/k", attempts=3, elapsed=1.5, reason="503")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is StorageUnavailableError
    assert (copy.url, copy.attempts, copy.elapsed, str(copy)) == ("s3://b/k", 3, 1.5, str(err))
    bad = pickle.loads(pickle.dumps(InvalidModelIdError("..", "nope")))
    assert isinstance(bad, InvalidModelIdError) and isinstance(bad, ValueError)
    assert bad.reason == "nope"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # torch 2.13's two wordings, as embedded in its "Weights only load failed" text.
        (
            "Weights only load failed. ...\n\nTrying to load unsupported GLOBAL posix.system "
            "whose module posix is blocked.\n\nCheck the documentation of torch.load",
            "posix.system",
        ),
        (
            "\tWeightsUnpickler error: Unsupported global: GLOBAL eval was not an allowed "
            "global by default. Please use `torch.serialization.add_safe_globals([eval])`",
            "eval",
        ),
        ("Unsupported global: GLOBAL __main__.Net was not an allowed global", "__main__.Net"),
        # Case and spacing are not relied on.
        ("trying to load unsupported global nt.system whose module nt is blocked", "nt.system"),
        ("UNSUPPORTED GLOBAL:  GLOBAL subprocess.Popen was not allowed", "subprocess.Popen"),
        # Refusals that name no global, and unrelated failures.
        ("Unsupported operand 147", None),
        ("Can only build Tensor, Parameter, OrderedDict or types allowlisted", None),
        ("not an allowed global by default", None),
        ("invalid load key, 'x'.", None),
    ],
)
def test_refused_global_in_torch_messages(message: str, expected: str | None) -> None:
    assert _refused_global(message) == expected


def test_importing_backends_does_not_import_torch_or_cloud_sdks() -> None:
    code = (
        "import sys, muxgate.backends._formats, muxgate.backends._fetch;"
        "print(sorted(m for m in ('torch', 's3fs', 'gcsfs', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_model_file_removed_between_fetch_and_read_is_not_found(tmp_path: Path) -> None:
    """The fetch saw the file; it is gone when torch opens it: 404, not a format error."""
    gone = tmp_path / "m" / "model.pt"
    artifact = Artifact(
        url=f"file://{gone}", size=10, cache_hit=False, strategy=Strategy.LOCAL_FILE, path=str(gone)
    )
    with pytest.raises(ModelNotFoundError):
        _decode(artifact, "state_dict", lambda a: _state_dict("cpu", False, a))
