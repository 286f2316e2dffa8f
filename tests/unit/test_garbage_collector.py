"""A serving process keeps what start-up built out of the garbage collector's walks (``gc.freeze``) and
collects its youngest generation less often, and gives both back when the application stops
(``api/garbage_collector.py``)."""

from __future__ import annotations

import gc
import json
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

import meterline.api.app
import meterline.api.worker
from meterline.api import garbage_collector
from meterline.api.app import create_app
from meterline.api.worker import WORKER_ARGS, application
from meterline.cli.main import _serve_one
from meterline.config import Settings, load_settings


@pytest.fixture(autouse=True)
def nothing_left_frozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    monkeypatch.setattr(garbage_collector, "_before", None)
    yield
    # A failed test must not leave this process's objects out of the collector's reach.
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.fixture(autouse=True)
def access_log_given_back() -> Iterator[None]:
    # Serving configures the process's access log (off, or to stderr, and not propagated): later tests in
    # this process read its lines through the root logger (pytest's caplog).
    log = logging.getLogger("meterline.access")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    log.handlers[:] = handlers
    log.propagate = propagate
    log.setLevel(level)  # and forgets what it cached


def settings_in(tmp_path: Path) -> Settings:
    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'meterline.db'}",
        admin_key="admin-key-for-the-garbage-collector-test",
        signing_key_file=str(tmp_path / "signing-key.json"),
    )


def oldest_generation_holds(thing: object) -> bool:
    return any(o is thing for o in gc.get_objects(generation=2))


def test_a_served_application_freezes_what_start_up_built_and_thaws_it_when_it_stops(
    tmp_path: Path,
) -> None:
    thresholds = gc.get_threshold()
    app = create_app(settings_in(tmp_path), tune_collector=True)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        # Start-up's objects (the application's services among them) are out of every generation.
        assert gc.get_freeze_count() > 10_000
        services = app.state.services
        assert not oldest_generation_holds(services)
        assert gc.get_threshold() == (garbage_collector.YOUNG_THRESHOLD, *thresholds[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
    gc.collect()
    assert oldest_generation_holds(services)


def test_an_application_made_without_it_freezes_nothing(tmp_path: Path) -> None:
    app = create_app(settings_in(tmp_path))
    thresholds = gc.get_threshold()
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_a_cycle_start_up_left_behind_is_collected_not_frozen() -> None:
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    watch = weakref.ref(first)
    del first, second
    gc.disable()  # the cycle stays until a collection finds it, not the next allocation's
    try:
        assert garbage_collector.tune() > 0
        gc.collect()
        assert watch() is None  # frozen, it could never have been collected
    finally:
        gc.enable()
        garbage_collector.restore()


class _Recorder:
    """Stands in for ``create_app``: what it was asked for."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def __call__(self, settings: Settings, **options: Any) -> object:
        self.options = options
        return object()


def test_serve_in_one_process_tunes_the_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Recorder()
    monkeypatch.setattr(meterline.api.app, "create_app", made)
    monkeypatch.setattr(uvicorn, "run", lambda application, **options: None)
    _serve_one(settings_in(tmp_path), None)
    assert made.options.get("tune_collector") is True


def test_each_worker_of_serve_tunes_the_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Recorder()
    monkeypatch.setattr(meterline.api.app, "create_app", made)
    monkeypatch.setenv("METERLINE_ADMIN_KEY", "admin-key-for-the-garbage-collector-test")
    monkeypatch.setenv("METERLINE_SIGNING_KEY_FILE", str(tmp_path / "signing-key.json"))
    monkeypatch.setenv("METERLINE_ACCESS_LOG", "off")
    database_url = f"sqlite:///{tmp_path / 'meterline.db'}"
    arguments = {
        "config": None,
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 8080,
        "workers": 2,
        "supervisor": 4242,
    }
    monkeypatch.setenv(WORKER_ARGS, json.dumps(arguments))
    # A worker's tie to its supervisor (``end_with``) is the process's own: not made in the test runner.
    tied: list[int] = []
    monkeypatch.setattr(meterline.api.worker, "end_with", tied.append)
    application()
    assert made.options.get("tune_collector") is True
    assert tied == [4242]
