"""Process-wide storage configuration, set once from the app config.

Nothing here reads the environment at import time: the default
configuration is built on first use (or by :func:`configure_storage`), and
only then are ``MUXGATE_CACHE_DIR`` and ``XDG_CACHE_HOME`` consulted.
"""

from __future__ import annotations

import copy
import difflib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import msgspec
from fsspec.registry import known_implementations

from ._registry import backend_spec, registered_protocols

DEFAULT_CACHE_MAX_BYTES = 20 * 2**30
DEFAULT_PART_SIZE = 8 * 2**20
DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential back-off for transient storage errors.

    Attempt ``n`` (from 1) that fails transiently waits
    ``min(max_delay, base_delay * multiplier ** (n - 1))`` before the next,
    unless ``max_attempts`` are used up or the next attempt would start after
    ``deadline`` seconds from the first.

    Attributes:
        max_attempts: Total attempts per storage call (>= 1).
        base_delay: First back-off in seconds.
        multiplier: Growth factor of the back-off.
        max_delay: Cap of one back-off.
        deadline: Cap on the whole call including back-off, in seconds.
    """

    max_attempts: int = 5
    base_delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 2.0
    deadline: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0:
            raise ValueError("delays must be >= 0 and deadline > 0")

    def delay(self, attempt: int) -> float:
        """Back-off after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1)))


@dataclass(frozen=True)
class CacheConfig:
    """The local disk cache shared by every replica process of a host.

    Attributes:
        directory: Cache folder; ``None`` means ``$MUXGATE_CACHE_DIR`` or
            ``$XDG_CACHE_HOME/muxgate`` or ``~/.cache/muxgate``, resolved when
            the configuration is built.
        max_bytes: Size bound; least recently used files are removed beyond it.
        enabled: ``None`` caches remote protocols (s3, gs, ...) and not local
            ones (file, memory); ``True``/``False`` force it for all.
        protocols: Per-protocol override of ``enabled``, e.g. ``{"s3": False}``.
        fsync: ``fsync`` each download before publishing it under its final
            name, so that after a power loss or kernel crash a cache file is
            either complete or absent (a download is pre-sized and written
            at offsets, so without it a crash can leave a file of the right
            size with zeroed ranges, which the size check cannot catch).
            It costs one flush of the file to disk per download (measured
            in ``bench/bench_storage.py``); turn it off only for a cache on
            disposable storage.
    """

    directory: Path | None = None
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    enabled: bool | None = None
    protocols: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    fsync: bool = True

    def enabled_for(self, protocol: str) -> bool:
        """Whether objects of ``protocol`` go through the disk cache."""
        if protocol in self.protocols:
            return bool(self.protocols[protocol])
        if self.enabled is not None:
            return self.enabled
        return backend_spec(protocol).remote


