"""Which serving processes may decide quotas on one database together.

Counters must be the same for every process that serves a database, or limits do not hold: two
``meterline serve`` processes with in-process counters would each count alone (a daily limit of 100
calls admitted 200), and a process counting in Redis beside one counting in the database would not see
the other's reservations either. So a serving process claims its database for its life:

* with in-process counters (``memory``), **exclusively**: no other serving process at all;
* with shared counters (``database`` or ``redis``), **shared** with the processes of the same kind, and
  never beside one of the other kind (each kind holds its own lock shared, and looks at the other's).

Counting in Redis, every process must count in the **same** Redis: ``localhost`` on each machine names a
different one. Each Redis a database's counters are kept in carries a mark (a random token,
``RedisMark``), and a process holds a lock named by its Redis' token beside its kind's: a newcomer whose
Redis bears another token (or none, while others count) is refused. Every serving process writes its
mark back each second where it is missing (never over another), so a Redis emptied meanwhile bears it
again before a newcomer gives up on it; a claim taken again follows the mark its Redis bears by then.
(A Redis restored from another's data bears that one's mark: the two are one to the claim.)

A claimant of a shared kind that finds itself **alone** says so (``Claim.alone``): every reservation
left in the database then belongs to a process that is gone, and counters kept in the database may be
stale (another kind of counters served meanwhile), so the caller resets and recovers them before
serving, and only then shares the claim.

Locks: on SQLite, ``flock`` on files beside the database (``<db>.counters.lock``,
``<db>.counters.<kind>.lock``, and ``<db>.counters.redis@<token>.lock`` per Redis ever used; the kernel
drops them when the process ends, however it ends); on PostgreSQL, session advisory locks on a
connection of the claim's own (dropped with the connection or the process, or with the host: the
session asks the server to probe it, ``_SESSION_SETTINGS``). An in-memory SQLite
database is one process's anyway. Management commands (``reconcile``, ``verify``...) decide no quotas
and do not claim.

A session can end while its process serves on (a restart or failover of PostgreSQL, a proxy's idle
timeout), and its locks with it: nothing would then stop a second process from claiming what the first
still uses. So the serving process watches its claim (``Claim.keep_alive``, one query a second) and
takes it again on a new connection; if another process took it meanwhile, the serving process is told
to stop (it cannot know that the other's counters see its reservations). A newcomer of the same shared
kind that found itself alone in that gap is waited for instead: once its reset is over both share.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, create_engine, make_url, pool, text
from sqlalchemy.exc import DBAPIError, OperationalError

from meterline.errors import ConfigError
from meterline.storage.database import normalize_url

log = logging.getLogger("meterline.counters")

SHARED_KINDS = ("database", "redis")
# A shared claim may meet a moment's exclusive hold (a first process resetting and recovering, a
# process's look at it, on SQLite): it waits that long for it.
_SHARE_WAIT_S = 60.0
# How often a serving process checks the PostgreSQL session holding its claim (``Claim.keep_alive``), and
# writes its Redis' mark back (``_MarkWriter``).
KEEP_EVERY_S = 1.0
_CONNECT_TIMEOUT_S = 5  # a new session for the claim gives up this soon (tried again a second later)
# A newcomer of a shared kind finding the claim held exclusively, and not for a reset, looks this long
# before it concludes a process with in-process counters holds it (a first claimant marks its reset
# within moments of taking the lock).
_UNMARKED_S = 0.25
# A newcomer finding no mark in its Redis while others count in one waits this long for theirs to be
# written back (each serving process writes it every KEEP_EVERY_S) before it concludes theirs is another.
_MARK_WAIT_S = 3.0
_TOKEN = re.compile(r"[0-9a-f]{32}")  # a mark, as ``RedisMark.make`` writes it
# A process holding the kind without this Redis' lock counts in another (or one holding the other kind
# serves) only if it still does after this many looks, this far apart (a newcomer being refused lets go
# within moments).
_FOREIGN_LOOKS = 3
_FOREIGN_GAP_S = 0.2
_LOST = (
    "another process took this database's counters claim ({database}) while the PostgreSQL session "
    "holding this process's claim was gone (a restart or failover of PostgreSQL, a dropped "
    "connection). Serving on beside it, limits would not hold: each would count what the other does not "
    "see. Stopping. Start this process again once the other has gone, or give every process the same "
    'shared counter store (redis_url, or counters = "database"); README: Deployment'
)
_FIX = (
    "in-process counters are exact in one process only; beside another serving process each would count "
    "alone, and limits would not hold across them. Stop the other process, or give every process one "
    'shared counter store: redis_url = "redis://host:6379/0", or counters = "database" (what '
    "`meterline serve --workers N` uses); README: Deployment"
)


class StoreMark(Protocol):
    """Which Redis: ``storage/redis_counters.RedisMark`` (a token kept in that Redis)."""

    where: str  # the Redis, as it may be shown (no credentials)

    def read(self) -> str | None: ...
    def make(self) -> str | None: ...
    def keep(self, token: str) -> str | None: ...


def claim_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a bigint) named by ``name``."""
    return zlib.crc32(f"meterline counters {name}".encode())


