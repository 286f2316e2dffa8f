"""Two `meterline serve` processes with in-process (memory://) counters on one database: each would count
alone (a free plan's 100 daily calls admitted 200, and nothing warned). The second now refuses to start,
and says what to do; once the first has gone, however it went, a new one starts. On PostgreSQL the claim
is held by a session: when that session ends while the process serves on, the process takes the claim
again, or stops if another process took it meanwhile."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import text

from meterline.errors import ConfigError, MeterlineError
from meterline.storage import counter_claim
from meterline.storage.counter_claim import Claim, claim_counters, claim_key
from meterline.storage.redis_counters import RedisMark
from servers import (
    METERLINE,
    MeterlineServer,
    PostgresServer,
    free_port,
    running,
    start_redis,
)

ADMIN_KEY = "ml_admin_claim_0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meterline.db'}"
        drop = None
    else:
        pg: PostgresServer = request.getfixturevalue("pg_server")
        name = f"claim_{uuid.uuid4().hex[:12]}"
        url = pg.create_database(name)
        drop = name
    path = tmp_path / "meterline.toml"
    path.write_text(
        f'database_url = "{url}"\nadmin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
    )
    yield path
    if drop is not None:
        request.getfixturevalue("pg_server").drop_database(drop)


def _second_serve(
    config: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, "serve", "--config", str(config), "--port", str(free_port()), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", **(env or {})},
    )


def _refusal(config: Path, cwd: Path, *args: str) -> str:
    """What a second ``serve`` that must not start says (on one line), once it has exited 1."""
    refused = _second_serve(config, cwd, *args)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    return " ".join(refused.stderr.split())


def test_a_second_process_with_its_own_counters_refuses_to_start(config: Path, tmp_path: Path) -> None:
    first = MeterlineServer(config, tmp_path, "first")
    first.start()
    try:
        message = _refusal(config, tmp_path)
        assert "already serves" in message
        assert "in-process counters are exact in one process only" in message
        assert "limits would not hold across them" in message
        assert 'redis_url = "redis://host:6379/0"' in message
        assert 'counters = "database"' in message
        # The first is untouched.
        assert httpx.get(f"{first.base}/healthz", timeout=5).status_code == 200
    finally:
        first.kill()  # SIGKILL: the claim goes with the process, whatever ended it
    again = MeterlineServer(config, tmp_path, "again")
    again.start()
    again.stop()


def test_processes_with_shared_counters_and_one_with_its_own_never_serve_together(
    config: Path, tmp_path: Path
) -> None:
    workers = MeterlineServer(config, tmp_path, "workers", ("--workers", "2"))
    workers.start()
    try:
        # More processes with shared counters may join (another machine, a rolling restart)...
        more = MeterlineServer(config, tmp_path, "more", ("--workers", "2"))
        more.start()
        more.stop()
        # ...but not one keeping its counters to itself; the fix named is the running processes' store.
        message = _refusal(config, tmp_path)
        assert "in-process counters are exact in one process only" in message
        assert "with its counters in the database" in message
        assert 'start this one with counters = "database"' in message
        assert "redis_url" not in message
    finally:
        workers.stop()
    single = MeterlineServer(config, tmp_path, "single")
    single.start()
    try:
        message = _refusal(config, tmp_path, "--workers", "2")
        assert "with in-process counters" in message
        assert "would not see its reservations" in message
    finally:
        single.stop()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--workers", "0"), "workers (from --workers): workers must be 1 to 64"),
        (("--workers", "two"), "(from --workers): Input should be"),
    ],
)
def test_a_bad_worker_count_is_refused_with_its_name(
    config: Path, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    refused = _second_serve(config, tmp_path, *args)
    assert refused.returncode != 0
    assert said in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr


def test_a_bad_setting_is_named_where_it_came_from(config: Path, tmp_path: Path) -> None:
    # The environment beats the file, and an option both: the error names the one that was used.
    refused = _second_serve(config, tmp_path, env={"METERLINE_WORKERS": "0"})
    assert refused.returncode == 2
    said = " ".join(refused.stderr.split())
    assert "error: workers (from METERLINE_WORKERS): workers must be 1 to 64" in said
    config.write_text(config.read_text() + "workers = 0\n")
    refused = _second_serve(config, tmp_path)
    assert f"error: {config}: workers: workers must be 1 to 64" in " ".join(refused.stderr.split())


def test_counters_chosen_beside_a_redis_url_are_refused_not_ignored(config: Path, tmp_path: Path) -> None:
    # With redis_url the counters are in Redis: a counters setting beside it would be silently ignored.
    refused = _second_serve(
        config, tmp_path, env={"METERLINE_COUNTERS": "memory", "METERLINE_REDIS_URL": "redis://127.0.0.1:1/0"}
    )
    assert refused.returncode == 2, refused.stderr
    message = " ".join(refused.stderr.split())
    assert 'counters = "memory" and redis_url both say where quota counters are kept' in message
    assert "remove one of them" in message


def test_in_process_counters_with_several_workers_are_refused(config: Path, tmp_path: Path) -> None:
    config.write_text(config.read_text() + 'counters = "memory"\n')
    refused = _second_serve(config, tmp_path, "--workers", "2")
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert 'counters = "memory" keeps quota counters in one process' in message


def _tenant(base: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    org = httpx.post(f"{base}/v1/admin/organizations", json={"name": "O", "plan": "ten"}, headers=admin)
    assert org.status_code == 201, org.text
    ws = httpx.post(
        f"{base}/v1/admin/workspaces", json={"organization_id": org.json()["id"], "name": "W"}, headers=admin
    )
    key = httpx.post(
        f"{base}/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "K"}, headers=admin
    )
    return {"Authorization": f"Bearer {key.json()['key']}"}


def _calls(base: str, headers: dict[str, str], tag: str, count: int) -> list[int]:
    return [
        httpx.post(
            f"{base}/v1/events",
            json={"events": [{"id": f"{tag}-{i}", "model": "gpt-4o-mini", "prompt_tokens": 1}]},
            headers=headers,
            timeout=30,
        ).status_code
        for i in range(count)
    ]


def test_counters_kept_in_the_database_never_miss_what_another_kind_of_counters_counted(
    config: Path, tmp_path: Path
) -> None:
    # Ten calls a day, across three deployments one after the other: 2 workers (counters in the
    # database), then one process (in-process counters), then 2 workers again. The database's counters
    # did not see the middle period: the first process of the last deployment drops them, and they
    # reload from the ledger.
    config.write_text(
        config.read_text()
        + "\n[plans.ten]\ndaily_calls = 10\nmonthly_calls = -1\ndaily_tokens = -1\nmonthly_tokens = -1\n"
        'rpm = -1\ntpm = -1\nmonthly_credits = -1\noverage = "block"\n'
    )
    first = MeterlineServer(config, tmp_path, "first", ("--workers", "2"))
    first.start()
    headers = _tenant(first.base)
    assert _calls(first.base, headers, "a", 4) == [200] * 4
    first.stop()
    single = MeterlineServer(config, tmp_path, "single")
    single.start()
    assert _calls(single.base, headers, "b", 4) == [200] * 4
    single.stop()
    last = MeterlineServer(config, tmp_path, "last", ("--workers", "2"))
    last.start()
    try:
        assert _calls(last.base, headers, "c", 4) == [200, 200, 429, 429]
        usage = httpx.get(f"{last.base}/v1/usage", headers=headers, timeout=30).json()
        assert usage["daily"]["calls"]["usage"] == 10
    finally:
        last.stop()


def _with_redis(config: Path, name: str, url: str) -> Path:
    path = config.with_name(f"{name}.toml")
    path.write_text(config.read_text() + f'redis_url = "{url}"\n')
    return path


def test_counters_in_redis_and_counters_in_the_database_never_serve_one_database_together(
    config: Path, tmp_path: Path, redis_url_clean: str
) -> None:
    in_redis = MeterlineServer(
        _with_redis(config, "redis", redis_url_clean), tmp_path, "in-redis", ("--workers", "2")
    )
    in_redis.start()
    try:
        message = _refusal(config, tmp_path, "--workers", "2")
        assert "with its counters in Redis; this one would keep them in the database" in message
    finally:
        in_redis.stop()


def test_processes_counting_in_another_redis_never_serve_one_database_together(
    config: Path, tmp_path: Path, redis_url_clean: str
) -> None:
    # Machines each told redis://localhost:6379 count in a Redis of their own: on one database, a limit
    # would be admitted once per Redis. A process whose Redis is not the one the others count in is
    # refused, whatever its URL says; one that names the same Redis otherwise joins.
    first = MeterlineServer(_with_redis(config, "first", redis_url_clean), tmp_path, "first")
    first.start()
    other = start_redis(tmp_path)
    try:
        # One with in-process counters is told to count where the running one does: in its Redis.
        message = _refusal(config, tmp_path)
        assert "with its counters in Redis" in message
        assert "start this one with the same redis_url" in message
        assert 'counters = "database"' not in message
        message = _refusal(_with_redis(config, "elsewhere", other.url), tmp_path)
        where = f"redis://127.0.0.1:{other.port}/0"
        assert f"with its counters in another Redis than this one ({where})" in message
        assert "limits would not hold" in message
        assert "Give every process the same redis_url" in message
        # ...and so is one whose Redis bears a mark of its own (it kept another database's counters, or
        # this one's before this deployment moved).
        elsewhere = RedisMark(other.url)
        assert elsewhere.make()
        elsewhere.close()
        message = _refusal(_with_redis(config, "marked", other.url), tmp_path)
        assert "in another Redis than this one" in message
        # The same Redis under another name (another machine reaching it otherwise) is welcome.
        same = MeterlineServer(
            _with_redis(config, "same", redis_url_clean.replace("127.0.0.1", "localhost")), tmp_path, "same"
        )
        same.start()
        same.stop()
        assert httpx.get(f"{first.base}/healthz", timeout=5).status_code == 200
    finally:
        first.stop()
        other.stop()
    assert "Traceback" not in first.log()


def test_a_redis_emptied_while_processes_serve_takes_their_newcomers_still(
    config: Path, tmp_path: Path, redis_url_clean: str
) -> None:
    # Redis restarted without its data (or emptied) while processes count in it: they mark it again, so
    # a process started then (a rolling restart, one more machine) joins them instead of being refused.
    with_redis = _with_redis(config, "redis", redis_url_clean)
    first = MeterlineServer(with_redis, tmp_path, "first")
    first.start()
    try:
        client = redis.Redis.from_url(redis_url_clean)
        marked = client.get("meterline:store")
        assert marked, "the serving process left no mark in its Redis"
        client.flushall()
        joining = MeterlineServer(with_redis, tmp_path, "joining")
        joining.start()
        joining.stop()
        assert client.get("meterline:store") == marked
        client.close()
    finally:
        first.stop()
    assert "Traceback" not in first.log()


def _database_url(config: Path) -> str:
    return str(tomllib.loads(config.read_text())["database_url"])


def _claim_at_once(url: str, marks: list[RedisMark]) -> tuple[list[Claim], list[str]]:
    """Each mark's claim, from threads started together: the claims made and the refusals said (any
    other error fails the test)."""
    start = threading.Barrier(len(marks))
    claims: list[Claim] = []
    refusals: list[str] = []
    errors: list[BaseException] = []

    def claim(mark: RedisMark) -> None:
        start.wait()
        try:
            claim = claim_counters(url, "redis", mark)
        except MeterlineError as exc:
            refusals.append(exc.message)
            return
        except BaseException as exc:
            errors.append(exc)
            return
        claim.share()  # as a serving process once it has reset what its counters need (if alone)
        claims.append(claim)

    threads = [threading.Thread(target=claim, args=(mark,)) for mark in marks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return claims, refusals


def test_two_processes_starting_at_once_with_different_redis_never_both_claim(
    config: Path, redis_url_clean: str, tmp_path: Path
) -> None:
    # Each takes its locks before it looks at the other's: whichever looks last sees the other. At most
    # one of the two may serve, every time: with Redis that bear marks already, and with fresh ones
    # (each newcomer then marks its own).
    url = _database_url(config)
    other = start_redis(tmp_path)
    marks = [RedisMark(redis_url_clean), RedisMark(other.url)]
    try:
        for attempt in range(4):
            for redis_url in (redis_url_clean, other.url):
                client = redis.Redis.from_url(redis_url)
                if attempt % 2:
                    client.delete("meterline:store")  # fresh...
                else:
                    client.set("meterline:store", uuid.uuid4().hex)  # ...or marked (another each time)
                client.close()
            claims, refusals = _claim_at_once(url, marks)
            try:
                assert len(claims) <= 1, "two processes with different Redis both claimed one database"
                assert len(claims) + len(refusals) == 2
                assert all("in another Redis than this one" in why for why in refusals), refusals
            finally:
                for taken in claims:
                    taken.give_back()
    finally:
        for mark in marks:
            mark.close()
        other.stop()


def test_a_newcomer_finding_no_mark_waits_for_the_serving_processes_to_write_it_back(
    config: Path, redis_url_clean: str
) -> None:
    url = _database_url(config)
    first_mark, second_mark = RedisMark(redis_url_clean), RedisMark(redis_url_clean)
    first = claim_counters(url, "redis", first_mark)
    first.share()
    lost: list[str] = []
    first.keep_alive(lost.append)
    try:
        client = redis.Redis.from_url(redis_url_clean)
        token = client.get("meterline:store")
        client.delete("meterline:store")  # emptied while the first serves
        client.close()
        second = claim_counters(url, "redis", second_mark)
        second.give_back()
        assert second_mark.read() == (token or b"").decode()
        assert not lost
    finally:
        first.give_back()
        first_mark.close()
        second_mark.close()


# -- PostgreSQL: the claim outlives the connection that holds it ------------------------------------------
@pytest.fixture
def pg_config(pg_server: PostgresServer, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    name = f"claim_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    path = tmp_path / "meterline.toml"
    path.write_text(
        f'database_url = "{url}"\nadmin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
    )
    yield path, pg_server.conninfo(name)
    pg_server.drop_database(name)


def _claim_holders(admin: psycopg.Connection[Any]) -> set[int]:
    """The sessions holding an advisory lock in this database: a serving process's claim."""
    rows = admin.execute(
        "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() "
        "AND l.pid <> pg_backend_pid()"
    ).fetchall()
    return {int(pid) for (pid,) in rows}


