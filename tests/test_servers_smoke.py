"""Smoke tests for the throw-away PostgreSQL / Redis servers in tests/servers.py."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

try:
    from tests.servers import free_port, start_postgres, start_redis
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from servers import free_port, start_postgres, start_redis  # type: ignore[no-redef]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.postgres
def test_postgres_server_lifecycle() -> None:
    server = start_postgres()
    base_dir = server.base_dir
    try:
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/meterline_test"
        with psycopg.connect(server.conninfo("meterline_test")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.execute("show fsync").fetchone() == ("off",)

        url = server.create_database("second_db")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/second_db"
        with psycopg.connect(server.conninfo("second_db")) as conn:
            assert conn.execute("select current_database()").fetchone() == ("second_db",)
    finally:
        server.stop()

    assert not _accepts(server.port)
    assert base_dir is not None
    assert not Path(base_dir).exists()
    server.stop()  # idempotent


def test_redis_server_lifecycle() -> None:
    server = start_redis()
    base_dir = server.base_dir
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert _ping(server.port).startswith(b"+PONG")
    finally:
        server.stop()

    assert not _accepts(server.port)
    assert base_dir is not None
    assert not Path(base_dir).exists()
    server.stop()  # idempotent
