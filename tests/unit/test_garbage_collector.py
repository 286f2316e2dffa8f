"""A serving process keeps what start-up built out of the garbage collector's walks (``gc.freeze``) and
collects its youngest generation less often, and gives both back when the application stops
(``api/garbage_collector.py``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from meterline.api import garbage_collector
from meterline.api.app import create_app
from meterline.config import Settings, load_settings


@pytest.fixture(autouse=True)
def nothing_left_frozen() -> Iterator[None]:
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    yield
    # A failed test must not leave this process's objects out of the collector's reach.
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def settings_in(tmp_path: Path) -> Settings:
    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'meterline.db'}",
        admin_key="admin-key-for-the-startup-heap-test",
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