def _end_claim_session(admin: psycopg.Connection[Any]) -> set[int]:
    """The serving process's claim session ended, as a restart of PostgreSQL or a proxy would end it;
    the ended sessions' pids."""
    holders = _claim_holders(admin)
    assert holders, "the serving process holds no claim"
    for pid in holders:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    admin.execute("SET lock_timeout = '20s'")  # a lock the test then waits for fails rather than hangs
    return holders


def _claim_gone(conninfo: str) -> None:
    """The claim's session ended (as a restart of PostgreSQL ends it), and its locks let go: the gap in
    which a newcomer finds no one."""
    with psycopg.connect(conninfo, autocommit=True) as admin:
        _end_claim_session(admin)
        deadline = time.monotonic() + 10
        while _claim_holders(admin):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _lost_after_the_gap(
    conninfo: str, first: Claim, url: str, store: str, mark: RedisMark | None, *, share: bool = True
) -> None:
    """``first`` (serving) loses its session; a newcomer counting with ``store`` (in ``mark``'s Redis)
    claims in the gap (and shares its claim, as once it serves); the first, taking its claim again,
    must find itself lost at its first look."""
    first.share()
    try:
        _claim_gone(conninfo)
        second = claim_counters(url, store, mark)
        try:
            if share:
                second.share()
            why = first.keep()
            assert why is not None
            assert "another process took this database's counters claim" in why
        finally:
            second.give_back()
    finally:
        first.give_back()


