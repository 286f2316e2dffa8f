"""Connections to one Redis server for a store that sends one command per call.

redis-py's client and pool add ~25 µs to every command on this path (a health check, metrics, a queue
of connections), which is as much as the loopback round trip itself. Measured again with redis-py 8.2
(2026-12-04, ``bench/quota_store.py``, alternated twice): its ``BlockingConnectionPool`` in place of this
class gave 3,290 and 3,110 decisions/s on one thread against 3,443 and 3,415 here (p50 280-288 µs
against 257-276), and 8,493 and 7,727 on eight against 8,053 and 9,016; so this class stays.

The counter store sends exactly one ``EVALSHA`` per decision, so it keeps its connections here: last
in, first out, at most ``limit`` at a time, each checked with one poll before reuse (a connection that
the server closed while it was idle, e.g. across a restart, is reopened instead of failing the call).
Connections are made by redis-py from the URL (its pool's public ``connection_class`` and
``connection_kwargs``), so ``redis://``, ``rediss://`` (TLS), passwords and ``/db`` work as usual.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.retry import Retry


class RedisConnections:
    def __init__(self, url: str, *, limit: int, timeout_s: float) -> None:
        # Parsing only: redis-py's pool knows every URL form; its own connections are never used.
        # No retries: a command retried after a lost reply could run twice.
        template = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._template = template
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limit)
        self._timeout_s = timeout_s
        self._pid = os.getpid()
        self._closed = False

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply. Connection trouble raises redis-py's
        ``ConnectionError``/``TimeoutError``; an error reply raises its ``ResponseError``."""
        if not self._slots.acquire(timeout=self._timeout_s):
            raise RedisConnectionError(f"no Redis connection free within {self._timeout_s} s")
        try:
            connection = self._take()
            try:
                connection.send_command(*args)
                return connection.read_response()
            except ResponseError:
                raise  # the connection is fine
            except BaseException:
                connection.disconnect()  # reconnects on its next use
                raise
            finally:
                self._give_back(connection)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share its parent's sockets
                self._idle, self._pid = [], os.getpid()
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            return self._template.connection_class(**self._template.connection_kwargs)
        try:
            stale = connection.can_read(timeout=0)  # an idle connection has nothing to read...
        except (RedisConnectionError, OSError):
            stale = True  # ...unless the server closed it (or it was never opened again)
        if stale:
            connection.disconnect()
        return connection

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.disconnect()
