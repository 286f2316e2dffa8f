"""Two `meterline serve` processes with in-process (memory://) counters on one database: each would count
alone (a free plan's 100 daily calls admitted 200, and nothing warned). The second now refuses to start,
and says what to do; once the first has gone, however it went, a new one starts."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servers import METERLINE, MeterlineServer, PostgresServer, free_port

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


def _second_serve(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, "serve", "--config", str(config), "--port", str(free_port()), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "400"},
    )


def test_a_second_process_with_its_own_counters_refuses_to_start(config: Path, tmp_path: Path) -> None:
    first = MeterlineServer(config, tmp_path, "first")
    first.start()
    try:
        second = _second_serve(config, tmp_path)
        assert second.returncode == 1, second.stdout + second.stderr
        message = " ".join(second.stderr.split())
        assert "already serves" in message
        assert "in-process counters are exact in one process only" in message
        assert "limits would not hold across them" in message
        assert 'redis_url = "redis://host:6379/0"' in message
        assert 'counters = "database"' in message
        assert "Traceback" not in second.stderr
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
        # ...but not one keeping its counters to itself.
        alone = _second_serve(config, tmp_path)
        assert alone.returncode == 1, alone.stdout + alone.stderr
        assert "in-process counters are exact in one process only" in " ".join(alone.stderr.split())
    finally:
        workers.stop()
    single = MeterlineServer(config, tmp_path, "single")
    single.start()
    try:
        joining = _second_serve(config, tmp_path, "--workers", "2")
        assert joining.returncode == 1, joining.stdout + joining.stderr
        message = " ".join(joining.stderr.split())
        assert "with in-process counters" in message
        assert "would not see its reservations" in message
    finally:
        single.stop()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--workers", "0"), "workers must be 1 to 64"),
        (("--workers", "two"), "workers"),
    ],
)
def test_a_bad_worker_count_is_refused_with_its_name(
    config: Path, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    refused = _second_serve(config, tmp_path, *args)
    assert refused.returncode != 0
    assert said in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr


def test_in_process_counters_with_several_workers_are_refused(config: Path, tmp_path: Path) -> None:
    config.write_text(config.read_text() + 'counters = "memory"\n')
    refused = _second_serve(config, tmp_path, "--workers", "2")
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert 'counters = "memory" keeps quota counters in one process' in message