@dataclass
class Claim:
    alone: bool  # a shared claimant that found no other serving process
    _share: Callable[[], None] = field(repr=False)
    _give_back: Callable[[], None] = field(repr=False)
    # None while the claim holds (taken again if its session had ended), else why it no longer does.
    _keep: Callable[[], str | None] | None = field(default=None, repr=False)
    _marking: _MarkWriter | None = field(default=None, repr=False)  # writes the Redis' mark back
    _keeper: threading.Thread | None = field(default=None, init=False, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def share(self) -> None:
        """From exclusive (alone, while resetting) to shared: others of the same kind may join now."""
        self._share()

    def keep_alive(self, lost: Callable[[str], None]) -> None:
        """Watch the claim while this process serves, from a thread of its own: on PostgreSQL a claim
        whose session ended is taken again on a new one, and ``lost`` is called once, with what to tell
        the operator, when another process took it meanwhile (this process must then stop serving).
        Nothing to watch on SQLite: a file lock lasts as long as its process. (The Redis' mark is written
        back from the claim on, whether watched or not: ``_MarkWriter``.)"""
        if self._keep is None or self._keeper is not None:
            return

        def watch() -> None:
            failing = False
            while not self._done.wait(KEEP_EVERY_S):
                try:
                    why = self.keep()
                except Exception:  # never let the watch die unseen: tried again a second later
                    if not failing:  # once, not every second while it lasts
                        log.exception("checking the counters' claim failed")
                    failing = True
                    continue
                failing = False
                if why is not None:
                    lost(why)
                    return

        self._keeper = threading.Thread(target=watch, name="meterline-counters-claim", daemon=True)
        self._keeper.start()

    def keep(self) -> str | None:
        """The claim checked once (``keep_alive`` does it every second): None while it holds, taken again
        if its session had ended; else what to tell the operator."""
        return None if self._keep is None else self._keep()

    def give_back(self) -> None:
        self._done.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join()  # its calls are bounded by the connection's timeouts
        if self._marking is not None:
            self._marking.stop()
        self._give_back()


def claim_counters(database_url: str, store: str, mark: StoreMark | None = None) -> Claim:
    """Claim ``database_url`` for a serving process whose counters are kept by ``store`` ("memory",
    "database" or "redis"; ``mark``: which Redis, required for "redis"). Raises ``ConfigError``, naming
    the fix, when it cannot be."""
    if (store == "redis") != (mark is not None):
        raise ValueError("a Redis mark is given with counters in Redis, and only then")
    database_url = normalize_url(database_url)  # as the server's own engine reads it (postgres://...)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        name = url.database
        if not name or name == ":memory:" or name.startswith("file::memory:"):
            return Claim(True, lambda: None, lambda: None)
        return _claim(_FileLocks(Path(name).resolve()), store, mark)
    return _claim(_AdvisoryLocks(database_url, url.render_as_string(hide_password=True)), store, mark)


def _in_process_refusal(locks: _Locks) -> ConfigError:
    """In-process counters refused beside a serving process: the fix named is that process's store
    when it has a shared one (the same Redis, or counters in the database), as a look finds it."""
    for kind, fix in (("redis", "with the same redis_url"), ("database", 'with counters = "database"')):
        if locks.held(kind):
            return ConfigError(
                f"another process serves {locks.shown}{locks.where} with its counters in {_WHERE[kind]}: "
                "in-process counters are exact in one process only; beside it this one would count "
                f"alone, and limits would not hold across them. Stop the other process, or start this "
                f"one {fix}; README: Deployment",
                param="counters",
            )
    return ConfigError(
        f"another process already serves {locks.shown}{locks.where}: {_FIX}", param="redis_url"
    )


_WHERE = {"database": "the database", "redis": "Redis"}


def _shared_refusal(who: str, database: object, store: str, other: str, where: str = "") -> ConfigError:
    if other == "memory":
        return ConfigError(
            f"{who} serves {database}{where} with in-process counters: processes with shared counters "
            "(in the database or in Redis) would not see its reservations, nor it theirs. Stop it, or "
            "start every process with the same counter store",
            param="counters",
        )
    return ConfigError(
        f"{who} serves {database}{where} with its counters in {_WHERE[other]}; this one would keep them "
        f"in {_WHERE[store]}, and neither would see the other's reservations. Give every process the "
        "same counter store (redis_url, counters)",
        param="counters",
    )


def _still_resetting(database: object, where: str = "") -> ConfigError:
    return ConfigError(
        f"the first process to serve {database}{where} is still resetting its counters and settling what "
        f"was left reserved (for over {_SHARE_WAIT_S:.0f} s: many reservations, left by a long outage or "
        "a crash under load). Start this process again once that one serves (its /readyz answers)",
        param="counters",
    )


def _other_redis(who: str, database: object, redis: str, where: str = "") -> ConfigError:
    return ConfigError(
        f"{who} serves {database}{where} with its counters in another Redis than this one ({redis}): "
        "neither would see the other's reservations, and limits would not hold. Give every process the "
        "same redis_url (one Redis, or one Redis Cluster); README: Deployment",
        param="redis_url",
    )


class _Locks(Protocol):
    """Named locks ("main", "database", "redis", and "redis@<token>" per Redis), each exclusive or
    shared, never waited for."""

    shown: str
    where: str

    def try_exclusive(self, name: str) -> bool: ...
    def try_shared(self, name: str) -> bool: ...
    def held(self, name: str) -> bool: ...
    def unlock(self, name: str) -> None: ...
    def to_shared(self, name: str) -> bool: ...
    def holder(self) -> str: ...
    def note_holder(self) -> None: ...
    def mark_resetting(self, on: bool) -> None: ...
    def resetting(self) -> bool: ...
    def keeper(self) -> Callable[[], str | None] | None: ...
    def exclude(self, name: str) -> None: ...
    def foreign(self, kind: str, name: str) -> bool: ...
    def require_beside(self, kind: str, name: str, follow: Callable[[], str | None]) -> None: ...
    def close(self) -> None: ...


def _claim(locks: _Locks, store: str, mark: StoreMark | None) -> Claim:
    try:
        if store == "memory":
            if not locks.try_exclusive("main"):
                raise _in_process_refusal(locks)
            locks.note_holder()
            return Claim(True, lambda: None, locks.close, locks.keeper())
        (other,) = [kind for kind in SHARED_KINDS if kind != store]
        marking = None
        if mark is not None:
            # Its Redis' lock before its kind's: a process seen holding the kind holds its Redis' already.
            token = _token(locks, mark, store)
            beside = f"{store}@{token}"
            if not _waiting(lambda: locks.try_shared(beside)):
                raise _other_redis("another process", locks.shown, mark.where, locks.where)
            marking = _MarkWriter(mark, token, store)
        # Own kind first, then a look at the other's: two processes of different kinds starting at once
        # cannot both miss each other.
        if not _waiting(lambda: locks.try_shared(store)):
            raise _shared_refusal("another process", locks.shown, store, other, locks.where)
        if mark is not None and marking is not None:  # (one is set with the other)
            # Two newcomers with different Redis starting at once: each has taken both locks before it
            # looks, and holds them until it is refused, so whichever looks later sees the other.
            if _foreign(locks, store, beside):
                raise _other_redis("another process", locks.shown, mark.where, locks.where)
            locks.require_beside(store, beside, marking.follow)
        if _other_kind(locks, other):
            raise _shared_refusal("another process", locks.shown, store, other, locks.where)
        locks.exclude(other)
        if locks.try_exclusive("main"):
            locks.mark_resetting(True)

            def share() -> None:
                # Shared before the mark goes: a newcomer never finds it held exclusively and unmarked.
                if not locks.to_shared("main"):
                    raise _in_process_refusal(locks)
                locks.mark_resetting(False)

            return Claim(True, share, locks.close, locks.keeper(), _started(marking))

        unmarked_since: list[float] = []
        resetting: list[bool] = []  # whether the last look found a first claimant resetting

        def joined() -> bool:
            resetting.clear()
            if locks.try_shared("main"):
                return True
            if locks.resetting():
                unmarked_since.clear()
                resetting.append(True)
                return False
            # Held for good, by a process with in-process counters; or for a moment, by a first shared
            # claimant between taking it and marking its reset: only a hold that stays unmarked is the
            # former.
            if not unmarked_since:
                unmarked_since.append(time.monotonic())
            if time.monotonic() - unmarked_since[0] < _UNMARKED_S:
                return False
            raise _shared_refusal(locks.holder(), locks.shown, store, "memory", locks.where)

        if not _waiting(joined):
            if resetting:
                raise _still_resetting(locks.shown, locks.where)
            raise _shared_refusal(locks.holder(), locks.shown, store, "memory", locks.where)
        return Claim(False, lambda: None, locks.close, locks.keeper(), _started(marking))
    except BaseException:
        locks.close()
        raise


def _token(locks: _Locks, mark: StoreMark, kind: str) -> str:
    """The token of this process's Redis. A Redis without one gets one if no process counts in a Redis
    on this database (this is the first); while others do, theirs is written back within a second if
    they count in this one, so it is waited for: none means they count in another."""
    deadline = time.monotonic() + _MARK_WAIT_S
    while True:
        found = _asked(mark, mark.read)
        if found is not None:
            return _checked(found, mark)
        if not locks.held(kind):
            # A token another newcomer made meanwhile is kept, and answered (None: gone meanwhile).
            made = _asked(mark, mark.make)
            if made is not None:
                return _checked(made, mark)
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Redis at {mark.where} does not keep the key meterline:store (evicted, or read "
                    "from a replica behind): give Meterline a Redis that keeps its keys",
                    param="redis_url",
                )
        elif time.monotonic() > deadline:
            raise _other_redis("another process", locks.shown, mark.where, locks.where)
        time.sleep(0.1)


def _asked(mark: StoreMark, ask: Callable[[], str | None]) -> str | None:
    try:
        return ask()
    except Exception as exc:  # whatever the client raises: which Redis this is cannot be known
        raise ConfigError(f"cannot reach Redis at {mark.where}: {exc}", param="redis_url") from None


def _checked(token: str, mark: StoreMark) -> str:
    # It names a lock (and on SQLite a file): only what ``make`` writes is taken.
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            f"Redis at {mark.where} holds {token!r} in its key meterline:store, which is not a mark "
            "Meterline made; delete that key (it names the Redis the counters are kept in) or use "
            "another Redis (or database number)",
            param="redis_url",
        )
    return token


