"""The event loop held still while this process's writer holds the SQLite write lock other processes
wait for (``api/standstill.py``, ``Database.hold_still``): on a real loop in its own thread, a real
SQLite file and a real second process holding the file's write lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from meterline.api.app import create_app
from meterline.api.standstill import Standstill
from meterline.config import load_settings
from meterline.storage.database import Database

PATIENCE_S = 10.0  # how long a test waits for the loop to move (never a bound on speed)


class Ticking:
    """An event loop in a thread of its own, counting its turns."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ticks = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        ticks = self.loop.create_task(self._tick())
        self.loop.run_forever()
        ticks.cancel()
        self.loop.run_until_complete(asyncio.gather(ticks, return_exceptions=True))

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    def on_loop(self, fn: Callable[[], object]) -> object:
        async def run() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(PATIENCE_S)

    def standstill(self, **limits: float) -> Standstill:
        made = self.on_loop(lambda: Standstill(asyncio.get_running_loop(), **limits))
        assert isinstance(made, Standstill)
        return made

    def moves(self) -> bool:
        """Whether the loop takes a turn within PATIENCE_S."""
        start, deadline = self.ticks, time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            if self.ticks != start:
                return True
            time.sleep(0.001)
        return False

    def still_for(self, seconds: float) -> bool:
        """Whether the loop took no turn while this thread slept ``seconds``."""
        at = self.ticks
        time.sleep(seconds)
        return self.ticks == at

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(PATIENCE_S)
        self.loop.close()


@pytest.fixture
def ticking() -> Iterator[Ticking]:
    running = Ticking()
    yield running
    if not running.loop.is_closed():
        running.stop()


def test_the_loop_stands_still_for_the_block_and_goes_on_after_it(ticking: Ticking) -> None:
    standstill = ticking.standstill(settle_s=PATIENCE_S, longest_s=PATIENCE_S)
    assert ticking.moves()
    with standstill() as standing:
        assert standing
        assert ticking.still_for(0.05)
    assert ticking.moves()


def test_the_loop_never_waits_longer_than_its_limit(ticking: Ticking) -> None:
    standstill = ticking.standstill(settle_s=PATIENCE_S, longest_s=0.01)
    with standstill() as standing:
        assert standing
        assert ticking.moves()  # the block has not ended, the loop went on anyway


def test_a_block_on_the_loop_itself_holds_nothing(ticking: Ticking) -> None:
    standstill = ticking.standstill(settle_s=PATIENCE_S, longest_s=PATIENCE_S)

    def on_the_loop() -> bool:
        with standstill() as standing:
            return bool(standing)

    assert ticking.on_loop(on_the_loop) is False
    assert ticking.moves()


def test_a_closed_loop_holds_nothing(ticking: Ticking) -> None:
    standstill = ticking.standstill(settle_s=PATIENCE_S, longest_s=PATIENCE_S)
    ticking.stop()
    with standstill() as standing:
        assert not standing


def test_one_hold_after_another_each_holds_the_loop(ticking: Ticking) -> None:
    standstill = ticking.standstill(settle_s=PATIENCE_S, longest_s=PATIENCE_S)
    for _ in range(50):
        with standstill() as standing:
            assert standing
            assert ticking.still_for(0.001)
    assert ticking.moves()


class LockHolder:
    """Another process holding the database's write lock until told to let go."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "sys.stdin.readline()\n",
                str(path.with_name(path.name + ".write.lock")),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "held"

    @staticmethod
    def wait_for_a_writer(db: Database) -> None:
        """Until a write of ``db`` is past its own process's lock, so waiting for this one's."""
        deadline = time.monotonic() + PATIENCE_S
        while not db._write_lock.locked() and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.001)
        time.sleep(0.05)  # from the in-process lock to the file lock: a few statements

    def let_go(self) -> None:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write("go\n")
        stdin.close()
        self.process.wait(PATIENCE_S)
        stdout.close()


def test_a_write_after_waiting_for_another_process_holds_the_loop_still(
    ticking: Ticking, tmp_path: Path
) -> None:
    path = tmp_path / "m.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.hold_still = ticking.standstill(settle_s=PATIENCE_S, longest_s=PATIENCE_S)
        # Alone on the file: the loop goes on during a write.
        with db.write() as conn:
            conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
            assert ticking.moves()
        holder = LockHolder(path)
        stood: list[bool] = []

        def write_twice() -> None:
            # Waits for the other process first; then this write and the next hold the loop still.
            for n in range(2):
                with db.write() as conn:
                    conn.exec_driver_sql("INSERT INTO t (n) VALUES (?)", (n,))
                    stood.append(ticking.still_for(0.02))

        writing = threading.Thread(target=write_twice)
        try:
            writing.start()
            holder.wait_for_a_writer(db)
        finally:
            holder.let_go()
            writing.join(PATIENCE_S)
        assert stood == [True, True]
        assert ticking.moves()
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 2
    finally:
        db.dispose()


def test_a_write_that_fails_lets_the_loop_go_on(ticking: Ticking, tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.hold_still = ticking.standstill(settle_s=PATIENCE_S, longest_s=6 * PATIENCE_S)
        holder = LockHolder(path)
        failed: list[BaseException] = []

        def write() -> None:
            try:
                with db.write() as conn:
                    conn.exec_driver_sql("SELECT no_such_function()")
            except Exception as exc:
                failed.append(exc)

        writing = threading.Thread(target=write)
        writing.start()
        holder.wait_for_a_writer(db)
        holder.let_go()
        writing.join(PATIENCE_S)
        assert failed
        assert "no_such_function" in str(failed[0])
        assert ticking.moves()  # long before the loop's own limit would have let it go
    finally:
        db.dispose()


def test_a_server_on_sqlite_sets_its_loop_to_stand_still_and_takes_it_back(tmp_path: Path) -> None:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'meterline.db'}",
        admin_key="admin-key-for-the-standstill-test",
        signing_key_file=str(tmp_path / "signing-key.json"),
    )
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        services = app.state.services
        assert isinstance(services.db.hold_still, Standstill)
    assert services.db.hold_still is None
