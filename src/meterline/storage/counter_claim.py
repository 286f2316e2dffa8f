"""One process at a time may decide quotas for a database with in-process (``memory://``) counters.

In-process counters are exact only while they are the only ones: two ``meterline serve`` processes on one
database would each count alone, and a daily limit of 100 calls would admit 200 (both processes seed from
the ledger, then neither sees the other's reservations). So a server with in-process counters claims the
database for the life of the process, and a second one refuses to start, naming the fix:

* SQLite file: an exclusive ``flock`` on ``<database file>.counters.lock`` (the kernel drops it when the
  process ends, however it ends; the file itself is left in place and is harmless);
* PostgreSQL: a session advisory lock held on a connection of its own (dropped when the connection or
  the process ends);
* an in-memory SQLite database is one process's anyway: nothing to claim.

Processes whose counters are shared (in the database, or in Redis) claim the same lock *shared*: any
number of them may serve together, but not beside a process with in-process counters, whose decisions
they would not see (and the reverse).

Only serving processes claim: management commands (``reconcile``, ``verify``...) decide no quotas.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.exc import OperationalError

from meterline.errors import ConfigError

# PostgreSQL advisory lock keys are one bigint per database: a fixed one names this claim.
_ADVISORY_KEY = zlib.crc32(b"meterline in-process counters")
_FIX = (
    "in-process counters are exact in one process only; beside another serving process each would count "
    "alone, and limits would not hold across them. Stop the other process, or give every process one "
    'shared counter store: redis_url = "redis://host:6379/0", or counters = "database" (what '
    "`meterline serve --workers N` uses); README: Deployment"
)


def claim_counters(database_url: str, *, in_process: bool) -> Callable[[], None]:
    """Claim ``database_url`` for this serving process (exclusively when its counters are in-process);
    the function that gives it back. Raises ``ConfigError`` when that cannot be."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        name = url.database
        if not name or name == ":memory:" or name.startswith("file::memory:"):
            return lambda: None
        return _claim_file(Path(name).resolve(), in_process)
    return _claim_advisory(database_url, url.render_as_string(hide_password=True), in_process)


def _refusal(who: str, database: object, in_process: bool, where: str = "") -> ConfigError:
    if in_process:
        return ConfigError(f"{who} already serves {database}{where}: {_FIX}", param="redis_url")
    return ConfigError(
        f"{who} serves {database} with in-process counters{where}: processes with shared counters "
        "(in the database or in Redis) would not see its reservations, nor it theirs. Stop it, or start "
        "every process with the same counter store",
        param="counters",
    )


def _claim_file(database: Path, in_process: bool) -> Callable[[], None]:
    lock = database.with_name(database.name + ".counters.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if in_process else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        # The pid in the file is the last exclusive holder's: the one in the way only when this claim is
        # shared (an exclusive claim may meet shared holders, who write nothing).
        who = f"process {holder}" if holder.isdigit() and not in_process else "another process"
        raise _refusal(who, database, in_process, f" (lock: {lock})") from None
    except BaseException:
        os.close(fd)
        raise
    if in_process:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def give_back() -> None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor drops the lock

    return give_back


def _claim_advisory(database_url: str, shown: str, in_process: bool) -> Callable[[], None]:
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        conn = engine.connect()
    except OperationalError as exc:
        engine.dispose()
        raise ConfigError(f"cannot reach the database {shown}: {exc.orig}", param="database_url") from None
    try:
        kind = "pg_try_advisory_lock" if in_process else "pg_try_advisory_lock_shared"
        held = conn.execute(text(f"SELECT {kind}(:key)"), {"key": _ADVISORY_KEY}).scalar()
        conn.commit()  # the lock is the session's, not the transaction's: no transaction is left open
    except BaseException:
        conn.close()
        engine.dispose()
        raise
    if not held:
        conn.close()
        engine.dispose()
        raise _refusal("another process", shown, in_process)

    def give_back() -> None:
        with contextlib.suppress(Exception):
            conn.close()
        engine.dispose()

    return give_back
