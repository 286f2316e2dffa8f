"""Throw-away PostgreSQL and Redis servers for the test session.

Both servers listen on loopback only, on a free TCP port, with all their
files in a fresh temporary directory that is removed again by ``stop()``.
An ``atexit`` hook stops every server that is still running when the
interpreter exits, so nothing is left behind even if a test session forgets
to stop one (or dies with an exception / Ctrl-C).

PostgreSQL refuses to run as root: when this process is root, ``initdb`` and
``pg_ctl`` are run as the ``postgres`` system user via ``runuser`` and the
server directory is handed over to that user.

Usage::

    pg = start_postgres()
    try:
        engine = create_engine(pg.url)           # postgresql+psycopg://...
        other_url = pg.create_database("other")
    finally:
        pg.stop()

    redis = start_redis()
    ...
    redis.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "free_port",
    "start_postgres",
    "start_redis",
    "start_redis_cluster",
]

HOST = "127.0.0.1"
PG_USER = "postgres"
PG_DEFAULT_DB = "meterline_test"
PG_SYSTEM_USER = "postgres"

STARTUP_TIMEOUT = 30.0
_PORT_ATTEMPTS = 3
_ADDR_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
# sun_path is 108 bytes on Linux; PostgreSQL appends "/.s.PGSQL.NNNNN" (15 chars) + NUL.
_MAX_SOCKET_DIR_LEN = 90


# --------------------------------------------------------------------------- helpers


def _port_share() -> tuple[int, int]:
    """(this test process's number, how many there are) under pytest-xdist (``make test`` runs two);
    (0, 1) alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2:
        return 0, 1
    return int(worker[2:]) % count, count


# Test servers listen below Linux's ephemeral ports (32768-60999 by default), which connect() and
# bind(0) draw from: a port picked here is not taken meanwhile by a client connection or by a server
# asking the kernel for any port. Each test process of a parallel run has its own part of the range, so
# a port one of them picked and binds a moment later is never picked by the other.
_PORTS = (10_000, 32_000)
_PICK = random.SystemRandom()  # not the module's generator, which Hypothesis seeds for its tests


def free_port(taken: set[int] | None = None) -> int:
    """Return a TCP port on 127.0.0.1 that is free right now, and not in ``taken`` (ports handed out for
    servers not yet listening). Adds it to ``taken``."""
    index, count = _port_share()
    span = (_PORTS[1] - _PORTS[0]) // count
    low = _PORTS[0] + index * span
    while True:
        port = _PICK.randrange(low, low + span)
        if taken is not None and port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


def _clean_env() -> dict[str, str]:
    """Environment for server processes: no stray PG* settings, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _make_temp_dir(prefix: str, base_dir: Path | None) -> Path:
    parent = Path(base_dir) if base_dir is not None else Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def _rmtree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _traversable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` can reach (search) ``path`` and every ancestor of it."""
    gids = {user.pw_gid} | set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in gids:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- PostgreSQL


def _find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl."""
    candidates: list[tuple[tuple[int, ...], Path]] = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for version_dir in root.iterdir():
            bin_dir = version_dir / "bin"
            if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
                try:
                    version = tuple(int(p) for p in version_dir.name.split("."))
                except ValueError:
                    continue
                candidates.append((version, bin_dir))
    if candidates:
        return max(candidates)[1]
    # Not a Debian layout: fall back to whatever is on PATH.
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: no /usr/lib/postgresql/*/bin/{initdb,pg_ctl} "
        "and no initdb/pg_ctl on PATH. Install the 'postgresql' package (e.g. apt-get install postgresql)."
    )


@dataclass
class PostgresServer:
    """A running throw-away PostgreSQL server (trust auth, loopback only)."""

    url: str
    port: int
    user: str = PG_USER
    host: str = HOST
    base_dir: Path | None = field(default=None, repr=False)
    _pg_bin: Path | None = field(default=None, repr=False)
    _data_dir: Path | None = field(default=None, repr=False)
    _extra_dirs: list[Path] = field(default_factory=list, repr=False)
    _run_as: str | None = field(default=None, repr=False)
    _running: bool = field(default=False, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _start_args: list[str] = field(default_factory=list, repr=False)

    # -- URLs ---------------------------------------------------------------

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL of database ``dbname`` on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str = PG_DEFAULT_DB) -> str:
        """libpq connection string (for ``psycopg.connect``) of ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    @property
    def log_file(self) -> Path | None:
        return self.base_dir / "postgres.log" if self.base_dir is not None else None

    # -- databases ----------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` (terminating its connections)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- lifecycle ----------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self._run_as is not None:
            return ["runuser", "-u", self._run_as, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(*args),
            cwd=self.base_dir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pause(self) -> None:
        """Stop the server as an outage would (fast shutdown: connections cut), keeping its data."""
        assert self._pg_bin is not None
        assert self._data_dir is not None
        result = self._run(
            str(self._pg_bin / "pg_ctl"), "stop", "-D", str(self._data_dir), "-m", "fast", "-w"
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {result.stdout}\n{result.stderr}")
        self._running = False

    def resume(self) -> None:
        """Start the server again after ``pause``, on the same port."""
        result = self._run(*self._start_args, timeout=STARTUP_TIMEOUT + 15)
        self._running = True
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}\n{result.stderr}")
        _wait_pg_ready(self, time.monotonic() + STARTUP_TIMEOUT)

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its files. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            if self._running and self._pg_bin is not None and self._data_dir is not None:
                result = self._run(
                    str(self._pg_bin / "pg_ctl"), "stop", "-D", str(self._data_dir),
                    "-m", "immediate", "-w", "-t", "30",
                )  # fmt: skip
                self._running = False
                if result.returncode != 0:
                    self._kill_postmaster()
        finally:
            for path in self._extra_dirs:
                _rmtree(path)
            _rmtree(self.base_dir)

    def _kill_postmaster(self) -> None:
        """Last resort if pg_ctl stop failed: SIGKILL the postmaster from postmaster.pid."""
        if self._data_dir is None:
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self._data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 9)


def _pg_system_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as when we are root (None when not root)."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise RuntimeError("running as root but 'runuser' is not available to drop to the postgres user")
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no '{PG_SYSTEM_USER}' system user to run PostgreSQL as "
            "(PostgreSQL refuses to run as root); install the 'postgresql' package or run as non-root"
        ) from None


