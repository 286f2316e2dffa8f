"""``redis://`` and ``redis+cluster://``: the counter store shared by every ``meterline serve`` process.

Semantics are those of ``quotas/memory.py``, line for line; the script ``redis_counters.lua`` says how it
keeps them atomic and exact. What this module adds is the traffic plan: ONE round trip per decision.

* Every call is one ``EVALSHA`` of one script that applies, in order, the pending settlements and
  releases, seeds, reservations, level reads and the expired query. Every key it touches is passed in
  ``KEYS``; the keys of one group (an organization, ``counters.group_of``) share a hash tag, ``{group}``.
  On Redis Cluster a call carries one group (one slot): a batch of several organizations' decisions is
  one call per organization. On one Redis a call carries everything.
* Reservations that arrive while a call of their route (one Redis; on a cluster, one organization) is
  out wait and go together in the next call (``reserve``): at most one round trip per decision, and one
  reading of each counter for all of them.
* ``settle`` and ``release`` send nothing: they join a buffer that rides along with the next call of
  their group. So every later read of this process observes them (they run first, in the same atomic
  call). A daemon thread sends the buffer if no call took it within ``flush_interval_s``, so other
  processes see it soon.
* A finish names the counters its hold sits on (``KEYS``), which this process remembers from the
  reservation (or from ``expired``). For a hold another process made (recovery after a crash) it first
  reads the hold's record: one more round trip, once.
* An entry leaves the buffer only once a call that carried it has succeeded. Concurrent calls may carry
  the same entry twice; that is harmless because finishing a hold deletes it, and finishing an unknown
  hold is a no-op. When Redis is unreachable the entries stay and go with the next call.
* A reply lost after Redis ran a reservation leaves that hold reserved until its lease ends and the
  reaper (``expired`` + ``release``) gives it back; the caller saw ``CounterStoreUnavailable``. Nothing
  is retried (a retried reservation would run twice), also on a cluster: a call that meets a failed
  master fails, and the client finds the new master for the next one.
* ``expired`` asks every group with holds: a set ``<prefix>groups`` names them. A process adds a group
  the first time it reserves in it (one more command, once per group and process) and again every
  minute, so a restarted Redis learns them again.
* ``<prefix>store`` is no counter: a mark naming this Redis to the counters' claim (``RedisMark``), so
  that every process serving one database counts in the same Redis.
* Hold ids must be unique for good (they are UUIDs): a late duplicate of a finish could otherwise meet
  a newer hold of the same id.
* An organization's counters are one hash, and the client names every field a call reads (the script
  builds no names on a decision's path): ``_Call.layout``.
* Counters are forgotten by the caller's clock (a fixed window a day after its end once nothing is
  reserved on it, a rolling window 23-24 hours after its last admitted reservation), so an injected clock
  and Redis agree on whether a counter is gone; Redis' own ``EXPIRE`` only catches an organization nobody
  calls any more.

Needs Redis >= 7.0, standalone (with replicas or not) or Redis Cluster. Unreachable, timed out, loading,
read-only or a cluster without a master for the slot: ``CounterStoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.resources import files
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import msgpack
import orjson
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from meterline.quotas.counters import (
    CounterStoreUnavailable,
    Hold,
    Level,
    Line,
    Release,
    Seed,
    Settlement,
    Verdict,
    WindowKind,
    answered,
    group_of,
)
from meterline.storage.redis_connections import RedisConnections

log = logging.getLogger("meterline.quotas.redis")

_SCRIPT = (files("meterline.storage") / "redis_counters.lua").read_text(encoding="utf-8")
# Redis names scripts by SHA-1; the module (``redis_counters.c``) is built for one script's and refuses others
SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()
# The module's command: the script's call under another name (``storage/redis_module.py``)
MODULE_COMMAND = "METERLINE.COUNTERS"
_CALLS = ("EVALSHA", MODULE_COMMAND)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what a counter may hold, as in the database store
_EXACT = 2**53
_KIND_CODE: dict[str, str] = {"fixed": "f", "rolling": "r"}
_KIND: dict[str, WindowKind] = {"f": "fixed", "r": "rolling"}
_FORGET_AFTER_S = 86_400  # as memory.py: a finished fixed window is kept a day
_MIN_TTL_S = 3_600  # a seed of a long-gone window must not vanish before it is used
_BATCH = 1_000  # finishes per call while draining a backlog: keeps each script short for Redis
_REGISTER_EVERY_S = 60.0
_MODULE_AGAIN_S = 60.0  # a store counting with the script asks for the module again this often
_EXPIRED_KEYS_PER_CALL = 500
# The request's parts after the finishes, in the script's order (0 where a call has none).
_PARTS = ("s", "h", "l", "d", "x", "t")
# Redis answers that mean "not now" rather than "wrong": redis-py raises its own class for most (the
# code is then not in the message), BUSY (a script running too long elsewhere) stays a ResponseError.
_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# OOM too: the script declares itself (``#!lua``), so Redis refuses it whole before it runs when out of
# memory, never half-way.
_TRANSIENT_ERRORS = (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)


# Answers of a cluster's node that mean the script did not run there (a redirect, a slot moving, no master
# for the slot, a node that is no master now): what redis-py's cluster client is for. (MovedError is an
# AskError, MasterDownError a ClusterDownError.)
_NOT_RUN = (AskError, ClusterDownError, ReadOnlyError, TryAgainError)


def _no_module(exc: RedisError) -> bool:
    """The module's command refused before it ran: not loaded there, built for another script, not allowed
    to Meterline's Redis user (ACL), or unknown to redis-py's cluster client (it had asked a node without
    it)."""
    message = str(exc).lower()
    if message.startswith("meterline-version"):
        return True
    named = MODULE_COMMAND.lower() in message
    return named and (
        message.startswith("unknown command")
        or "no permissions to run" in message
        or "doesn't exist in redis commands" in message
    )


def _transient(exc: ResponseError) -> bool:
    return isinstance(exc, _TRANSIENT_ERRORS) or str(exc).startswith(_TRANSIENT)


_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in _CLUSTER_SCHEMES


def _int(value: int) -> str:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} does not fit a 64-bit counter")
    return str(value)


def _value(value: int) -> int | str:
    """A value as the script takes it: an integer below 2^53 (a Lua number is exact there), else a
    decimal string."""
    if -_EXACT < value < _EXACT:
        return value
    return _int(value)


def _levels(flat: list[Any], start: int) -> tuple[Level, ...]:
    # consumed is an integer reply below 2^53, else a decimal string; int() reads both
    return tuple(Level(int(flat[i]), int(flat[i + 1])) for i in range(start, len(flat), 2))


def _verdict(raw: list[Any]) -> Verdict:
    if raw[0] == 1:
        return Verdict(admitted=True, overage=bool(raw[1]), levels=_levels(raw, 2))
    if raw[0] == 2:
        return Verdict(admitted=False, missing=tuple(int(i) for i in raw[1:]))
    return Verdict(admitted=False, refused=int(raw[1]), retry_after_s=int(raw[2]), levels=_levels(raw, 3))


def _record(hold: Hold, now_s: int) -> bytes:
    """What the script stores for a hold: its lease first (the expired query reads only that), the
    second it was reserved, its lines."""
    return orjson.dumps(
        [
            hold.expires_us,
            now_s,
            [
                [ln.key, _KIND_CODE[ln.kind], _int(ln.amount), _int(ln.maximum), int(ln.block), ln.reset_s]
                for ln in hold.lines
            ],
        ]
    )


def _hold(hold_id: str, group: str, stored: bytes | str) -> tuple[Hold, int]:
    """A stored record back as a hold, and the second it was reserved."""
    expires_us, second, lines = orjson.loads(stored)
    hold = Hold(
        hold_id,
        tuple(
            Line(key, int(amount), int(maximum), bool(block), _KIND[kind], int(reset_s))
            for key, kind, amount, maximum, block, reset_s in lines
        ),
        int(expires_us),
        group,
    )
    return hold, int(second)


def redacted(url: str) -> str:
    """The URL without its credentials (it is named in errors and logs)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class _Keys:
    """Key names of one prefix: every key of a group carries the group as its hash tag."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix may not hold braces (hash tags): {prefix!r}")
        self.prefix = prefix
        self.groups = f"{prefix}groups"
        self._tags: dict[str, str] = {}

    def tag(self, group: str) -> str:
        tag = self._tags.get(group)
        if tag is None:
            # "{}" would not be a hash tag (Redis would hash the whole name): the empty group is "{-}".
            tag = self._tags[group] = f"{self.prefix}{{{group or '-'}}}"
            if len(self._tags) > 100_000:
                self._tags.clear()
        return tag

    def holds(self, group: str) -> str:
        return f"{self.tag(group)}holds"

    def counters(self, group: str) -> str:
        """The hash of every counter of the group (the script's header says what its fields are)."""
        return f"{self.tag(group)}counters"

    def windows(self, group: str) -> str:
        """When the group's counters are to be forgotten (a sorted set)."""
        return f"{self.tag(group)}windows"

    def tally(self, key: str) -> str:
        return f"{self.tag(group_of(key))}t:{key}"


# A counter: (group, key, end) for a fixed window, (group, key, 0) for a rolling one. A fixed window's
# end is never 0 (a second long past), so a key may have a counter of each kind.
_Ref = tuple[str, str, int]


def _ref(line: Line | Seed) -> _Ref:
    if line.kind == "fixed":
        if line.reset_s == 0:
            raise ValueError(f"fixed window {line.key!r} has no end")
        return (group_of(line.key), line.key, line.reset_s)
    return (group_of(line.key), line.key, 0)


class _Held(NamedTuple):
    """What this process knows of a hold: where its lines sit and what they reserved, for its finish."""

    refs: tuple[_Ref, ...]
    reserved: tuple[int | str, ...]
    second: int
    expires_us: int
    group: str


def _held(hold: Hold, second: int, group: str) -> _Held:
    return _Held(
        tuple([_ref(ln) for ln in hold.lines]),
        tuple([_value(ln.amount) for ln in hold.lines]),
        second,
        hold.expires_us,
        group,
    )


class _Call:
    """One script call being built: the keys it names (1-based, as Lua counts), the fields it reads per
    group and its request."""

    __slots__ = ("args", "counters", "fields", "groups", "index", "keys", "parts", "specs")

    def __init__(self) -> None:
        # The groups it decides or reads for: it carries their buffered finishes (none named: all).
        self.groups: set[str] = set()
        self.keys: list[str] = []
        self.args: list[bytes] = []  # records to store, after the request: ARGV[2], ARGV[3], ...
        self.index: dict[str, int] = {}
        self.counters: dict[_Ref, int] = {}  # -> counter number
        # Per group: the index of its counters hash and the fields the call reads there ("w" first).
        self.fields: dict[str, tuple[int, list[str | None]]] = {}
        # Per counter: its group, the place of its first field there, its end, its key (rolling)
        self.specs: list[tuple[str, int, int, str | int]] = []
        self.parts: dict[str, Any] = {}

    def key(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            self.keys.append(name)
            found = self.index[name] = len(self.keys)
        return found

    def counter(self, keys: _Keys, ref: _Ref) -> int:
        """The number of a counter in this call (1-based), naming it once."""
        found = self.counters.get(ref)
        if found is None:
            group, key, reset_s = ref
            fields = self.fields.get(group)
            if fields is None:
                index = self.key(keys.counters(group))
                if self.key(keys.windows(group)) != index + 1:  # the script finds windows there
                    raise AssertionError("a group's windows key must follow its counters key")
                fields = self.fields[group] = (index, ["w"])
            names = fields[1]
            self.specs.append((group, len(names), reset_s, 0 if reset_s else key))
            if reset_s:
                names += (f"u{reset_s}:{key}", f"v{reset_s}:{key}")
            else:  # the bucket of the call's second is named when the call is sent
                names += (f"t:{key}", f"h:{key}", f"o:{key}", f"e:{key}", None)
            found = self.counters[ref] = len(self.counters) + 1
        return found

    def add(self, part: str, item: Any) -> None:
        self.parts.setdefault(part, []).append(item)

    def layout(self, now_s: int) -> tuple[list[Any], list[Any]]:
        """The request's "g" (per group: counters key index, count, field names) and "c" (per counter:
        counters key index, place of its first name in g, place of its first value among those read,
        end, key), as the script takes them: places are 1-based, as Lua counts."""
        flat_g: list[Any] = []
        starts: dict[str, tuple[int, int, int]] = {}
        read = 0
        for group, (index, names) in self.fields.items():
            starts[group] = (index, len(flat_g) + 3, read + 1)
            flat_g += (index, len(names), *names)
            read += len(names)
        flat_c: list[Any] = []
        for group, offset, reset_s, key in self.specs:
            index, first_name, first_value = starts[group]
            if not reset_s:
                flat_g[first_name + offset + 3] = f"b{now_s}:{key}"  # 0-based: the 5th of its names
            flat_c += (index, first_name + offset, first_value + offset, reset_s, key)
        return flat_g, flat_c


class _Standalone:
    """Commands to one Redis server (our connection list: see ``redis_connections.py`` for why)."""

    def __init__(self, url: str, limit: int, timeout_s: float) -> None:
        self._connections = RedisConnections(url, limit=limit, timeout_s=timeout_s)

    def __call__(self, *args: Any) -> Any:
        return self._connections.call(*args)

    def load_script(self, script: str) -> None:
        self._connections.call("SCRIPT", "LOAD", script)

    def close(self) -> None:
        self._connections.close()


class _Cluster:
    """Commands to a Redis Cluster. redis-py's ``RedisCluster`` keeps the slot map and a pool per node
    and sends each command to the master of its keys' slot, following MOVED and ASK; a decision's
    ``EVALSHA`` goes straight to that master on a connection list of our own per node instead
    (``RedisConnections``), which costs ~65 µs less CPU per call here (its per-command path: metrics,
    a retry wrapper, the pool's checkout; docs/benchmarks.md, "... a decision straight to its cluster
    master").
    Whatever is not a plain answer goes back to the client: a redirect or a refusal before the script
    ran (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY) is sent again through it, which follows
    it and mends its map. A lost connection is raised (the script may have run: never sent twice) and
    the node is suspect: decisions whose slot the map still gives it go through the client, which meets
    the failure itself and asks the cluster for a new map (after a failover: the new master), until one
    of them succeeds there. Decisions of the other masters' slots stay direct."""

    def __init__(self, url: str, limit: int, timeout_s: float) -> None:
        from redis import BlockingConnectionPool
        from redis.cluster import ClusterNode, RedisCluster

        parts = urlsplit(url)
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        nodes = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
            nodes.append(ClusterNode(name.strip("[]"), int(port or 6379)))  # type: ignore[no-untyped-call]
        # No retries: a command retried after a lost reply could run twice (a reservation made twice).
        # A failed command asks for a new slot map, which the next command uses.
        self._client = RedisCluster(
            startup_nodes=nodes,
            username=unquote(username) or None,
            password=unquote(password) or None,
            ssl=parts.scheme.lower().startswith("rediss"),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=limit,
            # Threads beyond the limit wait for a connection (up to the timeout), as with one server.
            connection_pool_class=BlockingConnectionPool,
            timeout=timeout_s,
        )
        # A node's URL: this one's scheme (TLS or not) and credentials, the node's address. Up to ``limit``
        # connections of each kind per node (the client's own serve what is not a decision).
        self._scheme = "rediss" if parts.scheme.lower().startswith("rediss") else "redis"
        self._credentials = f"{credentials}@" if credentials else ""
        self._limit, self._timeout_s = limit, timeout_s
        self._direct: dict[str, RedisConnections] = {}
        self._suspect: set[str] = set()  # nodes a direct call lost its connection to
        self._lock = threading.Lock()
        self._closed = False
        self._through_client: Callable[..., Any] = self._client.execute_command

    def __call__(self, *args: Any) -> Any:
        if args[0] not in _CALLS or not args[2]:
            return self._through_client(*args)
        try:
            node = self._client.get_node_from_key(args[3])  # type: ignore[no-untyped-call]
        except RedisClusterException:
            node = None  # no node serves the slot now: the client says why
        if node is None:
            return self._through_client(*args)
        name = node.name
        if name in self._suspect:
            answer = self._through_client(*args)
            self._suspect.discard(name)  # the client reached the slot's master, whichever it is now
            return answer
        try:
            return self._connections(name, node.host, node.port).call(*args)
        except _NOT_RUN:
            pass
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._suspect.add(name)
            raise
        # Not run there: the client follows the redirect (and mends its map).
        return self._through_client(*args)

    def _connections(self, name: str, host: str, port: int) -> RedisConnections:
        found = self._direct.get(name)
        if found is None:
            with self._lock:
                if self._closed:
                    raise RedisConnectionError("the counter store is closed")
                found = self._direct.get(name)
                if found is None:
                    address = f"[{host}]" if ":" in host else host
                    url = f"{self._scheme}://{self._credentials}{address}:{port}"
                    found = RedisConnections(url, limit=self._limit, timeout_s=self._timeout_s)
                    self._direct[name] = found
        return found

    def load_script(self, script: str) -> None:
        self._client.script_load(script)  # on every master

    def close(self) -> None:
        with self._lock:
            self._closed = True
            direct, self._direct = list(self._direct.values()), {}
        for connections in direct:
            connections.close()
        self._client.close()


def _group(hold: Hold) -> str:
    """A hold's group: the one it names, else its lines' (a hold without either is of the group "")."""
    return hold.group if hold.group or not hold.lines else group_of(hold.lines[0].key)


class _Request:
    """Holds waiting to be decided, with the caller's clock; a leader sends them. Its caller is a thread
    waiting on ``done``, or an event loop awaiting ``future`` (``reserve_queued``)."""

    __slots__ = ("done", "error", "future", "holds", "leads", "now_us", "verdicts")

    def __init__(
        self, holds: Sequence[Hold], now_us: int, future: Future[list[Verdict]] | None = None
    ) -> None:
        self.holds, self.now_us = holds, now_us
        self.done = threading.Event()
        self.future = future
        self.leads = False
        self.verdicts: list[Verdict] = []
        self.error: BaseException | None = None

    def taken(self) -> bool:
        """Whether it is still to be decided: False once its caller cancelled its future (then it is left
        out of the call, and nothing is held for nobody)."""
        future = self.future
        if future is None or future.running():
            return True
        return not future.done() and future.set_running_or_notify_cancel()

    def answer(self) -> None:
        if self.future is None:
            self.done.set()
        elif not self.taken():
            return  # cancelled by its caller: nobody reads it
        elif self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.verdicts)


class _Finish:
    __slots__ = ("actual", "group", "hold_id", "seq")

    def __init__(self, seq: int, hold_id: str, group: str, actual: list[int | str] | int) -> None:
        self.seq, self.hold_id, self.group, self.actual = seq, hold_id, group, actual


class RedisCounterStore:
    in_process = False
    queued = True
    in_writer = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "meterline:",
        flush_interval_s: float = 0.002,
        socket_timeout_s: float = 1.0,
        max_pending: int = 1_000_000,
        max_connections: int = 64,
        module_again_s: float = _MODULE_AGAIN_S,
    ) -> None:
        # Threads beyond ``max_connections`` wait for a connection (up to the socket timeout) instead of
        # opening ever more of them. Nothing is retried: the engine decides what an unreachable store
        # means (fail closed or open).
        self._cluster = is_cluster_url(url)
        self._send_command: _Standalone | _Cluster = (_Cluster if self._cluster else _Standalone)(
            url, max_connections, socket_timeout_s
        )
        self._url = url
        self._where = redacted(url)
        # Meterline's Redis module (redis_counters.c) runs the calls where it is loaded; None: not known yet
        self._module: bool | None = None
        self._module_again_at = 0.0
        self._module_again_s = module_again_s
        self._told_version = False
        self._keys = _Keys(prefix)
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[int, _Finish] = {}  # by sequence number, oldest first
        # hold id -> where its lines sit and its lease, for the holds this process knows
        self._held: dict[str, _Held] = {}
        self._now_us = 0  # the latest clock a reservation came with
        self._registered: set[str] = set()
        self._registered_at = time.monotonic()
        # Per route (one Redis, or a cluster's organization): reservations waiting for the call in flight.
        # A route in ``_queues`` has a leader; its list is what waits for the next call.
        self._queues: dict[str, list[_Request]] = {}
        self._seq = 0
        self._dropped = 0
        self._closing = False
        # Leaders of the calls whose first request came from an event loop (``reserve_queued``).
        self._leaders = ThreadPoolExecutor(max_connections, thread_name_prefix="meterline-counter-call")
        self._flusher = threading.Thread(target=self._flush_loop, name="meterline-counter-flush", daemon=True)
        self._flusher.start()

    # -- the protocol ---------------------------------------------------------------------------
    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        """Decisions that arrive while a call of their route is out travel together in the next one:
        the first caller waiting leads it and hands the lead on, the others wait for their verdicts. One
        script call then reads each counter once for all of them, and one thread does the client's work.
        On a cluster a route is an organization (requests of several go alone: one call each)."""
        if not holds:
            return []
        route = self._route(holds)
        if route is None:
            return self._reserve_alone(holds, now_us)
        request = _Request(holds, now_us)
        if self._join(route, request):
            request.done.wait()
        if request.leads:
            self._lead(route, request)
        if request.error is not None:
            raise request.error
        return request.verdicts

    def verdicts_so_far(self, verdicts: Future[list[Verdict]]) -> list[Verdict]:
        raise NotImplementedError("Redis counters are not the database writer's")

    def reserve_queued(self, holds: Sequence[Hold], now_us: int) -> Future[list[Verdict]]:
        """``reserve`` for an event loop: the request joins the next call of its route like any other, and
        a call it is to lead is made on the store's own threads (``_leaders``), so that under load one
        thread hop serves every decision of a call instead of one hop per decision."""
        if not holds:
            return answered(list)
        route = self._route(holds)
        if route is None:
            try:
                return self._leaders.submit(self._reserve_alone, holds, now_us)
            except RuntimeError:  # closed
                return answered(self._closed)
        request = _Request(holds, now_us, Future())
        assert request.future is not None
        if not self._join(route, request):
            self._start_lead(route, request)
        return request.future

    @staticmethod
    def _closed() -> list[Verdict]:
        raise CounterStoreUnavailable("the Redis counter store is closed")

    def _route(self, holds: Sequence[Hold]) -> str | None:
        """The route of a reservation ("" on one Redis, its organization on a cluster), None for one that
        spans organizations on a cluster (it goes alone); a malformed one raises ``ValueError`` here,
        before it joins a call that it would fail."""
        groups = set()
        for hold in holds:
            group = _group(hold)
            if any(group_of(ln.key) != group for ln in hold.lines):
                raise ValueError(f"reservation {hold.id} has lines of another group than {group!r}")
            for ln in hold.lines:
                _ref(ln)  # a fixed window with an end
                _int(ln.amount)  # amounts a counter can hold
                _int(ln.maximum)
            groups.add(group)
        if not self._cluster:
            return ""
        return groups.pop() if len(groups) == 1 else None

    def _join(self, route: str, request: _Request) -> bool:
        """Queue ``request`` behind the call of its route that is out (True), or make it the leader of
        the next call (False)."""
        with self._lock:
            queue = self._queues.get(route)
            if queue is None:
                self._queues[route] = []
                request.leads = True
                return False
            queue.append(request)
            return True

    def _start_lead(self, route: str, request: _Request) -> None:
        """A request whose caller does not wait in a thread leads on the store's own threads. Once the
        store is closed it fails as unavailable (never a call on the caller's thread: an event loop),
        and the lead passes on."""
        with self._lock:
            closed = self._closing
        if not closed:
            try:
                self._leaders.submit(self._lead_logged, route, request)
                return
            except RuntimeError:  # shut down meanwhile; a thread that could not start has its work queued
                with self._lock:
                    closed = self._closing
                if not closed:
                    raise
        with self._lock:
            batch = [request, *self._queues[route]]
            self._queues[route] = []
        for waiting in batch:
            waiting.error = CounterStoreUnavailable("the Redis counter store is closed")
        self._pass_lead(route, batch)

    def _lead_logged(self, route: str, request: _Request) -> None:
        try:
            self._lead(route, request)
        except BaseException:  # on an executor thread nobody would see it
            log.exception("a Redis counter call failed outside its requests")
            raise

    def _lead(self, route: str, first: _Request) -> None:
        """Send ``first`` with what is queued behind it in one reservation, then hand the lead to the
        first request queued meanwhile."""
        with self._lock:
            batch = [first, *self._queues[route]]
            self._queues[route] = []
        try:
            self._decide_batch(batch)
        finally:
            self._pass_lead(route, batch)

    def _decide_batch(self, batch: list[_Request]) -> None:
        batch = [request for request in batch if request.taken()]
        if not batch:
            return
        holds = [hold for request in batch for hold in request.holds]
        try:
            verdicts, stop = self._reserve(holds, max(request.now_us for request in batch))
        except BaseException as exc:
            verdicts, stop = [], -1
            for request in batch:
                request.error = exc
        if stop >= 0:
            self._answer_around(batch, verdicts, stop)
        else:
            start = 0
            for request in batch:
                if request.error is None:
                    request.verdicts = verdicts[start : start + len(request.holds)]
                start += len(request.holds)

    def _pass_lead(self, route: str, batch: list[_Request]) -> None:
        """Hand the lead to the first request queued meanwhile (or end the route's queue), then answer
        ``batch``."""
        following = None
        with self._lock:
            queue = self._queues[route]
            if queue:
                following = queue.pop(0)  # it leads the next call, with what queued behind it
                following.leads = True
                if following.future is None:
                    following.done.set()
            else:
                del self._queues[route]
        if following is not None and following.future is not None:
            self._start_lead(route, following)
        for request in batch:
            request.answer()

    def _answer_around(self, batch: list[_Request], verdicts: list[Verdict], stop: int) -> None:
        """A hold whose id exists stopped the batch: requests before it have their verdicts, its own
        request fails as it would alone (what it decided before the duplicate stands), the requests
        after it (given back) are decided again, alone."""
        start = 0
        for request in batch:
            end = start + len(request.holds)
            if end <= stop:
                request.verdicts = verdicts[start:end]
            elif start <= stop:
                request.error = ValueError(f"reservation {request.holds[stop - start].id} exists already")
            else:
                try:
                    request.verdicts = self._reserve_alone(request.holds, request.now_us)
                except BaseException as exc:
                    request.error = exc
            start = end

    def _reserve_alone(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        verdicts, stop = self._reserve(holds, now_us)
        if stop >= 0:
            raise ValueError(f"reservation {holds[stop].id} exists already")
        return verdicts

    def _reserve(self, holds: Sequence[Hold], now_us: int) -> tuple[list[Verdict], int]:
        """Decide ``holds`` in one call per route: the verdicts up to the first hold whose id exists, and
        that hold's index (-1: none; the holds after it were given back)."""
        now_s = now_us // 1_000_000
        keys = self._keys
        calls: dict[str, _Call] = {}
        placed: list[tuple[str, int]] = []  # per hold: its call and its place in it
        refs: list[_Held] = []
        for hold in holds:
            group = _group(hold)
            if group not in self._registered:
                self._register(group)
            route = group if self._cluster else ""
            call = self._call_for(calls, group)
            known = _held(hold, now_s, group)
            refs.append(known)
            call.args.append(_record(hold, now_s))
            item: list[Any] = [call.key(keys.holds(group)), hold.id, len(call.args) + 1]
            for ref, amount, ln in zip(known.refs, known.reserved, hold.lines, strict=True):
                item += (call.counter(keys, ref), amount, _value(ln.maximum), 1 if ln.block else 0)
            call.add("h", item)
            placed.append((route, len(call.parts["h"]) - 1))
        answers: dict[str, list[Any]] = {}
        try:
            for route, call in calls.items():
                answers[route] = self._send(route, call, now_us)
        except BaseException:
            # A batch spread over several masters failed part way: what the others admitted is given
            # back (the caller sees the failure, as if nothing was reserved).
            self._give_back(holds, refs, placed, answers, now_us)
            raise
        # A hold whose id exists stops the batch there, as in memory: its group's call stopped at it; the
        # holds after it that other groups' calls admitted are given back.
        duplicates = [placed.index((route, a[6])) for route, a in answers.items() if a[6] >= 0]
        stop = min(duplicates, default=len(holds))
        verdicts: list[Verdict] = []
        undo: list[Release] = []
        for position, (hold, (route, i)) in enumerate(zip(holds, placed, strict=True)):
            decided = answers[route][0]
            if i >= len(decided):
                continue  # after the duplicate, in its group: never decided
            verdict = _verdict(decided[i])
            if position < stop:
                verdicts.append(verdict)
            elif verdict.admitted:
                undo.append(Release(hold.id, hold.group))
        undone = {release.hold_id for release in undo}
        with self._lock:
            for position, (hold, known) in enumerate(zip(holds, refs, strict=True)):
                if (hold.id in undone and position > stop) or (
                    position < stop and verdicts[position].admitted
                ):
                    self._held[hold.id] = known
            self._now_us = max(self._now_us, now_us)
        if stop < len(holds):
            self.release(undo, now_us)
            return verdicts, stop
        return verdicts, -1

    def _give_back(
        self,
        holds: Sequence[Hold],
        refs: Sequence[_Held],
        placed: Sequence[tuple[str, int]],
        answers: dict[str, list[Any]],
        now_us: int,
    ) -> None:
        admitted: list[Release] = []
        with self._lock:
            for hold, known, (route, i) in zip(holds, refs, placed, strict=True):
                decided = answers[route][0] if route in answers else []
                if i < len(decided) and decided[i][0] == 1:
                    self._held[hold.id] = known
                    admitted.append(Release(hold.id, known.group))
        self.release(admitted, now_us)

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        self._enqueue([(s.hold_id, s.group, [_value(a) for a in s.actual]) for s in settlements])

    def release(self, releases: Sequence[Release], now_us: int) -> None:
        self._enqueue([(r.hold_id, r.group, 0) for r in releases])

    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        if not seeds:
            return
        now_s = now_us // 1_000_000
        calls: dict[str, _Call] = {}
        for seed in seeds:
            call = self._call_for(calls, group_of(seed.key))
            item: list[Any] = [call.counter(self._keys, _ref(seed))]
            if seed.kind == "fixed":
                # It is forgotten a day past the window's end (seconds from now), not before an hour.
                item += (_value(seed.used), max(seed.reset_s + _FORGET_AFTER_S - now_s, _MIN_TTL_S))
            else:
                for second, amount in sorted(seed.buckets):
                    item += (second, _value(amount))
            call.add("s", item)
        for route, call in calls.items():
            self._send(route, call, now_us)

    def _call_for(self, calls: dict[str, _Call], group: str) -> _Call:
        """The call of this request that carries ``group`` (on a cluster one per group, else one)."""
        route = group if self._cluster else ""
        call = calls.get(route)
        if call is None:
            call = calls[route] = _Call()
        call.groups.add(group)
        return call

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        if not lines:
            return []
        calls: dict[str, _Call] = {}
        placed: list[tuple[str, int]] = []
        for ln in lines:
            call = self._call_for(calls, group_of(ln.key))
            call.add("l", call.counter(self._keys, _ref(ln)))
            placed.append((group_of(ln.key) if self._cluster else "", len(call.parts["l"]) - 1))
        answers = {route: self._send(route, call, now_us)[1] for route, call in calls.items()}
        out: list[Level | None] = []
        for route, i in placed:
            present, consumed, reset_s = answers[route][3 * i : 3 * i + 3]
            out.append(Level(int(consumed), int(reset_s)) if present else None)
        return out

    def ping(self, now_us: int) -> None:
        self._send("", _Call(), now_us)  # a script call like any other: it also carries buffered finishes

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        limit = max(limit, 0)
        groups = sorted(
            group.decode() if isinstance(group, bytes) else str(group)
            for group in self._command("SMEMBERS", self._keys.groups)
        )
        found: list[tuple[int, str, str, str]] = []
        chunk = 1 if self._cluster else _EXPIRED_KEYS_PER_CALL
        for start in range(0, len(groups), chunk):
            call = _Call()
            part = groups[start : start + chunk]
            for group in part:
                call.groups.add(group)
                call.add("x", [call.key(self._keys.holds(group)), limit])
            due = self._send(part[0] if self._cluster else "", call, now_us)[3]
            for i in range(0, len(due), 3):
                hold_id, stored = due[i], due[i + 1]
                found.append((int(orjson.loads(stored)[0]), hold_id, part[int(due[i + 2])], stored))
        found.sort()
        holds: list[Hold] = []
        with self._lock:
            for _expires, hold_id, group, stored in found[:limit]:
                hold, second = _hold(hold_id, group, stored)
                holds.append(hold)
                self._held[hold.id] = _held(hold, second, group)
        return holds

    def tally(self, key: str, now_us: int) -> int:
        call = _Call()
        call.groups.add(group_of(key))
        call.parts["t"] = call.key(self._keys.tally(key))
        return int(self._send(group_of(key) if self._cluster else "", call, now_us)[4])

    def close(self) -> None:
        with self._wake:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._flusher.join(timeout=5)
        self._leaders.shutdown()
        try:
            self.flush()
        except Exception as exc:
            log.warning("closing with %d settlements/releases unsent: %s", len(self._pending), exc)
        finally:
            self._send_command.close()

    # -- the buffer -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Settlements and releases not yet confirmed by Redis."""
        return len(self._pending)

    def flush(self) -> None:
        """Send buffered settlements and releases now."""
        with self._lock:
            routes = {finish.group if self._cluster else "" for finish in self._pending.values()}
        failed: BaseException | None = None
        for route in sorted(routes):
            try:
                # names no group: carries all of the route; at the latest clock this process saw, so the
                # script reads the buckets of this second with the counters
                self._send(route, _Call(), self._now_us)
            except Exception as exc:  # one master down must not hold back the others' settlements
                failed = failed or exc
        if failed is not None:
            raise failed

    def _enqueue(self, items: list[tuple[str, str, list[int | str] | int]]) -> None:
        if not items:
            return
        with self._wake:
            was_empty = not self._pending
            for hold_id, group, actual in items:
                known = self._held.get(hold_id)
                if known is not None:
                    group = known.group  # the hold's own: a finish sent elsewhere would never apply
                self._seq += 1
                self._pending[self._seq] = _Finish(self._seq, hold_id, group, actual)
            overflow = len(self._pending) - self._max_pending
            if overflow > 0:
                for seq in list(itertools.islice(self._pending, overflow)):
                    del self._pending[seq]
                self._dropped += overflow
                log.warning(
                    "Redis counter buffer full (%d): dropped the oldest %d settlements/releases (%d in "
                    "all); their counters stay off until reseeded from the ledger",
                    self._max_pending,
                    overflow,
                    self._dropped,
                )
            if was_empty:
                self._wake.notify()

    def _flush_loop(self) -> None:
        backoff = self._flush_interval_s
        failing_since: float | None = None  # a failure is logged when it starts and when it ends
        while True:
            with self._wake:
                if not self._pending and not self._closing:
                    self._wake.wait(_REGISTER_EVERY_S / 4)  # woken by the first entry of an empty buffer
                if self._closing:
                    return
                oldest = next(iter(self._pending), None)
                if oldest is not None:
                    self._wake.wait(self._flush_interval_s)  # a call may take them along meanwhile
                    if self._closing:
                        return
                due = oldest is not None and oldest in self._pending
            try:
                registering = self._registration_due()
                if registering:
                    self._register_again()
                if due:
                    self.flush()
                backoff = self._flush_interval_s
                if failing_since is not None and (due or registering):
                    log.warning(
                        "settlements sent to Redis again after %.1f s", time.monotonic() - failing_since
                    )
                    failing_since = None
            except Exception as exc:
                if failing_since is None:
                    log.warning("could not send settlements to Redis (retrying until it answers): %s", exc)
                    failing_since = time.monotonic()
                backoff = min(max(backoff * 2, 0.05), 1.0)
                with self._wake:
                    if not self._closing:
                        self._wake.wait(backoff)

    # -- groups ---------------------------------------------------------------------------------
    def _register(self, group: str) -> None:
        self._command("SADD", self._keys.groups, group)
        with self._lock:
            self._registered.add(group)

    def _registration_due(self) -> bool:
        return bool(self._registered) and time.monotonic() - self._registered_at >= _REGISTER_EVERY_S

    def _register_again(self) -> None:
        """The groups this process reserved in, named again: a Redis restarted empty learns them back.
        Also forgets where holds sit that are a day past their lease (another process finished them)."""
        with self._lock:
            groups = sorted(self._registered)
            horizon = self._now_us - _FORGET_AFTER_S * 1_000_000
            for hold_id in [h for h, known in self._held.items() if known.expires_us < horizon]:
                del self._held[hold_id]
        self._registered_at = time.monotonic()
        if groups:
            self._command("SADD", self._keys.groups, *groups)

    # -- the call -------------------------------------------------------------------------------
    def _send(self, route: str, call: _Call, now_us: int) -> list[Any]:
        """One script call of ``route`` (a group on a cluster, else everything) carrying the buffered
        finishes of the groups it touches (all of the route when it names none: a flush); returns the
        script's answer. Only a group's own finishes matter to its counters, and carrying others' would
        send each finish once per concurrent call."""
        groups = call.groups
        while True:
            with self._lock:
                finishes = [
                    f
                    for f in self._pending.values()
                    if (f.group in groups if groups else not self._cluster or f.group == route)
                ]
                unknown = [f for f in finishes if f.hold_id not in self._held]
            if unknown:
                self._describe(route, unknown, now_us)
                continue
            if len(finishes) <= _BATCH:
                break
            self._send_finishes(route, _Call(), finishes[:_BATCH], now_us)  # a backlog: short scripts first
        return self._send_finishes(route, call, finishes, now_us)

    def _send_finishes(self, route: str, call: _Call, finishes: list[_Finish], now_us: int) -> list[Any]:
        keys = self._keys
        items: list[list[Any]] = []
        with self._lock:
            # A concurrent call may have carried (and confirmed) some of them meanwhile: not again.
            finishes = [f for f in finishes if f.seq in self._pending and f.hold_id in self._held]
            for finish in finishes:
                # The hold's own group decides where it is (a finish named another would never apply).
                finish.group = self._held[finish.hold_id].group
            if self._cluster:  # one slot per call: another group's finish goes with that group's calls
                finishes = [f for f in finishes if f.group == route]
            for finish in finishes:
                known = self._held[finish.hold_id]
                item: list[Any] = [
                    call.key(keys.holds(known.group)),
                    finish.hold_id,
                    known.second,
                    finish.actual,
                ]
                for ref, reserved in zip(known.refs, known.reserved, strict=True):
                    item += (call.counter(keys, ref), reserved)
                items.append(item)
        parts = call.parts
        now_s = now_us // 1_000_000
        flat_g, flat_c = call.layout(now_s)
        request = msgpack.packb(
            [now_s, str(now_us), flat_g, flat_c, items or 0, *[parts.get(part, 0) for part in _PARTS]]
        )
        try:
            answer = self._evalsha(call.keys, [request, *call.args])
        except ResponseError as exc:
            if _transient(exc):
                raise CounterStoreUnavailable(f"Redis at {self._where}: {exc}") from exc
            # The script (or the module) stopped part way ("user_script:...", "meterline counters: ...").
            # Finishes before the fault were applied; sending the rest again would fail the same way on
            # every later call.
            if finishes and ("user_script" in str(exc) or "meterline counters:" in str(exc)):
                log.error("dropping %d settlements/releases after a script error: %s", len(finishes), exc)
                self._confirmed(finishes)
            raise RuntimeError(f"Redis counter script failed: {exc}") from exc
        self._confirmed(finishes)
        if answer[5]:
            log.error("settlements with the wrong number of amounts were dropped: %s", answer[5])
        return answer

    def _describe(self, route: str, unknown: list[_Finish], now_us: int) -> None:
        """Learn where holds made by another process sit (their records); finishes of holds Redis does
        not know are done already."""
        call = _Call()
        for finish in unknown:
            call.add("d", [call.key(self._keys.holds(finish.group)), finish.hold_id])
        records = self._send_finishes(route, call, [], now_us)[2]
        gone: list[_Finish] = []
        with self._lock:
            for finish, stored in zip(unknown, records, strict=True):
                if stored == 0:
                    gone.append(finish)
                else:
                    hold, second = _hold(finish.hold_id, finish.group, stored)
                    self._held[finish.hold_id] = _held(hold, second, finish.group)
        self._confirmed(gone)

    def _confirmed(self, finishes: Iterable[_Finish]) -> None:
        with self._lock:
            for finish in finishes:
                self._pending.pop(finish.seq, None)
                self._held.pop(finish.hold_id, None)

    def _evalsha(self, keys: list[str], args: list[bytes]) -> list[Any]:
        """The script's answer: [verdicts, levels, records, expired, tally, malformed ids, duplicate]."""
        try:
            raw = None
            if self._module is False and time.monotonic() >= self._module_again_at:
                self._module = None  # asked again now and then: Redis may have loaded it meanwhile
            if self._module is not False:
                try:
                    raw = self._send_command(MODULE_COMMAND, SCRIPT_SHA, len(keys), *keys, *args)
                except RedisError as exc:
                    if not _no_module(exc):
                        raise
                    self._without_module(exc)  # refused before it ran: the script runs the call instead
                else:
                    if self._module is None:
                        self._module = True
                        log.info("counting with Meterline's Redis module at %s", self._where)
            if raw is None:
                try:
                    raw = self._send_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
                except NoScriptError:  # a new or restarted server (or a promoted replica): load, then run
                    self._send_command.load_script(_SCRIPT)
                    raw = self._send_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, ClusterError, OSError) as exc:
            # ClusterError: redis-py followed redirects (MOVED, ASK, TRYAGAIN) until it gave up
            raise CounterStoreUnavailable(f"Redis at {self._where} is unavailable: {exc}") from exc
        assert isinstance(raw, bytes)
        answer: list[Any] = msgpack.unpackb(raw)
        # The script answers flat (a part with nothing to say is 0; the verdicts one list, each after
        # its length): every table it makes costs Redis time. Back to lists here.
        flat = answer[0]
        verdicts: list[list[Any]] = []
        if flat:
            at = 0
            while at < len(flat):
                end = at + 1 + flat[at]
                verdicts.append(flat[at + 1 : end])
                at = end
        answer[0] = verdicts
        for part in (1, 2, 3, 5):
            if answer[part] == 0:
                answer[part] = []
        return answer

    def _without_module(self, exc: RedisError) -> None:
        """The script for the next minute (then the module is asked again): this Redis (or the cluster's
        master of this call) has no module of this version. Told once, as a warning where the module had
        been counting (a failover to a replica without it, a restart without ``loadmodule``) or is of
        another version."""
        was, self._module = self._module, False
        self._module_again_at = time.monotonic() + self._module_again_s
        if was:
            log.warning(
                "the Redis at %s no longer answers with Meterline's module (%s): counting with the script",
                self._where,
                exc,
            )
        elif str(exc).startswith("METERLINE-VERSION") and not self._told_version:
            self._told_version = True  # asked again each minute: said once
            log.warning(
                "Meterline's Redis module at %s is of another version: counting with the script (%s)",
                self._where,
                exc,
            )

    def _command(self, *args: Any) -> Any:
        try:
            return self._send_command(*args)
        except ResponseError as exc:
            if _transient(exc):
                raise CounterStoreUnavailable(f"Redis at {self._where}: {exc}") from exc
            raise
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, ClusterError, OSError) as exc:
            raise CounterStoreUnavailable(f"Redis at {self._where} is unavailable: {exc}") from exc