@dataclass(frozen=True)
class StorageConfig:
    """Everything backends needs to know, parsed once and passed down.

    Attributes:
        options: fsspec storage options per protocol, e.g.
            ``{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}``.
        cache: Disk cache settings.
        retry: Retry policy for transient errors.
        part_size: Bytes per ranged request of a parallel download.
        concurrency: Ranged requests in flight per download.
        parallel_threshold: Objects of at least this many bytes are
            downloaded with concurrent ranged requests of ``part_size``;
            smaller ones with a single request (held in memory, so this
            also bounds the memory of one download). ``None`` means two
            parts' worth (``2 * part_size``): below that, splitting saves
            at most one part's transfer time and costs extra round trips.
            Measured on 127.0.0.1 (``bench/bench_storage.py``): against
            fake-gcs-server, 8 parts of 8 MiB in flight load 64 and 256 MB
            files at 1.3 to 1.9 times the rate of one GET, and make no
            difference at 4 MB. Against moto they are 1.6 to 9 times
            slower at 64 and 256 MB, because moto reads the whole object
            for every ranged GET (``FakeKey.value`` copies it under a
            per-key lock, then the response is sliced): one 8 MiB range
            takes ~12-35 ms from an 8 MB object and ~120-240 ms from a
            256 MB one, so n parts cost n full reads, one after another.
            Real S3 and GCS serve ranges independently, and AWS's
            performance guidelines recommend parallel ranged GETs of
            8-16 MB; the default is not tuned to moto. Raise the threshold
            only for a store that, like moto, pays for the whole object on
            every range.
        mmap_local_files: Memory-map local model files (file://, plain
            paths) instead of reading them. Off by default: overwriting a
            mapped file in place (``torch.save`` truncates) changes the
            weights of loaded models or crashes the process with SIGBUS.
            Cached downloads are always mapped: the cache never rewrites a
            file in place.
    """

    options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    cache: CacheConfig = field(default_factory=CacheConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    mmap_local_files: bool = False
    parallel_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.part_size < 1 or self.concurrency < 1:
            raise ValueError("part_size and concurrency must be >= 1")
        if self.parallel_threshold is not None and self.parallel_threshold < 1:
            raise ValueError("parallel_threshold must be >= 1 (or None)")

    def single_request_below(self) -> int:
        """Size from which a download uses parallel ranged requests."""
        if self.parallel_threshold is None:
            return 2 * self.part_size
        return self.parallel_threshold

    def merged_options(
        self, protocol: str, override: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Like :meth:`options_for` but not copied: read it, never hand it to
        a filesystem constructor (see :meth:`options_for`)."""
        merged: dict[str, Any] = dict(backend_spec(protocol).default_options)
        merged.update(self.options.get(protocol, {}))
        if override:
            merged.update(override)
        return merged

    def options_for(
        self, protocol: str, override: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Storage options for ``protocol``: registry defaults, config, then ``override``.

        A deep copy: filesystem constructors (botocore's Config) mutate
        nested option dicts, which must not leak into the next call.
        """
        return copy.deepcopy(self.merged_options(protocol, override))

    def cache_dir(self) -> Path:
        """The resolved cache directory."""
        assert self.cache.directory is not None, "resolve() fills the directory"
        return self.cache.directory


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$MUXGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/muxgate``, else ``~/.cache/muxgate``."""
    env = os.environ if environ is None else environ
    if env.get("MUXGATE_CACHE_DIR"):
        return Path(env["MUXGATE_CACHE_DIR"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "muxgate"
    return Path.home() / ".cache" / "muxgate"


def _resolved(config: StorageConfig) -> StorageConfig:
    if config.cache.directory is not None:
        return config
    return replace(config, cache=replace(config.cache, directory=default_cache_dir()))


_lock = threading.Lock()
_current: StorageConfig | None = None


def configure_storage(
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    cache: CacheConfig | None = None,
    retry: RetryPolicy | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    mmap_local_files: bool = False,
    parallel_threshold: int | None = None,
) -> StorageConfig:
    """Set the process-wide storage configuration (call once at start-up).

    Args:
        options: fsspec storage options per protocol (the app config's
            ``storage:`` section). Credentials not given here come from the
            usual environment of each library (AWS_*, GOOGLE_*...).
        cache: Disk cache settings (default: on for remote protocols).
        retry: Retry policy for transient failures.
        part_size: Bytes per ranged request.
        concurrency: Ranged requests in flight per download.
        mmap_local_files: Memory-map local files (see :class:`StorageConfig`).
        parallel_threshold: Size from which downloads use parallel ranged
            requests (see :class:`StorageConfig`; default two parts).

    Returns:
        The configuration now in effect, with the cache directory resolved.
    """
    global _current
    frozen_options = MappingProxyType(
        {proto.lower(): MappingProxyType(dict(opts)) for proto, opts in (options or {}).items()}
    )
    config = _resolved(
        StorageConfig(
            options=frozen_options,
            cache=cache or CacheConfig(),
            retry=retry or RetryPolicy(),
            part_size=part_size,
            concurrency=concurrency,
            mmap_local_files=mmap_local_files,
            parallel_threshold=parallel_threshold,
        )
    )
    with _lock:
        _current = config
    return config


def get_storage_config() -> StorageConfig:
    """The process-wide configuration (defaults, built on first use)."""
    global _current
    with _lock:
        if _current is None:
            _current = _resolved(StorageConfig())
        return _current


def resolve_config(config: StorageConfig | None) -> StorageConfig:
    """``config`` with its cache directory resolved, or the process-wide one."""
    return get_storage_config() if config is None else _resolved(config)


# -- the app config's ``storage:`` section -------------------------------------------------


class _CacheSection(msgspec.Struct, forbid_unknown_fields=True):
    directory: str | None = None
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    enabled: bool | None = None
    protocols: dict[str, bool] = {}
    fsync: bool = True


class _RetrySection(msgspec.Struct, forbid_unknown_fields=True):
    max_attempts: int = RetryPolicy.max_attempts
    base_delay: float = RetryPolicy.base_delay
    multiplier: float = RetryPolicy.multiplier
    max_delay: float = RetryPolicy.max_delay
    deadline: float = RetryPolicy.deadline


class _TransferSection(msgspec.Struct, forbid_unknown_fields=True):
    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    parallel_threshold: int | None = None
    mmap_local_files: bool = False


#: Keys of the ``storage:`` section that hold settings; every other key is a
#: protocol and holds its fsspec storage options.
SETTINGS_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "cache": _CacheSection,
    "retry": _RetrySection,
    "transfer": _TransferSection,
}


def _refuse_misspelt_settings(section: Mapping[str, Any]) -> None:
    """A key that is no protocol muxgate or fsspec knows but close to a
    settings name (``cach``, ``retries``), or one letter off a common object
    store's protocol in the same place (``s4``, ``gcz``), is a typo: it would
    silently leave the setting at its default, or the store without its
    options. Other keys may name protocols that a deployment registers
    itself (the gateway never imports its code), so they are not refused."""
    known = set(registered_protocols()) | set(known_implementations)
    for key in section:
        if key in SETTINGS_SECTIONS or key.lower() in known:
            continue
        close = difflib.get_close_matches(key, SETTINGS_SECTIONS, n=1, cutoff=0.6)
        if not close:
            close = [p for p in _COMMON_STORES if _one_letter_off(key.lower(), p)][:1]
        if close:
            raise ValueError(
                f"storage.{key}: neither a storage setting nor a known protocol:"
                f" did you mean `{close[0]}`?"
            )


#: the protocols a typo is checked against: the object stores users name most
_COMMON_STORES: Final = ("s3", "gs", "gcs", "az", "abfs", "file", "hf")


def _one_letter_off(typed: str, known: str) -> bool:
    """``typed`` is ``known`` with one letter after the first changed."""
    if len(typed) != len(known) or typed[:1] != known[:1]:
        return False
    return sum(a != b for a, b in zip(typed, known, strict=True)) == 1


def _nearest_field(message: str, kind: type[msgspec.Struct]) -> str:
    """``: did you mean `x`?`` for msgspec's "unknown field" message, else ""."""
    _head, sep, rest = message.partition("unknown field `")
    if not sep:
        return ""
    field_name = rest.partition("`")[0]
    close = difflib.get_close_matches(field_name, kind.__struct_fields__, n=1, cutoff=0.6)
    return f": did you mean `{close[0]}`?" if close else ""


def storage_config_from_section(section: Mapping[str, Mapping[str, Any]]) -> StorageConfig:
    """A ``StorageConfig`` from the app config's ``storage:`` section.

    ``cache``, ``retry`` and ``transfer`` are settings (the fields of
    :class:`CacheConfig`, :class:`RetryPolicy` and the transfer fields of
    :class:`StorageConfig`); every other key is a protocol with its fsspec
    options, e.g. ``{"s3": {"endpoint_url": ...}, "cache": {"max_bytes": 10**10}}``.

    Raises:
        ValueError: a setting is unknown, of the wrong type or out of range;
            the message starts with its path, e.g. ``storage.cache.max_bytes``.
    """
    _refuse_misspelt_settings(section)
    parsed: dict[str, Any] = {}
    for name, kind in SETTINGS_SECTIONS.items():
        try:
            parsed[name] = msgspec.convert(section.get(name) or {}, kind)
        except msgspec.ValidationError as exc:
            # "Expected `int`, got `str` - at `$.max_bytes`" -> storage.cache.max_bytes
            message, _, where = str(exc).partition(" - at `$")
            raise ValueError(
                f"storage.{name}{where.rstrip('`')}: {message}{_nearest_field(message, kind)}"
            ) from None
    cache, retry, transfer = parsed["cache"], parsed["retry"], parsed["transfer"]
    try:
        return _resolved(
            StorageConfig(
                options=MappingProxyType(
                    {
                        proto.lower(): MappingProxyType(dict(opts))
                        for proto, opts in section.items()
                        if proto not in SETTINGS_SECTIONS
                    }
                ),
                cache=CacheConfig(
                    directory=Path(cache.directory).expanduser() if cache.directory else None,
                    max_bytes=cache.max_bytes,
                    enabled=cache.enabled,
                    protocols=MappingProxyType(dict(cache.protocols)),
                    fsync=cache.fsync,
                ),
                retry=RetryPolicy(**msgspec.structs.asdict(retry)),
                **msgspec.structs.asdict(transfer),
            )
        )
    except ValueError as exc:
        raise ValueError(f"storage: {exc}") from None


def configure_storage_section(section: Mapping[str, Mapping[str, Any]]) -> StorageConfig:
    """Make the ``storage:`` section the process-wide configuration (see
    :func:`storage_config_from_section`); returns it."""
    global _current
    config = storage_config_from_section(section)
    with _lock:
        _current = config
    return config
