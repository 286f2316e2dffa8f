"""``meterline serve --workers 2``: connections that arrive at once are spread over the workers.

With one listening socket shared by every worker, whichever worker woke first accepted a whole burst:
64 keep-alive clients connecting together often all landed on one worker while the other idled, and two
workers served no more than one. Each worker now listens on a socket of its own (``SO_REUSEPORT``),
and the kernel spreads connections over them."""

from __future__ import annotations

import os
import pickle
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


def sockets_on(pid: int, port: int, state: str) -> int:
    """Sockets on local ``port`` in ``state`` (``/proc/net/tcp``: 01 established, 0A listening) that
    process ``pid`` holds (by their inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


def test_connections_that_arrive_together_are_spread_over_the_workers(tmp_path: Path) -> None:
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "meterline.db"}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
    )
    server = Server(config, tmp_path, "workers", ("--workers", "2"))
    server.start()
    opened: list[socket.socket] = []
    try:
        port = int(server.base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        # Both workers listening (a worker binds its socket as it starts and listens once its app is up).
        while sum(sockets_on(pid, port, "0A") for pid in server.workers()) < 2:
            assert time.monotonic() < deadline, "two workers did not start listening"
            time.sleep(0.1)

        def connect(_: int) -> socket.socket:
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: meterline\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 200"), "a connection was not served"
            return conn

        with ThreadPoolExecutor(max_workers=CONNECTIONS) as pool:
            opened = list(pool.map(connect, range(CONNECTIONS)))
        held = {pid: sockets_on(pid, port, "01") for pid in server.workers()}
        assert sum(held.values()) == CONNECTIONS, held
        # Spread by a hash of each connection's address: a quarter or more each (a worker getting fewer
        # than 16 of 64 happens once in ~20,000 runs); one shared socket often gave one worker all 64.
        assert min(held.values()) >= CONNECTIONS // 4, held
        assert "a socket each" in server.log()
        # Idle kept-alive connections stay open in every worker as in one process (`serve`'s 75 s, not
        # uvicorn's 5 s): a load balancer sends its next request on a connection idle that long.
        time.sleep(6)
        assert sum(sockets_on(pid, port, "01") for pid in server.workers()) == CONNECTIONS
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
