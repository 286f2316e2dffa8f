"""``meterline serve --workers 2``: connections that arrive at once are spread over the workers.

With one listening socket shared by every worker, whichever worker woke first accepted a whole burst:
64 keep-alive clients connecting together often all landed on one worker while the other idled, and two
workers served no more than one. Each worker now listens on a socket of its own (``SO_REUSEPORT``),
and the kernel spreads connections over them."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from uvicorn.config import STARTUP_FAILURE

from servers import MeterlineServer as Server
from servers import free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads connections on Linux")

CONNECTIONS = 64


def _connections(pid: int, port: int, state: str) -> list[list[str]]:
    """The ``/proc/net/tcp`` entries (split) of the sockets on local ``port`` in ``state`` (01
    established, 0A listening) that process ``pid`` holds (by their inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                found.append(fields)
    return found


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port``."""
    return bool(_connections(pid, port, "0A"))


def peers_of(pid: int, port: int) -> set[int]:
    """The client ports of the established connections on local ``port`` that process ``pid`` serves."""
    return {int(fields[2].rsplit(":", 1)[1], 16) for fields in _connections(pid, port, "01")}


def served(pid: int, port: int, clients: set[int]) -> set[int]:
    """The connections of ``clients`` (their local ports) that process ``pid`` holds open on ``port``:
    only the test's own, whatever else may connect to the port meanwhile. A set: ``/proc/net/tcp`` is
    read in pieces while the kernel's table changes (the other test process opening and closing
    sockets), and a line can come twice (a fresh-clone run counted 77 of 64) or not at all."""
    return peers_of(pid, port) & clients


def spread(server: Server, port: int, clients: set[int]) -> dict[int, set[int]]:
    """Each worker's share of ``clients``, read again (up to five times) until every one is found: a
    read of ``/proc/net/tcp`` racing the kernel's changes can miss a line."""
    for _ in range(5):
        held = {pid: served(pid, port, clients) for pid in server.workers()}
        if set().union(*held.values()) == clients:
            break
        time.sleep(0.2)
    return held


def two_workers(tmp_path: Path) -> tuple[Server, int]:
    """``serve --workers 2`` on a SQLite file, once both workers listen (a worker binds its socket as it
    starts and listens once its app is up): the server and its port."""
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "meterline.db"}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
    )
    server = Server(config, tmp_path, "workers", ("--workers", "2"))
    server.start()
    port = int(server.base.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    # Each worker listening (not a count of lines: one can come twice in a read of /proc/net/tcp).
    while not (len(workers := server.workers()) == 2 and all(listens(pid, port) for pid in workers)):
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError("two workers did not start listening")
        time.sleep(0.1)
    return server, port


def test_connections_that_arrive_together_are_spread_over_the_workers(tmp_path: Path) -> None:
    server, port = two_workers(tmp_path)
    opened: list[socket.socket] = []
    try:

        def connect(_: int) -> socket.socket:
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            assert health(conn).startswith(b"HTTP/1.1 200"), "a connection was not served"
            return conn

        with ThreadPoolExecutor(max_workers=CONNECTIONS) as pool:
            opened = list(pool.map(connect, range(CONNECTIONS)))
        clients = {conn.getsockname()[1] for conn in opened}
        held = spread(server, port, clients)
        assert set().union(*held.values()) == clients, held
        assert sum(len(ports) for ports in held.values()) == CONNECTIONS, held  # each in one worker
        # Spread by a hash of each connection's address: a quarter or more each (a worker getting fewer
        # than 16 of 64 happens once in ~20,000 runs); one shared socket often gave one worker all 64.
        assert min(len(ports) for ports in held.values()) >= CONNECTIONS // 4, held
        assert "a socket each" in server.log()
        # Idle kept-alive connections stay open in every worker as in one process (`serve`'s 75 s, not
        # uvicorn's 5 s): a load balancer sends its next request on a connection idle that long.
        time.sleep(6)
        for conn in opened:
            answer = health(conn)
            assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for conn in opened:
            conn.close()
        server.stop()


def test_a_worker_that_cannot_bind_its_socket_exits_as_a_startup_failure(tmp_path: Path) -> None:
    """A worker binds its socket as it starts (unpickling the supervisor's socket list): if the port was
    taken since the parent looked, it exits with uvicorn's startup-failure code, which stops the
    supervisor instead of restarting the worker forever."""
    from meterline.api.worker import OwnListener

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blob = pickle.dumps(OwnListener("127.0.0.1", port))
        worker = subprocess.run(
            [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
            input=blob,
            capture_output=True,
            timeout=60,
        )
    assert worker.returncode == STARTUP_FAILURE, worker.stderr
    assert f"cannot listen on 127.0.0.1:{port}".encode() in worker.stderr

    # A free port: the worker gets a socket of its own in the port's SO_REUSEPORT group.
    free = free_port()
    (own,) = pickle.loads(pickle.dumps(OwnListener("127.0.0.1", free)))
    with own:
        assert own.getsockname() == ("127.0.0.1", free)
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def health(conn: socket.socket) -> bytes:
    """``GET /healthz`` on a kept-alive connection: the whole answer (status line to body)."""
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: meterline\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096) or b"!closed"
        if data.endswith(b"!closed"):
            return data
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        body += conn.recv(4096) or b"!closed"
        if body.endswith(b"!closed"):
            break
    return head + b"\r\n\r\n" + body


def test_a_worker_that_stands_still_for_seconds_is_waited_for_not_killed(tmp_path: Path) -> None:
    """A worker that cannot answer its supervisor for a few seconds (starved of CPU on a loaded machine,
    a long pause; here SIGSTOP for 8 s) keeps its requests: once it runs again it answers the request
    that waited on it. uvicorn's own health check killed it (SIGKILL) after 5 s, cutting that request
    and every other one in flight there, and losing what it had not yet written."""
    server, port = two_workers(tmp_path)
    opened: list[socket.socket] = []
    stopped: int | None = None
    try:
        for _ in range(16):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            opened.append(conn)
            assert health(conn).startswith(b"HTTP/1.1 200")
        workers = sorted(server.workers())
        stopped = workers[0]
        served_there = peers_of(stopped, port)
        mine = [conn for conn in opened if conn.getsockname()[1] in served_there]
        assert mine, "no connection landed on the first worker (1 run in 65,536)"

        os.kill(stopped, signal.SIGSTOP)
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(health, mine[0])  # sent while the worker stands still
            time.sleep(8)
            still_there = stopped in server.workers()
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
            stopped = None
            assert still_there, "the supervisor killed the worker that stood still"
            answer = waiting.result(timeout=30)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.endswith(b"}"), answer  # the whole body: nothing cut
        assert sorted(server.workers()) == workers
        assert "died" not in server.log()
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        for conn in opened:
            conn.close()
        server.stop()
