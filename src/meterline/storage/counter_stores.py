"""Counter stores chosen by URL, like the databases: ``memory://`` (the default) or ``redis://``."""

from __future__ import annotations

from urllib.parse import urlsplit

from meterline.errors import ConfigError
from meterline.quotas.counters import CounterStore
from meterline.quotas.memory import MemoryCounterStore


def open_counter_store(url: str | None) -> CounterStore:
    """``None`` or ``memory://``: this process only. ``redis://`` / ``rediss://`` (TLS), with an optional
    ``/db`` number: shared by every server process."""
    if url is None:
        return MemoryCounterStore()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryCounterStore()
    if scheme in ("redis", "rediss"):
        # Imported here so that a memory-only deployment never loads the Redis client.
        from meterline.storage.redis_counters import RedisCounterStore

        return RedisCounterStore(url)
    raise ConfigError(
        f"unsupported counter store URL scheme {scheme or '(none)'!r} in {url!r}: "
        "use memory:// or redis://host:port/db (rediss:// for TLS)",
        param="counter_store_url",
    )
