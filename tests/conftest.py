"""Shared fixtures: real SQLite files and a real throwaway PostgreSQL server, a frozen clock, the app.

``backend`` parametrizes a test over both stores. The schema is migrated once per session per backend;
each test then starts from empty tables (a copied SQLite file; TRUNCATE on PostgreSQL).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent))

from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import Settings, load_settings
from meterline.services import Services, build_services
from meterline.storage.database import Database
from meterline.storage.migrate import upgrade
from meterline.storage.tables import metadata
from servers import (
    METERLINE,
    PostgresServer,
    RedisCluster,
    RedisServer,
    start_postgres,
    start_redis,
    start_redis_cluster,
)

ADMIN_KEY = "test-admin-key-0123456789abcdef"
NOW = datetime(2026, 3, 14, 10, 30, 0, tzinfo=UTC)
BACKENDS = ["sqlite", "postgresql"]


def _postgres_available() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb") is not None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if not _postgres_available():
        if os.environ.get("METERLINE_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required (METERLINE_REQUIRE_POSTGRES) but not installed")
        pytest.skip("PostgreSQL binaries not installed")
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()
    return path


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    url = pg_server.create_database("meterline_contract")
    db = Database(url)
    upgrade(db)
    db.dispose()
    return url


def _truncate(url: str) -> None:
    db = Database(url)
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    db.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "meterline.db"
        shutil.copyfile(sqlite_template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_url")
    _truncate(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "meterline.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


def _redis_available() -> bool:
    return shutil.which("redis-server") is not None or Path("/usr/bin/redis-server").exists()


def _require_redis() -> None:
    """Skip without Debian's redis-server; fail instead where the full suite is required."""
    if not _redis_available():
        if os.environ.get("METERLINE_REQUIRE_POSTGRES"):
            pytest.fail("redis-server is required (METERLINE_REQUIRE_POSTGRES) but not installed")
        pytest.skip("redis-server not installed")


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One real redis-server for the session (the counter store of scale-out deployments)."""
    _require_redis()
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meterline's Redis module, built as a user builds it: ``meterline redis-module PATH``."""
    _require_redis()
    path = tmp_path_factory.mktemp("redis-module") / "meterline_counters.so"
    built = subprocess.run(
        [METERLINE, "redis-module", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return path


@pytest.fixture(scope="session")
def shared_redis_with_module(redis_module: Path) -> Iterator[RedisServer]:
    """A second real redis-server for the session, with Meterline's module loaded."""
    server = start_redis(args=["--loadmodule", str(redis_module)])
    yield server
    server.stop()


@pytest.fixture
def redis_module_url_clean(shared_redis_with_module: RedisServer) -> str:
    """The Redis with the module, emptied for this test."""
    return _emptied(shared_redis_with_module)


@pytest.fixture(scope="session")
def shared_redis_cluster_with_module(redis_module: Path) -> Iterator[RedisCluster]:
    """A second real Redis Cluster for the session, every node with Meterline's module loaded."""
    cluster = start_redis_cluster(args=["--loadmodule", str(redis_module)])
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_module_url_clean(shared_redis_cluster_with_module: RedisCluster) -> str:
    """The cluster with the module, emptied for this test."""
    return _emptied_cluster(shared_redis_cluster_with_module)


@pytest.fixture
def redis_cluster_own_with_module(redis_module: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own, every node with Meterline's module loaded."""
    cluster = start_redis_cluster(password="s3cr{e}t@:/pw%", args=["--loadmodule", str(redis_module)])
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_own() -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own (for one it changes for good: a password, a failover)."""
    _require_redis()
    cluster = start_redis_cluster(password="s3cr{e}t@:/pw%")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def shared_redis_cluster() -> Iterator[RedisCluster]:
    """One real Redis Cluster for the session: three masters, a replica each (Debian's redis-server)."""
    _require_redis()
    cluster = start_redis_cluster()
    yield cluster
    cluster.stop()


def _emptied_cluster(cluster: RedisCluster) -> str:
    for port in cluster.live_ports():
        cluster.command(port, "FLUSHALL")  # replicas refuse: they follow their master
    return cluster.url


def _emptied(server: RedisServer) -> str:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def redis_cluster_url_clean(shared_redis_cluster: RedisCluster) -> str:
    """The shared cluster, emptied for this test (a test that fails a master over gets its own)."""
    return _emptied_cluster(shared_redis_cluster)


@pytest.fixture
def redis_url_clean(shared_redis: RedisServer) -> str:
    """The shared Redis, emptied for this test."""
    return _emptied(shared_redis)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        database_url=database_url, admin_key=ADMIN_KEY, signing_key_file=str(tmp_path / "signing-key.json")
    )


@pytest.fixture
def services(settings: Settings, clock: FrozenClock) -> Iterator[Services]:
    built = build_services(settings, clock=clock, migrate=False)
    yield built
    built.close()


@pytest.fixture
def client(settings: Settings, services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(settings, services=services), raise_server_exceptions=False) as test_client:
        yield test_client


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Tenant:
    org: dict[str, Any]
    workspace: dict[str, Any]
    key: str
    key_info: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(
    client: TestClient, *, plan: str = "pro", name: str = "Acme", group: str | None = "eng", **org_fields: Any
) -> Tenant:
    org = client.post(
        "/v1/admin/organizations", json={"name": name, "plan": plan, **org_fields}, headers=ADMIN
    )
    assert org.status_code == 201, org.text
    ws = client.post(
        "/v1/admin/workspaces",
        json={"organization_id": org.json()["id"], "name": "Main", "group": group},
        headers=ADMIN,
    )
    assert ws.status_code == 201, ws.text
    key = client.post(
        "/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "Default"}, headers=ADMIN
    )
    assert key.status_code == 201, key.text
    return Tenant(org.json(), ws.json(), key.json()["key"], key.json())


def add_key(client: TestClient, workspace_id: str, name: str = "Second", scope: str = "workspace") -> str:
    response = client.post(
        "/v1/admin/keys", json={"workspace_id": workspace_id, "name": name, "scope": scope}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


@pytest.fixture
def tenant(client: TestClient) -> Tenant:
    return make_tenant(client)


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    """The SPEC §5 error envelope, with the request id that the response header also carries."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    error = body["error"]
    assert set(error) >= {"type", "code", "message", "param", "request_id"}
    assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return error


T = TypeVar("T")


def in_one_batch(services: Services, requests: int, send: Callable[[int], T]) -> list[T]:
    """``send(0)``, ... ``send(requests - 1)`` at once, their writes held back until all are queued: the
    writer then commits them in one batch (asserted)."""
    db = services.db
    started = threading.Event()

    def hold(_conn: object) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while db.writer.pending < requests and time.monotonic() < deadline:
            time.sleep(0.01)

    batches_before = db.writer.batches
    held = db.writer.submit(hold)
    # Running before anything else is queued: otherwise the writer may take the requests into the
    # holder's own batch.
    assert started.wait(30)
    with ThreadPoolExecutor(max_workers=requests) as pool:
        answers = list(pool.map(send, range(requests)))
    held.result(30)
    assert db.writer.batches - batches_before == 2  # the holder, then all the requests together
    return answers
