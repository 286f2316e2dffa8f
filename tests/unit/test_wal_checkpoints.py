"""WAL checkpoints on a real SQLite file: commits leave them to a thread of their own, which copies what
was committed into the database file without the write lock, and stops with the database."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Connection

from meterline.storage.database import Database
from meterline.storage.wal_checkpoints import BACKSTOP_PAGES


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'c.db'}")
    with database.write() as conn:
        conn.exec_driver_sql("CREATE TABLE items (name TEXT PRIMARY KEY)")
    yield database
    database.dispose()


def in_database_file(path: Path) -> set[str]:
    """What the database file itself holds, the write-ahead log ignored (``immutable``): only what a
    checkpoint has copied there. Nothing while the file is being written (a read that is torn, or finds
    no table yet, is asked again)."""
    try:
        with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
            return {name for (name,) in conn.execute("SELECT name FROM items")}
    except sqlite3.DatabaseError:
        return set()


def test_a_small_commit_reaches_the_database_file_without_another_commit(
    db: Database, tmp_path: Path
) -> None:
    # Left to SQLite, a commit of a few pages stays in the log until commits add up to 1,000 pages.
    db.writer.run(lambda conn: conn.exec_driver_sql("INSERT INTO items (name) VALUES ('a')"))
    deadline = time.monotonic() + 10
    while "a" not in in_database_file(tmp_path / "c.db"):
        assert time.monotonic() < deadline, "nothing copied the committed row into the database file"
        time.sleep(0.02)


def test_commits_checkpoint_by_themselves_only_past_the_backstop(db: Database) -> None:
    def setting(conn: Connection) -> int:
        found = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        assert found is not None
        return int(found)

    assert db.writer.run(setting) == BACKSTOP_PAGES


def checkpoint_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "meterline-checkpoints"}


def test_the_checkpoint_thread_stops_with_the_database(tmp_path: Path) -> None:
    before = checkpoint_threads()  # other tests' databases, if any are still open
    database = Database(f"sqlite:///{tmp_path / 'd.db'}")
    with database.write() as conn:
        conn.exec_driver_sql("CREATE TABLE items (name TEXT PRIMARY KEY)")
    started = checkpoint_threads() - before
    assert len(started) == 1  # the first commit started it
    database.dispose()
    assert not any(thread.is_alive() for thread in started)
