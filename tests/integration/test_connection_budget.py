"""``meterline serve`` on PostgreSQL warns when its workers could need more connections than the server has
free: each worker opens up to ``database_pool_size + database_max_overflow`` while it is busiest, and past
``max_connections`` PostgreSQL refuses new ones ("too many clients already"), so requests fail with 503s
under load. Four workers at the old fixed 20 + 40 each could reach 240 against PostgreSQL's default 100.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx

from servers import MeterlineServer as Server
from servers import PostgresServer

ADMIN_KEY = "ml_admin_budget_0123456789abcdef"


def serve(pg: PostgresServer, tmp_path: Path, extra: str, workers: int) -> tuple[str, int]:
    """Start and stop ``serve --workers N``: what it printed, and how /healthz answered meanwhile."""
    url = pg.create_database(f"budget_{secrets.token_hex(4)}")
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'admin_key = "{ADMIN_KEY}"\ndatabase_url = "{url}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n{extra}'
    )
    server = Server(config, tmp_path, f"budget-{secrets.token_hex(2)}", ("--workers", str(workers)))
    server.start()
    try:
        status = httpx.get(f"{server.base}/healthz", timeout=10).status_code
    finally:
        server.stop()
    return server.log_path.read_text(errors="replace"), status


def test_workers_that_could_exhaust_postgresql_are_warned_of_and_still_served(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    # The test server allows 300 connections; two workers of 100 + 100 could open 400.
    log, status = serve(
        pg_server, tmp_path, "database_pool_size = 100\ndatabase_max_overflow = 100\n", workers=2
    )
    assert status == 200
    flat = " ".join(log.split())
    assert "warning: 2 worker(s) may open up to 401 PostgreSQL connections" in flat, log
    claim = "(database_pool_size 100 + database_max_overflow 100 each, and one for the counters' claim)"
    assert claim in flat
    assert "of max_connections 300" in flat
    assert "Lower workers, database_pool_size or database_max_overflow, or raise PostgreSQL's" in flat


def test_the_default_pool_leaves_room_and_says_nothing(pg_server: PostgresServer, tmp_path: Path) -> None:
    log, status = serve(pg_server, tmp_path, "", workers=2)
    assert status == 200
    assert "PostgreSQL connections" not in log, log
