"""Counter stores chosen by URL, like the databases: ``memory://`` (the default), ``redis://`` or
``redis+cluster://``."""

from __future__ import annotations

from urllib.parse import urlsplit

from meterline.errors import ConfigError
from meterline.quotas.counters import CounterStore
from meterline.quotas.memory import MemoryCounterStore


def open_counter_store(url: str | None) -> CounterStore:
    """``None`` or ``memory://``: this process only. ``redis://`` / ``rediss://`` (TLS), with an optional
    ``/db`` number, or a Redis Cluster, ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster``
    for TLS; any reachable nodes, the client finds the rest): shared by every server process."""
    if url is None:
        return MemoryCounterStore()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryCounterStore()
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        # Imported here so that a memory-only deployment never loads the Redis client.
        from meterline.storage.redis_counters import RedisCounterStore

        return RedisCounterStore(url)
    raise ConfigError(
        f"unsupported counter store URL scheme {scheme or '(none)'!r} in {url!r}: "
        "use memory://, redis://host:port/db (rediss:// for TLS) or redis+cluster://host:port,host:port "
        "for a Redis Cluster",
        param="counter_store_url",
    )