class RedisMark:
    """Which Redis keeps a database's counters: a random token in the key ``<prefix>store`` of that Redis.

    Processes that serve one database must count in one Redis. Their URLs cannot tell (``localhost`` on
    every machine names a different Redis; two spellings can name one), so the counters' claim
    (``storage/counter_claim.py``) compares what each Redis holds: the first process to claim a Redis
    marks it (``make``), every serving process writes the mark back each second where it is missing
    (``keep``: a Redis emptied or restarted without persistence has it again at once) and a newcomer
    holds the token's claim beside its database's. Never in a call's path: a process reads it when it
    starts, and a thread of the claim (``counter_claim._MarkWriter``) writes it each second."""

    def __init__(self, url: str, *, prefix: str = "meterline:", timeout_s: float = 1.0) -> None:
        self._send = (_Cluster if is_cluster_url(url) else _Standalone)(url, 1, timeout_s)
        self._key = f"{prefix}store"
        self.where = redacted(url)

    def read(self) -> str | None:
        found = self._send("GET", self._key)
        return None if found is None else found.decode() if isinstance(found, bytes) else str(found)

    def counting_with(self) -> str:
        """How this Redis runs the counter store's calls, in words for the start-up line: with Meterline's
        module (a call of no counters, which the module answers and a Redis without it refuses), else
        with the script, and why. On a cluster, the master of the mark's key answers for all."""
        request = msgpack.packb([0, "0", [], [], 0, 0, 0, 0, 0, 0, 0])
        try:
            self._send(MODULE_COMMAND, SCRIPT_SHA, 1, self._key, request)  # a key: a cluster routes by it
        except ResponseError as exc:
            if not _no_module(exc):  # out of memory, a replica, busy: not a reason not to start
                return f"the script or the module (Redis did not say: {exc})"
            if str(exc).startswith("METERLINE-VERSION"):
                return "the script: the module loaded there is of another Meterline (meterline redis-module)"
            return "the script (no Meterline module loaded there: meterline redis-module builds one)"
        return "Meterline's Redis module"

    def make(self) -> str | None:
        """A new token, unless one is there already (set meanwhile by another process): the one kept."""
        return self.keep(uuid.uuid4().hex)

    def keep(self, token: str) -> str | None:
        """``token`` written back if the key is missing (a Redis emptied or restarted without its data),
        never over another: the token kept, this one or one another process wrote meanwhile. Two
        commands, not ``SET ... NX GET``: redis-py's cluster client answers that one's reply as a
        boolean."""
        self._send("SET", self._key, token, "NX")
        return self.read()

    def close(self) -> None:
        self._send.close()
