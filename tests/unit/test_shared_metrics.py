"""``/metrics`` with several workers (``gateway/metrics.py``): a scrape sums what every worker kept in the
shared directory; a worker that is gone keeps its counts but no longer its in-flight reservations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meterline.gateway.metrics import SHARED_DIR, Metrics

WORKER = """
from meterline.gateway.metrics import Metrics
m = Metrics()
m.requests.labels("/v1/chat/completions", "200").inc({served})
m.in_flight.inc({in_flight})
"""


def _worker(shared: Path, served: int, in_flight: int) -> None:
    """A worker process that counts, then dies (a crash: nothing of it is cleaned up)."""
    code = WORKER.format(served=served, in_flight=in_flight) + "import os; os._exit(0)\n"
    env = {**os.environ, SHARED_DIR: str(shared)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def _value(text: str, line_start: str) -> float:
    """The sample's value; 0 when no worker left one."""
    lines = [ln for ln in text.splitlines() if ln.startswith(line_start + " ")]
    assert len(lines) <= 1, lines
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_a_scrape_sums_every_worker_and_forgets_a_dead_ones_reservations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker(tmp_path, served=3, in_flight=2)
    _worker(tmp_path, served=4, in_flight=5)
    monkeypatch.setenv(SHARED_DIR, str(tmp_path))
    metrics = Metrics()
    metrics.quarantined.set_function(lambda: 1.0)

    text = metrics.render().decode()

    chats = 'meterline_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert _value(text, chats) == 7.0
    assert _value(text, "meterline_reservations_in_flight") == 0.0  # both workers are gone
    assert _value(text, "meterline_quarantined_entries") == 1.0
    assert not list(tmp_path.glob("gauge_live*"))