def _foreign(locks: _Locks, kind: str, beside: str) -> bool:
    """Whether a process counts in another Redis, as seen over a moment: a newcomer being refused, or one
    of the same Redis taking its locks again (in the order it first took them), holds the kind without
    this Redis' lock only for that long."""
    return _over_a_moment(lambda: locks.foreign(kind, beside))


def _other_kind(locks: _Locks, other: str) -> bool:
    """Whether a process of the other shared kind serves, as seen over a moment: a newcomer of that kind
    being refused holds it only for that long."""
    return _over_a_moment(lambda: locks.held(other))


def _over_a_moment(look: Callable[[], bool]) -> bool:
    # Safe however short: a claimant holds its own locks from before its first look until it is refused
    # (or for good), so of two that conflict, every look of the later one finds the earlier.
    for attempt in range(_FOREIGN_LOOKS):
        if not look():
            return False
        if attempt < _FOREIGN_LOOKS - 1:
            time.sleep(_FOREIGN_GAP_S)
    return True


class _MarkWriter:
    """Writes this process's Redis mark back every ``KEEP_EVERY_S`` from the claim until it is given back
    (from a thread of its own: a first process still resetting, or one whose session is gone, too): a Redis
    emptied, restarted without its data or failed over before a write reached its replica bears the
    mark again within a second, never waiting on a PostgreSQL check. Redis unreachable is said once,
    and tried again next time.

    Never over another mark: one is written only where none is (``StoreMark.keep``). Another can appear
    only while no process held the claim (a newcomer marks a Redis only then): PostgreSQL and Redis
    restarted together, and a newcomer came first. Each would otherwise write its own over the other's
    every second. The claim taken again then follows the Redis' mark (``follow``), as the newcomer's does."""

    def __init__(self, mark: StoreMark, token: str, kind: str) -> None:
        self._mark, self._kind = mark, kind
        self.token = token  # set by the claim's watch (``follow``), read here: one assignment
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meterline-counters-mark", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = False
        other: str | None = None  # another mark found, said once
        while not self._done.wait(KEEP_EVERY_S):
            try:
                token = self.token
                found = self._mark.keep(token)
                failing = False
            except Exception as exc:  # whatever the client raises: the mark waits for the next time
                if not failing:
                    log.warning("writing this process's mark in Redis (%s) failed: %s", self._mark.where, exc)
                failing = True
                continue
            if found is not None and found != token and found != other and self.token == token:
                other = found
                log.warning(
                    "Redis at %s bears another mark (%r) than this process's: a newcomer counting in it "
                    "is refused while this process serves (it follows the mark when it next takes its "
                    "claim again); the key meterline:store was changed by hand, or Redis restored from "
                    "another's data",
                    self._mark.where,
                    found,
                )

    def follow(self) -> str | None:
        """The lock named by the Redis' mark now, this process's written back where it is missing: for a
        claim taken again (another mark, made while no process held the claim, is followed from now on).
        None when Redis does not answer or holds no valid mark: which Redis this is is not known."""
        try:
            found = self._mark.keep(self.token)
        except Exception:  # whatever the client raises: the claim is taken again next time
            return None
        if found is None or not _TOKEN.fullmatch(found):
            return None
        if found != self.token:
            log.warning(
                "Redis at %s was marked anew while this process's counters claim was gone (Redis emptied "
                "or restarted without its data meanwhile): following its mark",
                self._mark.where,
            )
            self.token = found
        return f"{self._kind}@{self.token}"

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()  # a write is bounded by the client's timeout