def _wait_pg_ready(server: PostgresServer, deadline: float) -> None:
    import psycopg

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(server.conninfo("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last_error = exc
            time.sleep(0.05)
    log = server.log_file
    raise RuntimeError(
        f"PostgreSQL on port {server.port} did not accept connections within {STARTUP_TIMEOUT:.0f}s "
        f"(last error: {last_error}).\nLog tail ({log}):\n{_tail(log) if log else '<no log>'}"
    )


def start_postgres(base_dir: Path | None = None) -> PostgresServer:
    """Initialise and start a fresh PostgreSQL cluster on a free loopback port.

    The cluster uses trust authentication for user ``postgres``, has durability
    switched off for speed, and contains an empty ``meterline_test`` database,
    whose URL is ``server.url``. Files live in a new directory under
    ``base_dir`` (default ``/tmp``); when running as root and ``base_dir`` is
    not reachable by the postgres user, ``/tmp`` is used instead.
    """
    pg_bin = _find_pg_bin()
    run_as = _pg_system_user()

    if base_dir is not None:
        Path(base_dir).mkdir(parents=True, exist_ok=True)
        if run_as is not None and not _traversable_by(Path(base_dir).resolve(), run_as):
            base_dir = None  # e.g. pytest's 0700 tmp dirs: the postgres user could not reach them
    root = _make_temp_dir("meterline-pg-", base_dir)
    server = PostgresServer(
        url="",
        port=0,
        base_dir=root,
        _pg_bin=pg_bin,
        _data_dir=root / "data",
        _run_as=run_as.pw_name if run_as is not None else None,
    )
    atexit.register(server.stop)
    try:
        sock_dir = root / "sock"
        if len(str(sock_dir)) > _MAX_SOCKET_DIR_LEN:
            sock_dir = _make_temp_dir("meterline-pgsock-", None)
            server._extra_dirs.append(sock_dir)
        else:
            sock_dir.mkdir(mode=0o755)
        if run_as is not None:
            for path in (root, sock_dir):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)

        data_dir = root / "data"
        result = server._run(
            str(pg_bin / "initdb"), "-D", str(data_dir), "--auth=trust", "-U", PG_USER,
            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")

        log_file = root / "postgres.log"
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            options = (
                f"-p {port} -k {sock_dir} -c listen_addresses={HOST} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
            )
            server._start_args = [
                str(pg_bin / "pg_ctl"), "start", "-D", str(data_dir), "-l", str(log_file),
                "-o", options, "-w", "-t", str(int(STARTUP_TIMEOUT)),
            ]  # fmt: skip
            result = server._run(*server._start_args, timeout=STARTUP_TIMEOUT + 15)
            # Even a failed start may have left a postmaster behind (e.g. pg_ctl timeout).
            server._running = True
            if result.returncode == 0:
                break
            log_text = _tail(log_file)
            if attempt + 1 < _PORT_ATTEMPTS and _ADDR_IN_USE.search(log_text):
                server._running = False
                continue  # lost the race for the port: try another one
            raise RuntimeError(
                f"pg_ctl start failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                f"Log tail ({log_file}):\n{log_text}"
            )

        server.port = port
        server.url = server.url_for(PG_DEFAULT_DB)
        _wait_pg_ready(server, time.monotonic() + STARTUP_TIMEOUT)
        server.create_database(PG_DEFAULT_DB)
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------- Redis


def _find_redis() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server not found on PATH. "
            "Install the 'redis-server' package (e.g. apt-get install redis-server)."
        )
    return path


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith((b"+PONG", b"-NOAUTH"))  # up (a password is asked for later)
    except OSError:
        return False


@dataclass
class RedisServer:
    """A running throw-away Redis server (no persistence, loopback only)."""

    url: str
    port: int
    base_dir: Path | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def log_file(self) -> Path | None:
        return self.base_dir / "redis.log" if self.base_dir is not None else None

    def stop(self) -> None:
        """Terminate the server, wait for it, and delete its files. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            proc = self._process
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            _rmtree(self.base_dir)


def start_redis(base_dir: Path | None = None, args: Sequence[str] = ()) -> RedisServer:
    """Start a fresh ``redis-server`` (no persistence) on a free loopback port; ``args`` are more of its
    options (``--loadmodule PATH``)."""
    redis_bin = _find_redis()
    root = _make_temp_dir("meterline-redis-", base_dir)
    server = RedisServer(url="", port=0, base_dir=root)
    atexit.register(server.stop)
    log_file = root / "redis.log"
    try:
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            with log_file.open("ab") as log:
                server._process = subprocess.Popen(
                    [
                        redis_bin, "--port", str(port), "--bind", HOST, "--save", "",
                        "--appendonly", "no", "--daemonize", "no", "--dir", str(root), *args,
                    ],
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + STARTUP_TIMEOUT
            proc = server._process
            while time.monotonic() < deadline:
                if _redis_ping(port):
                    server.port = port
                    server.url = f"redis://{HOST}:{port}/0"
                    return server
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            log_text = _tail(log_file)
            if proc.returncode != 0 and attempt + 1 < _PORT_ATTEMPTS and _ADDR_IN_USE.search(log_text):
                continue  # lost the race for the port: try another one
            raise RuntimeError(
                f"redis-server on port {port} did not answer PING within {STARTUP_TIMEOUT:.0f}s "
                f"(exit code {proc.returncode}).\nLog tail ({log_file}):\n{log_text}"
            )
        raise AssertionError("unreachable")  # pragma: no cover
    except BaseException:
        server.stop()
        raise


@dataclass
class RedisCluster:
    """A running throw-away Redis Cluster: masters with one replica each, loopback, no persistence.

    ``url`` is what Meterline takes (``redis+cluster://`` with every node as a seed)."""

    url: str
    ports: list[int]
    base_dir: Path | None = field(default=None, repr=False)
    password: str = field(default="", repr=False)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def command(self, port: int, *args: str) -> str:
        """One command to one node, through redis-cli (its reply as text)."""
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        command = [_redis_cli(), "-h", HOST, "-p", str(port), *auth, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        return done.stdout

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now."""
        slot = int(self.command(self.live_ports()[0], "CLUSTER", "KEYSLOT", key).strip())
        for line in self.command(self.live_ports()[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if span[0].isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no master serves slot {slot}")

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.processes.items() if proc.poll() is None]

    def master_ports(self) -> list[int]:
        """The ports of the live masters."""
        found = []
        for line in self.command(self.live_ports()[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                found.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(found)

    def move(self, key: str, to_port: int) -> None:
        """Move ``key``'s slot, and the keys in it, to the master on ``to_port`` (as resharding does:
        IMPORTING and MIGRATING, MIGRATE, then SETSLOT ... NODE on every master). A client whose slot map
        is older is answered MOVED by the old master."""
        slot = self.command(self.live_ports()[0], "CLUSTER", "KEYSLOT", key).strip()
        source = self.master_of(key)
        source_id = self.command(source, "CLUSTER", "MYID").strip()
        target_id = self.command(to_port, "CLUSTER", "MYID").strip()
        auth = ["AUTH", self.password] if self.password else []
        self.command(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        try:
            deadline = time.monotonic() + 30
            while keys := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, "100").split():
                answer = self.command(
                    source, "MIGRATE", HOST, str(to_port), "", "0", "5000", *auth, "KEYS", *keys
                )
                if time.monotonic() > deadline:
                    raise AssertionError(f"slot {slot} did not move: MIGRATE answered {answer!r}")
        except BaseException:
            for port in (to_port, source):  # the slot stays where it was, as before the move
                self.command(port, "CLUSTER", "SETSLOT", slot, "STABLE")
            raise
        # The new owner first, then the old one, then the rest (as redis-cli --cluster reshard does).
        others = [port for port in self.master_ports() if port not in (to_port, source)]
        for port in (to_port, source, *others):
            self.command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def kill(self, port: int) -> None:
        """``kill -9`` one node."""
        proc = self.processes[port]
        proc.kill()
        proc.wait(timeout=10)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every slot is served by a live master (after
        a kill: once the dead master's replica has taken over)."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_ports()
            states = [self.command(port, "CLUSTER", "INFO") for port in live]
            serving = {
                int(fields[1].split("@")[0].rsplit(":", 1)[1])
                for port in live
                for fields in map(str.split, self.command(port, "CLUSTER", "NODES").splitlines())
                if "master" in fields[2] and len(fields) > 8
            }
            if all("cluster_state:ok" in state for state in states) and serving <= set(live):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not become ok: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            for proc in self.processes.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            _rmtree(self.base_dir)


def _redis_cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli not found on PATH (Debian's redis-tools, installed with redis-server)")
    return path


def start_redis_cluster(
    masters: int = 3, base_dir: Path | None = None, password: str | None = None, args: Sequence[str] = ()
) -> RedisCluster:
    """Start ``2 * masters`` nodes (``--cluster-enabled yes``) and join them with ``redis-cli --cluster
    create`` (one replica per master). Fails over a dead master after a second (``cluster-node-timeout``).
    With ``password``, every node asks for it (``requirepass``; replicas give it to their masters)."""
    redis_bin = _find_redis()
    root = _make_temp_dir("meterline-redis-cluster-", base_dir)
    cluster = RedisCluster(url="", ports=[], base_dir=root, password=password or "")
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    cli_auth = ["-a", password, "--no-auth-warning"] if password else []
    atexit.register(cluster.stop)
    taken: set[int] = set()  # client and bus ports of nodes not listening yet
    try:
        for _ in range(masters * 2):
            port = free_port(taken)
            node_dir = root / str(port)
            node_dir.mkdir()
            log = (node_dir / "redis.log").open("ab")
            cluster.processes[port] = subprocess.Popen(
                [
                    redis_bin, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                    "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "1000", "--dir", str(node_dir),
                    "--cluster-port", str(free_port(taken)),  # else port + 10000, which may not exist
                    *auth, *args,
                ],
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
            cluster.ports.append(port)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for port in cluster.ports:
            while not _redis_ping(port):
                if cluster.processes[port].poll() is not None or time.monotonic() > deadline:
                    log_text = _tail(root / str(port) / "redis.log")
                    raise RuntimeError(f"cluster node {port} did not start:\n{log_text}")
                time.sleep(0.02)
        created = subprocess.run(
            [
                _redis_cli(), *cli_auth, "--cluster", "create", *[f"{HOST}:{port}" for port in cluster.ports],
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        cluster.wait_ok(STARTUP_TIMEOUT)
        # Every replica in sync with its master, so that a failover finds a complete copy.
        while True:
            roles = [cluster.command(port, "INFO", "replication") for port in cluster.ports]
            if (
                all("master_link_status:up" in r for r in roles if "role:slave" in r)
                and sum("role:slave" in r for r in roles) == masters
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster's replicas did not sync: {roles}")
            time.sleep(0.1)
        credentials = f":{quote(password, safe='')}@" if password else ""
        cluster.url = f"redis+cluster://{credentials}" + ",".join(f"{HOST}:{port}" for port in cluster.ports)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def listening(port: int) -> int:
    """Sockets listening on ``port`` (``/proc/net/tcp``): one per worker of ``serve --workers N`` with
    ``SO_REUSEPORT``. Told apart by inode: the table is read in pieces while the kernel changes it, and
    a line can come twice."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                found.add(fields[9])
    return len(found)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs: any of its threads but a zombie. Killed, a process's first thread is a
    zombie (``Z`` in ``/proc/PID/stat``) while its other threads still end, and the last of them to end
    closes its files: a worker's listening socket takes new connections until then (and resets them)."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for thread in threads:
        try:
            if (thread / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (``/proc``): a supervisor's workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                found.append(int(entry.name))
    return found


def _workers(pid: int) -> list[int]:
    """The workers of the supervisor ``pid``: its children started by multiprocessing's spawn (not its
    resource tracker, which has no socket). A child may end between the listing and the look at its
    command line (the supervisor replacing a worker, the tracker's helpers): it is no worker then."""
    found = []
    for child in children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(child)
    return found


# -- Meterline itself ---------------------------------------------------------------------------------
METERLINE = str(Path(sys.executable).with_name("meterline"))


class MeterlineServer:
    """One `meterline serve --config FILE --port N [ARGS]` process."""

    def __init__(self, config: Path, cwd: Path, name: str, args: Sequence[str] = ()) -> None:
        self.config, self.cwd, self.name, self.args = config, cwd, name, tuple(args)
        self.log_path = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""

    def start(self, timeout: float = 60) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [METERLINE, "serve", "--config", str(self.config), "--port", str(port), *self.args],
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self.base
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.name} did not come up:\n{self.log()}"
            time.sleep(0.05)

    def workers(self) -> list[int]:
        """The pids of a ``--workers N`` server's workers (none before it started)."""
        return [] if self.proc is None else _workers(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, open transactions die with the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-60:])
        except OSError:
            return "<no log>"


class ThreadServer:
    """An ASGI app served by uvicorn on a loopback port from a thread of the test process: a real HTTP
    server (real sockets, streaming, disconnects) whose services the test can still look at directly."""

    def __init__(self, app: object) -> None:
        import threading

        import uvicorn

        from meterline.cli.main import KEEP_ALIVE_S

        self.port = free_port()
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host=HOST,
            port=self.port,
            log_level="warning",
            timeout_keep_alive=KEEP_ALIVE_S,  # as `meterline serve`
            lifespan="on",
            loop="uvloop",
            http="httptools",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="meterline-test-server", daemon=True)
        self.base = f"http://{HOST}:{self.port}"

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            assert self._thread.is_alive(), "the test server thread died at start-up"
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


# -- talking to a running server ----------------------------------------------------------------------
def make_tenant_over_http(base: str, admin: dict[str, str], *, plan: str, name: str) -> dict[str, str]:
    """An organization (on ``plan``), a workspace and a key, through the admin API; the key's headers."""
    with httpx.Client(base_url=base, headers=admin, timeout=30) as client:
        org = client.post("/v1/admin/organizations", json={"name": name, "plan": plan})
        assert org.status_code == 201, org.text
        ws = client.post("/v1/admin/workspaces", json={"organization_id": org.json()["id"], "name": "Main"})
        assert ws.status_code == 201, ws.text
        key = client.post("/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "K"})
        assert key.status_code == 201, key.text
    return {"Authorization": f"Bearer {key.json()['key']}"}


def all_ledger_rows(base: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Every row of ``GET /v1/usage/ledger``, page by page."""
    rows: list[dict[str, Any]] = []
    while True:
        page = httpx.get(
            f"{base}/v1/usage/ledger",
            params={"limit": 1000, "offset": len(rows)},
            headers=headers,
            timeout=60,
        )
        assert page.status_code == 200, page.text
        rows += page.json()["data"]
        if len(rows) >= page.json()["total_count"]:
            return rows