SERVING = [pytest.param((), id="one-process"), pytest.param(("--workers", "2"), id="2-workers")]


@pytest.mark.parametrize("args", SERVING)
def test_a_claim_cut_off_with_its_connection_is_taken_again(
    pg_config: tuple[Path, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    # A PostgreSQL restart, a failover or a proxy's idle timeout ends the session that holds a serving
    # process's claim, and its locks with it. The process takes them again, on a new connection: a
    # second process with in-process counters, started after (a rolling restart), still refuses.
    config, conninfo = pg_config
    first = MeterlineServer(config, tmp_path, "first", args)
    first.start()
    try:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            before = _end_claim_session(admin)
            deadline = time.monotonic() + 20
            while not (_claim_holders(admin) - before):
                assert time.monotonic() < deadline, f"the claim was not taken again:\n{first.log()}"
                time.sleep(0.2)
        message = _refusal(config, tmp_path)
        assert "in-process counters are exact in one process only" in message
        assert httpx.get(f"{first.base}/healthz", timeout=5).status_code == 200
        assert "Traceback" not in first.log()
    finally:
        first.stop()


@pytest.mark.parametrize("args", SERVING)
def test_a_process_whose_claim_another_took_meanwhile_stops(
    pg_config: tuple[Path, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    # The claim's session ends, and before the process can take its claim again another takes it (as
    # a second process with in-process counters starting at that moment would). Serving on beside it,
    # each would count alone: the first stops (its workers too), and says why.
    config, conninfo = pg_config
    first = MeterlineServer(config, tmp_path, "first", args)
    first.start()
    try:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            _end_claim_session(admin)
            # Queued behind the ended session: granted as it goes, before the process can ask again.
            admin.execute("SELECT pg_advisory_lock(%s)", (claim_key("main"),))
            assert first.proc is not None
            code = first.proc.wait(timeout=30)
        assert code == 1, first.log()
        said = " ".join(first.log().split())
        assert "another process took this database's counters claim" in said
        assert "limits would not hold" in said
        assert "Traceback" not in first.log()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{first.base}/healthz", timeout=2)  # no worker serves on
    finally:
        first.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_ends_a_serving_process_gracefully(config: Path, tmp_path: Path, workers: str) -> None:
    # A SIGTERM from outside (systemd, Kubernetes) shuts the server down gracefully, and it ends by that
    # signal (``serve`` handles SIGTERM itself, to tell it from a stop the claim's watch asks for), with
    # one worker or several alike.
    server = MeterlineServer(config, tmp_path, "term", ("--workers", workers))
    server.start()
    assert server.proc is not None
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == -signal.SIGTERM, server.log()
        assert "Application shutdown complete" in server.log()
    finally:
        server.kill()


def test_workers_whose_claim_a_process_of_another_kind_took_meanwhile_stop(
    pg_config: tuple[Path, str], tmp_path: Path
) -> None:
    # Workers keeping their counters in the database lose the claim's session, and a process keeping its
    # counters in Redis starts meanwhile (it finds no one of the database's kind). Taking their own
    # locks again would succeed, but the two kinds would then serve together, neither seeing the other's
    # reservations: the workers stop instead.
    config, conninfo = pg_config
    workers = MeterlineServer(config, tmp_path, "workers", ("--workers", "2"))
    workers.start()
    try:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            _end_claim_session(admin)
            admin.execute("SELECT pg_advisory_lock_shared(%s)", (claim_key("redis"),))  # as it claims
            assert workers.proc is not None
            code = workers.proc.wait(timeout=60)
        assert code == 1, workers.log()
        said = " ".join(workers.log().split())
        assert "another process took this database's counters claim" in said
        assert "Traceback" not in workers.log()
    finally:
        workers.kill()


class _HalfDeadProxy:
    """A TCP proxy in front of PostgreSQL that can drop its clients' side of every connection while
    keeping the server's side open: what a client sees of a network failure the server has not noticed
    (its session, and the locks it holds, live on)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._clients: list[socket.socket] = []
        self._servers: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            self._clients.append(client)
            self._servers.append(server)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # one side cut: the other is left as it is

    def cut_clients(self) -> None:
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        self._clients.clear()

    def close(self) -> None:
        self._listener.close()
        for sock in [*self._clients, *self._servers]:
            sock.close()


def test_a_claim_whose_old_session_the_server_still_keeps_is_taken_again(
    pg_server: PostgresServer,
) -> None:
    # The process sees its session's connection fail; the server has not noticed and keeps the session,
    # with the claim's lock. That session is this process's own: it is ended and the lock taken again,
    # rather than read as another process's claim (which would stop a process nobody raced).
    name = f"claim_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    proxy = _HalfDeadProxy(pg_server.port)
    try:
        url = f"postgresql+psycopg://{pg_server.user}@127.0.0.1:{proxy.port}/{name}"
        claim = claim_counters(url, "memory")
        try:
            with psycopg.connect(pg_server.conninfo(name), autocommit=True) as admin:
                before = _claim_holders(admin)
                assert len(before) == 1
                proxy.cut_clients()
                assert claim.keep() is None  # taken again, not lost
                after = _claim_holders(admin)
                assert len(after) == 1
                assert after != before
                # ...and still exclusive: a second claimant is refused.
                with pytest.raises(MeterlineError, match="in-process counters are exact in one process only"):
                    claim_counters(pg_server.url_for(name), "memory")
        finally:
            claim.give_back()
    finally:
        proxy.close()
        pg_server.drop_database(name)


def test_a_claim_retaken_after_another_redis_claimed_meanwhile_is_lost(
    pg_config: tuple[Path, str], redis_url_clean: str, tmp_path: Path
) -> None:
    # The claim's session ends; before it is taken again, a process counting in another Redis finds no
    # one and claims. The first, taking its locks again, sees it: it must stop, not count beside it.
    config, conninfo = pg_config
    url = _database_url(config)
    other = start_redis(tmp_path)
    first_mark, second_mark = RedisMark(redis_url_clean), RedisMark(other.url)
    try:
        # As it serves (shared): the first's locks are all free to take again but for the Redis.
        _lost_after_the_gap(conninfo, claim_counters(url, "redis", first_mark), url, "redis", second_mark)
    finally:
        first_mark.close()
        second_mark.close()
        other.stop()


def test_processes_on_one_redis_taking_their_claims_again_together_keep_serving(
    pg_config: tuple[Path, str], redis_url_clean: str
) -> None:
    # PostgreSQL restarts: every serving process finds its session gone and takes its locks again at
    # the same moment, the one that made the Redis' mark among them. None may read another's retaking
    # for a process counting elsewhere, and stop.
    config, conninfo = pg_config
    url = _database_url(config)
    marks = [RedisMark(redis_url_clean) for _ in range(3)]
    claims = []
    for mark in marks:
        claim = claim_counters(url, "redis", mark)
        claim.share()
        claims.append(claim)
    try:
        for _ in range(3):
            with psycopg.connect(conninfo, autocommit=True) as admin:
                _end_claim_session(admin)
            start = threading.Barrier(len(claims))
            said: list[str | None] = []

            def keep(claim: Claim, start: threading.Barrier = start, said: list[str | None] = said) -> None:
                start.wait()
                said.append(claim.keep())

            threads = [threading.Thread(target=keep, args=(claim,)) for claim in claims]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert said == [None] * len(claims)
            with psycopg.connect(conninfo, autocommit=True) as admin:
                assert len(_claim_holders(admin)) == len(claims)
    finally:
        for claim in claims:
            claim.give_back()
        for mark in marks:
            mark.close()


def test_workers_end_with_their_supervisor_however_it_ends(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim is held by the process that started the workers. Killed outright (SIGKILL, the OOM
    # killer), it takes the claim with it: workers serving on would be unclaimed, and a process with
    # in-process counters could start beside them. They end with it instead, and a new server starts.
    # What the killed one left in the temporary directory (its workers' metrics) the next one removes:
    # restarted after every OOM kill, they would pile up.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    workers = MeterlineServer(config, tmp_path, "workers", ("--workers", "2"))
    workers.start()
    assert workers.proc is not None
    started = workers.workers()
    assert len(started) == 2
    try:
        workers.kill()
        deadline = time.monotonic() + 30
        while alive := [p for p in started if running(p)]:
            assert time.monotonic() < deadline, f"workers {alive} serve on without their supervisor"
            time.sleep(0.2)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{workers.base}/healthz", timeout=2)
        left = [d.name for d in temporary.iterdir() if d.name.startswith("meterline-metrics-")]
        assert len(left) == 1, left
        again = MeterlineServer(config, tmp_path, "again", ("--workers", "2"))
        again.start()
        try:
            now = [d.name for d in temporary.iterdir() if d.name.startswith("meterline-metrics-")]
            assert left[0] not in now
            assert len(now) == 1
        finally:
            again.stop()
        assert [d.name for d in temporary.iterdir() if d.name.startswith("meterline-metrics-")] == []
    finally:
        for pid in started:  # whatever the outcome, nothing is left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_claim_retaken_while_a_newcomer_of_its_kind_resets_is_kept(pg_config: tuple[Path, str]) -> None:
    # PostgreSQL restarts; before the serving process takes its claim again, a newcomer with the same
    # (shared) counters finds no one, claims alone and resets. The first must wait for the reset and
    # share the claim (the two count in one place), not stop as if another kind had taken it.
    config, conninfo = pg_config
    url = _database_url(config)
    first = claim_counters(url, "database")
    first.share()
    try:
        _claim_gone(conninfo)
        second = claim_counters(url, "database")
        try:
            assert second.alone  # it resets, holding the claim exclusively meanwhile
            assert first.keep() is None  # not lost: waiting for the reset
            second.share()
            assert first.keep() is None
            with psycopg.connect(conninfo, autocommit=True) as admin:
                assert len(_claim_holders(admin)) == 2  # the first holds its claim again
        finally:
            second.give_back()
    finally:
        first.give_back()


def test_a_newcomer_that_waited_out_a_long_reset_says_so(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first process to serve resets its counters and recovers what was left reserved (long, after a
    # big outage); a second one gives up waiting for it, and must say why, not blame in-process counters.
    url = _database_url(config)
    first = claim_counters(url, "database")
    try:
        assert first.alone
        monkeypatch.setattr(counter_claim, "_SHARE_WAIT_S", 0.5)
        with pytest.raises(ConfigError) as refused:
            claim_counters(url, "database")
        message = str(refused.value)
        assert "in-process counters" not in message
        assert "still resetting" in message, message
    finally:
        first.give_back()


def test_the_claims_session_asks_the_server_to_find_a_vanished_host_out(pg_config: tuple[Path, str]) -> None:
    # A host that loses power leaves its claim's session open on the server until the server's own TCP
    # keepalive gives up on it (about two hours by default): every replacement would be refused
    # meanwhile. The claim's session asks the server to probe within seconds.
    config, _conninfo = pg_config
    claim = claim_counters(_database_url(config), "memory")
    try:
        locks = claim._give_back.__self__  # the claim's PostgreSQL locks (``_AdvisoryLocks``)
        names = ["tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"]
        names.append("statement_timeout")
        asked = {name: locks._conn.execute(text(f"SHOW {name}")).scalar() for name in names}
        locks._conn.commit()
        assert asked == {
            "tcp_keepalives_idle": "5",
            "tcp_keepalives_interval": "2",
            "tcp_keepalives_count": "3",
            "statement_timeout": "5s",  # nor does the watch hang on a server that stalls
        }
    finally:
        claim.give_back()


def test_a_claim_lock_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    # The claim's lock file beside the SQLite file cannot be opened (left by another user's `sudo
    # meterline serve`, say; here a directory in its place, since the tests run as root): `serve` says
    # which file and what to do, with no traceback.
    database = tmp_path / "meterline.db"
    (tmp_path / "meterline.db.counters.lock").mkdir()
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{database}"\nadmin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
    )
    message = _refusal(config, tmp_path)
    assert f"cannot open {tmp_path / 'meterline.db.counters.lock'}" in message, message


def test_a_claim_retaken_after_its_redis_was_emptied_and_marked_anew_follows_the_mark(
    pg_config: tuple[Path, str], redis_url_clean: str
) -> None:
    # PostgreSQL and Redis (without persistence) restart together: the serving process's claim is gone
    # and so is its Redis' mark. A newcomer on the same Redis finds no one, marks the Redis anew and
    # claims. The first, taking its claim again, must follow the new mark (both count in one Redis),
    # neither stop as if the newcomer counted elsewhere nor write its old mark over the new one.
    config, conninfo = pg_config
    url = _database_url(config)
    first_mark, second_mark, third_mark = (RedisMark(redis_url_clean) for _ in range(3))
    first = claim_counters(url, "redis", first_mark)
    first.share()
    try:
        _claim_gone(conninfo)
        client = redis.Redis.from_url(redis_url_clean)
        old = client.get("meterline:store")
        client.flushall()
        new = uuid.uuid4().hex.encode()
        client.set("meterline:store", new)  # the newcomer's mark (``make``), before the first writes its own
        second = claim_counters(url, "redis", second_mark)
        try:
            assert client.get("meterline:store") == new != old
            second.share()
            time.sleep(2.5)  # the first's mark writer had its turns meanwhile
            assert client.get("meterline:store") == new  # not written over
            assert first.keep() is None  # taken again, following the new mark
            with psycopg.connect(conninfo, autocommit=True) as admin:
                assert len(_claim_holders(admin)) == 2
            third = claim_counters(url, "redis", third_mark)  # a newcomer joins both
            third.give_back()
            time.sleep(1.5)
            assert client.get("meterline:store") == new
        finally:
            second.give_back()
        client.close()
    finally:
        first.give_back()
        for mark in (first_mark, second_mark, third_mark):
            mark.close()


@pytest.mark.parametrize("newcomer", ["memory", "redis"])
def test_a_claim_retaken_while_a_newcomer_of_another_kind_holds_it_is_lost_at_once(
    pg_config: tuple[Path, str], redis_url_clean: str, newcomer: str
) -> None:
    # In the claim's gap a newcomer with in-process counters, or with its counters in Redis beside this
    # one's in the database, claims (the latter alone, resetting). The first must stop at its first look,
    # not wait for a reset that makes the two serve together.
    config, conninfo = pg_config
    url = _database_url(config)
    mark = RedisMark(redis_url_clean) if newcomer == "redis" else None
    try:
        # Not shared: the one in Redis is still resetting, alone.
        _lost_after_the_gap(conninfo, claim_counters(url, "database"), url, newcomer, mark, share=False)
    finally:
        if mark is not None:
            mark.close()