def _started(marking: _MarkWriter | None) -> _MarkWriter | None:
    if marking is not None:
        marking.start()
    return marking


def _waiting(attempt: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + _SHARE_WAIT_S
    while not attempt():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _unopenable(path: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot open {path}, the counters' claim beside the database: {exc.strerror}. Give it to the "
        "user that serves (chown), or remove it while no process serves",
        param="database_url",
    )


def _probe(fd: int) -> bool:
    """Whether nobody holds the file's lock. Another newcomer's probe holds it for a moment only: a
    holder is one found three times."""
    for attempt in range(3):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < 2:
                time.sleep(0.02)
    return False


class _FileLocks:
    """``flock`` on files beside the SQLite file."""

    def __init__(self, database: Path) -> None:
        self.shown = str(database)
        self.where = f" (lock: {database.with_name(database.name + '.counters.lock')})"
        self._paths = {
            "main": database.with_name(database.name + ".counters.lock"),
            **{kind: database.with_name(f"{database.name}.counters.{kind}.lock") for kind in SHARED_KINDS},
        }
        self._database = database
        self._fds: dict[str, int] = {}

    def _path(self, name: str) -> Path:
        # A Redis' lock ("redis@<token>") is a file of its own: ``foreign`` finds them by their names.
        known = self._paths.get(name)
        return known or self._database.with_name(f"{self._database.name}.counters.{name}.lock")

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self._path(name)
            try:
                fd = self._fds[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:  # another user's file (an earlier `sudo meterline serve`), say
                raise _unopenable(path, exc) from None
        return fd

    def _flock(self, name: str, how: int) -> bool:
        try:
            fcntl.flock(self._fd(name), how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def try_exclusive(self, name: str) -> bool:
        return self._flock(name, fcntl.LOCK_EX)

    def try_shared(self, name: str) -> bool:
        return self._flock(name, fcntl.LOCK_SH)

    def held(self, name: str) -> bool:
        fd = self._fd(name)
        if not _probe(fd):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def unlock(self, name: str) -> None:
        fcntl.flock(self._fd(name), fcntl.LOCK_UN)

    def to_shared(self, name: str) -> bool:
        return self._flock(name, fcntl.LOCK_SH)  # a conversion: never waits for another holder

    def holder(self) -> str:
        # The pid in the file is the last exclusive (in-process) holder's.
        found = os.pread(self._fd("main"), 32, 0).decode(errors="replace").strip()
        return f"process {found}" if found.isdigit() else "another process"

    def note_holder(self) -> None:
        self._write(f"{os.getpid()}\n")

    def mark_resetting(self, on: bool) -> None:
        self._write("resetting\n" if on else "")

    def resetting(self) -> bool:
        return os.pread(self._fd("main"), 32, 0).startswith(b"resetting")

    def keeper(self) -> Callable[[], str | None] | None:
        return None  # held by the process's own descriptors: they last as long as it does

    def exclude(self, name: str) -> None:
        return None  # checked once, at the claim: the claim is never lost and taken again here

    def foreign(self, kind: str, name: str) -> bool:
        """Whether a process holds the lock of another Redis than ``name`` (``kind@<token>``): the files
        of the Redis ever used beside this database, each probed (a held one cannot be locked)."""
        mine = self._path(name)
        for path in sorted(mine.parent.glob(f"{glob.escape(self._database.name)}.counters.{kind}@*.lock")):
            if path == mine:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)  # enough for flock, and for another user's file
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _unopenable(path, exc) from None
            try:
                if not _probe(fd):
                    return True
            finally:
                os.close(fd)  # drops the probe's lock
        return False

    def require_beside(self, kind: str, name: str, follow: Callable[[], str | None]) -> None:
        return None  # as ``exclude``

    def _write(self, content: str) -> None:
        fd = self._fd("main")
        os.ftruncate(fd, 0)
        os.pwrite(fd, content.encode(), 0)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # closing a descriptor drops its lock


_TRY = {"x": "pg_try_advisory_lock", "s": "pg_try_advisory_lock_shared"}


# The holders of one advisory lock of this database (its key the parameter named ``key``), each as (pid,
# backend_start, mode): a pid alone may be another session's once PostgreSQL restarted.
def _holders(key: str) -> str:
    return (
        "SELECT l.pid, a.backend_start, l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        f"AND ((l.classid::bigint << 32) | l.objid::bigint) = :{key} "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


_HOLDERS = _holders("key")
_Session = tuple[int, Any]  # (backend pid, backend_start)
# What a claim's session asks the server, beside the client's own keepalives: a host that vanished
# (power lost, cut off) leaves its session open on the server until the server's TCP keepalive gives up
# on it, about two hours by default, and every process claiming meanwhile would be refused. Probed
# after 5 s idle, given up on within ~11 s (ignored on a Unix socket; tcp_user_timeout needs 12+).
# And a statement timeout: the watch, and so a shutdown, never hangs on a server that stalls but still
# acknowledges (every query of the claim is a look, never a wait).
_SESSION_SETTINGS = (
    ("tcp_keepalives_idle", 5),
    ("tcp_keepalives_interval", 2),
    ("tcp_keepalives_count", 3),
    ("tcp_user_timeout", 10_000),
    ("statement_timeout", 5_000),
)


class _NotYet(Exception):
    """A lock of the claim is not to be had again yet, and not lost either: a newcomer of the same kind
    and Redis holds it while it resets (it shares it next), this claim's own former session has not let
    go of it yet, or its Redis does not answer (which Redis it is cannot be known). The claim is taken
    again next time."""


class _AdvisoryLocks:
    """PostgreSQL session advisory locks on a connection of the claim's own."""

    def __init__(self, database_url: str, shown: str) -> None:
        self.shown, self.where = shown, ""
        self._engine = create_engine(
            database_url,
            poolclass=pool.NullPool,
            connect_args={
                # Named in pg_stat_activity, for an operator who wonders what holds it.
                "application_name": "meterline counters claim",
                # Every call of the watch ends soon: a server gone silent (a failover to another address)
                # is found out in seconds, not after TCP's retransmissions.
                "connect_timeout": _CONNECT_TIMEOUT_S,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 3,
                "tcp_user_timeout": 10_000,
            },
        )
        # name -> modes this session holds ("x" exclusive, "s" shared), in the order taken (a name let go
        # entirely and taken again goes last)
        self._held: dict[str, set[str]] = {}
        self._excluded: str | None = None  # the other shared kind, checked again when the claim is retaken
        self._beside: tuple[str, str] | None = None  # (kind, its Redis' lock): checked again as well
        self._follow: Callable[[], str | None] | None = None  # the Redis' lock as its mark names it now
        self._gone_since: float | None = None  # when the session was found gone (not yet taken again)
        self._former: set[_Session] = set()  # the sessions this claim had before its current one
        self._waiting_said = False  # a retake waiting for a newcomer's reset has said so (once a gap)
        self._guard = threading.Lock()  # the watch's thread and ``close`` never share the connection
        self._closed = False
        try:
            self._conn: Connection = self._engine.connect()
            self._session = self._current_session()
        except OperationalError as exc:
            self._engine.dispose()
            raise ConfigError(
                f"cannot reach the database {shown}: {exc.orig}", param="database_url"
            ) from None

    def _current_session(self) -> _Session:
        for setting, value in _SESSION_SETTINGS:
            try:
                self._conn.execute(text(f"SET {setting} = {value}"))
                self._conn.commit()
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise
                self._conn.rollback()  # a server without it (tcp_user_timeout before 12), a pooler's refusal
                log.info("the counters claim's session could not set %s: %s", setting, exc.orig)
        row = self._conn.execute(
            text("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        ).one()
        self._conn.commit()
        return int(row[0]), row[1]

    def _ask(self, function: str, name: str) -> Any:
        found = self._conn.execute(text(f"SELECT {function}(:key)"), {"key": claim_key(name)}).scalar()
        self._conn.commit()  # session locks outlive transactions: none is left open
        return found

    def _lock(self, name: str, mode: str) -> bool:
        taken = bool(self._ask(_TRY[mode], name))
        if taken:
            self._held.setdefault(name, set()).add(mode)
        return taken

    def try_exclusive(self, name: str) -> bool:
        return self._lock(name, "x")

    def try_shared(self, name: str) -> bool:
        return self._lock(name, "s")

    def _any_holder(self, name: str, where: str, beside: str | None = None) -> bool:
        """Whether a session holds lock ``name`` as ``where`` says (on the columns pid and mode; the
        parameter ``beside`` names a second lock): looked up in ``pg_locks``, never probed, since a
        probe holds the lock a moment and makes another's probe or ``try_*`` fail."""
        keys = {"key": claim_key(name)} | ({} if beside is None else {"beside": claim_key(beside)})
        found = self._conn.execute(
            text(f"SELECT count(*) FROM ({_HOLDERS}) holders WHERE {where}"), keys
        ).scalar()
        self._conn.commit()
        return bool(found)

    def held(self, name: str) -> bool:
        return self._any_holder(name, "pid <> pg_backend_pid()")

    def unlock(self, name: str) -> None:
        self._ask("pg_advisory_unlock", name)
        modes = self._held.get(name, set())
        modes.discard("x")
        if not modes:  # a name taken again later goes to the end of the order (``_keep``)
            self._held.pop(name, None)

    def to_shared(self, name: str) -> bool:
        # The session may hold both: shared first, then the exclusive let go, so no one slips between.
        held = self.try_shared(name)
        self.unlock(name)
        return held

    def holder(self) -> str:
        return "another process"

    def note_holder(self) -> None:
        return None

    def mark_resetting(self, on: bool) -> None:
        if not on:
            self.unlock("resetting")
        elif not self.try_exclusive("resetting"):  # nobody else takes it: ``resetting`` only looks
            raise RuntimeError("the counters' reset mark is held by another session")

    def resetting(self) -> bool:
        return self._any_holder("resetting", "mode = 'ExclusiveLock'")

    def exclude(self, name: str) -> None:
        self._excluded = name

    def foreign(self, kind: str, name: str) -> bool:
        # Sessions sharing the kind's lock (a claim holds it shared) without the lock of this Redis.
        return self._any_holder(
            kind, f"mode = 'ShareLock' AND pid NOT IN (SELECT pid FROM ({_holders('beside')}) theirs)", name
        )

    def require_beside(self, kind: str, name: str, follow: Callable[[], str | None]) -> None:
        self._beside = (kind, name)
        self._follow = follow

    def _follow_the_mark(self) -> None:
        """The Redis' lock taken again under the name its mark has now (it was marked anew while this
        claim was gone, ``_MarkWriter``), in the place of the former one. Which Redis this is cannot be
        known without it: not yet, then."""
        if self._beside is None or self._follow is None:
            return
        kind, former = self._beside
        now = self._follow()
        if now is None:
            raise _NotYet
        if now != former:
            self._held = {now if name == former else name: modes for name, modes in self._held.items()}
            self._beside = (kind, now)

    def keeper(self) -> Callable[[], str | None] | None:
        return self._keep

    def _keep(self) -> str | None:
        """One query on the claim's session: None while it lives. Once it has ended, a new session takes
        every lock it held again, and checks again that no process of the other shared kind serves (the
        database unreachable, or the new session lost too: tried again next time); what to tell the
        operator when another process holds one of them now."""
        with self._guard:
            if self._closed:
                return None
            if self._gone_since is None:
                try:
                    self._conn.execute(text("SELECT 1"))
                    self._conn.commit()
                    return None
                except DBAPIError as exc:
                    if not exc.connection_invalidated:  # a cancelled query, say: the session lives on
                        with contextlib.suppress(Exception):
                            self._conn.rollback()
                        return None
                self._gone_since = time.monotonic()
                log.warning(
                    "the PostgreSQL session holding this process's counters claim ended: taking it again"
                )
            with contextlib.suppress(Exception):
                self._conn.close()
            self._former.add(self._session)
            try:
                self._conn = self._engine.connect()
                self._session = self._current_session()
                self._follow_the_mark()
                # In the order they were first taken (a Redis' lock before its kind's: ``_claim``).
                for name, modes in list(self._held.items()):
                    for mode in sorted(modes):
                        if not self._take_again(name, mode):
                            return _LOST.format(database=self.shown)
                if self._excluded is not None and _other_kind(self, self._excluded):
                    return _LOST.format(database=self.shown)
                if self._beside is not None and _foreign(self, *self._beside):
                    return _LOST.format(database=self.shown)
                self._end_former()
                self._former.clear()  # ended, or gone: none holds a lock of this claim any more
                self._waiting_said = False
            except (DBAPIError, _NotYet):
                with contextlib.suppress(Exception):
                    self._conn.close()  # no lock half taken again is left held until next time
                return None  # unreachable, lost again, or not to be had yet: next time
            log.info(
                "the counters claim was taken again, %.1f s after its session was found gone",
                time.monotonic() - self._gone_since,
            )
            self._gone_since = None
            return None

    def _take_again(self, name: str, mode: str) -> bool:
        """One lock of the claim, on the new session. A former session of this claim may still hold it
        (this side saw its connection fail before the server noticed): it is ended, and the lock asked
        for again; anyone else's stands."""
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S  # an ended session lets go as it exits
        while not self._ask(_TRY[mode], name):
            holders = {
                (int(pid), start)
                for pid, start, _mode in self._conn.execute(text(_HOLDERS), {"key": claim_key(name)})
            }
            self._conn.commit()
            if holders - self._former:
                if name == "main" and mode == "s" and self._newcomer_resetting():
                    raise _NotYet
                return False
            if time.monotonic() > deadline:
                raise _NotYet  # only this claim's own former sessions hold it: they are ended next time
            self._terminate(holders)
            time.sleep(0.05)
        return True

    def _newcomer_resetting(self) -> bool:
        """Whether "main", held exclusively by another session, is held by a newcomer of this claim's
        kind (and Redis) that found itself alone in the claim's gap and resets: it shares it when done,
        and the two then count in one place. A newcomer of the other kind, or of another Redis, holds
        those locks through its reset: this claim is lost at once. A first claimant marks its reset a
        moment after taking the lock, so a hold that stays unmarked ``_UNMARKED_S`` is one of in-process
        counters."""
        if self._excluded is not None and _other_kind(self, self._excluded):
            return False
        if self._beside is not None and _foreign(self, *self._beside):
            return False
        deadline = time.monotonic() + _UNMARKED_S
        while not self.resetting():
            if not self._any_holder("main", "mode = 'ExclusiveLock' AND pid <> pg_backend_pid()"):
                return True  # let go meanwhile (shared after a reset, or gone): taken next time
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        if not self._waiting_said:
            self._waiting_said = True
            log.info("a newcomer with the same counters is resetting them: this claim is taken again after")
        return True

    def _end_former(self) -> None:
        """Former sessions the server still keeps (holding shared locks beside the new one, they would
        outlive this process): ended."""
        pids = [pid for pid, _ in self._former]
        rows = self._conn.execute(
            text("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": pids}
        )
        alive = {(int(pid), start) for pid, start in rows} & self._former
        self._conn.commit()
        self._terminate(alive)

    def _terminate(self, sessions: set[_Session]) -> None:
        for pid, _ in sessions:
            self._conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            self._conn.commit()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            with contextlib.suppress(Exception):
                self._conn.close()
            self._engine.dispose()


__all__ = ["SHARED_KINDS", "Claim", "claim_counters", "claim_key"]
