"""One contract suite for every counter store: ``memory`` and ``redis`` (a real throwaway redis-server).

The Redis store must behave exactly like the in-process reference, so most tests run on both, and a
randomized test replays the same operations on both and compares every answer.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from sqlalchemy import text

from meterline.errors import ConfigError
from meterline.quotas.counters import (
    CounterStore,
    CounterStoreUnavailable,
    Hold,
    Level,
    Line,
    Release,
    Seed,
    Settlement,
    Verdict,
    WindowKind,
)
from meterline.quotas.memory import MemoryCounterStore
from meterline.storage import redis_counters
from meterline.storage.counter_stores import open_counter_store
from meterline.storage.database import Database
from meterline.storage.redis_counters import RedisCounterStore
from meterline.storage.sql_counters import SqlCounterStore
from servers import RedisCluster, RedisServer, free_port

NOW_S = int(datetime(2026, 3, 14, 10, 30, tzinfo=UTC).timestamp())
NOW = NOW_S * 1_000_000
DAY_END = int(datetime(2026, 3, 15, tzinfo=UTC).timestamp())
LEASE = 30_000_000
PREFIX = "test:"


def at(seconds: float) -> int:
    """The injected clock: microseconds ``seconds`` after NOW."""
    return NOW + int(seconds * 1_000_000)


def fixed(key: str, amount: int, maximum: int, *, block: bool = True) -> Line:
    return Line(key, amount, maximum, block, "fixed", DAY_END)


def rolling(key: str, amount: int, maximum: int, *, block: bool = True) -> Line:
    return Line(key, amount, maximum, block, "rolling", 0)


def hold(hold_id: str, *lines: Line, expires_us: int = NOW + LEASE) -> Hold:
    return Hold(hold_id, lines, expires_us)


def seed_fixed(key: str, used: int = 0) -> Seed:
    return Seed(key, "fixed", DAY_END, used=used)


def seed_rolling(key: str, *buckets: tuple[int, int]) -> Seed:
    return Seed(key, "rolling", 0, buckets=buckets)


def consumed(store: CounterStore, line: Line, now_us: int = NOW) -> int | None:
    level = store.levels([line], now_us)[0]
    return None if level is None else level.consumed


# -- servers and stores ---------------------------------------------------------------------------


@pytest.fixture
def redis_url(redis_url_clean: str) -> str:
    return redis_url_clean  # the session's redis-server (conftest), emptied


def _database(request: pytest.FixtureRequest, kind: str) -> str:
    """An empty migrated database of ``kind`` for this test (the session's templates)."""
    if kind == "sqlite":
        path = request.getfixturevalue("tmp_path") / "counters.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_url")
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("TRUNCATE quota_counters, quota_seconds, quota_holds, quota_tallies"))
    db.dispose()
    return url


# The Redis kinds and the fixture of each one's URL (emptied for the test): a Redis, and a Redis Cluster,
# without and with Meterline's module (the script's calls run by the module's command).
_REDIS_URLS = {
    "redis": "redis_url",
    "redis-module": "redis_module_url_clean",
    "redis-cluster": "redis_cluster_url_clean",
    "redis-cluster-module": "redis_cluster_module_url_clean",
}


@pytest.fixture(params=["memory", *_REDIS_URLS, "sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], CounterStore]]:
    """Stores of one kind. Two Redis stores are two processes sharing one Redis, two database stores
    two processes sharing one database (each its own engine); memory has only one."""
    made: list[CounterStore] = []
    databases: list[Database] = []
    kind = request.param
    url = request.getfixturevalue(_REDIS_URLS[kind]) if kind in _REDIS_URLS else None
    db_url = _database(request, kind) if kind in ("sqlite", "postgresql") else None
    memory = MemoryCounterStore()

    def make() -> CounterStore:
        store: CounterStore
        if db_url is not None:
            databases.append(Database(db_url))
            store = SqlCounterStore(databases[-1])
        else:
            store = memory if url is None else RedisCounterStore(url, prefix=PREFIX)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    for db in databases:
        db.dispose()


@pytest.fixture
def store(make_store: Callable[[], CounterStore]) -> CounterStore:
    return make_store()


def fixed_parts(store: CounterStore, key: str) -> tuple[int, int]:
    """(used, reserved) of a fixed counter, read from the store's own representation."""
    if isinstance(store, MemoryCounterStore):
        counter = store.book.fixed[key]
        return counter.used, counter.reserved
    if isinstance(store, SqlCounterStore):
        with store._db.read() as conn:
            row = conn.execute(
                text("SELECT used, reserved FROM quota_counters WHERE kind = 'f' AND key = :key"),
                {"key": key},
            ).one()
        return int(row[0]), int(row[1])
    assert isinstance(store, RedisCounterStore)
    # Every counter of a group is in one hash: "u<end>:<key>" is used, "v<end>:<key>" reserved.
    used, reserved = store._send_command(
        "HMGET", f"{PREFIX}{{-}}counters", f"u{DAY_END}:{key}", f"v{DAY_END}:{key}"
    )
    return int(used), int(reserved)


# -- missing and seeding --------------------------------------------------------------------------


def test_missing_counters_reserve_nothing_until_seeded(store: CounterStore) -> None:
    day, rpm = fixed("org:day", 10, 100), rolling("org:rpm", 1, 5)
    assert store.reserve([hold("h1", day, rpm)], NOW) == [Verdict(admitted=False, missing=(0, 1))]
    assert store.levels([day, rpm], NOW) == [None, None]

    store.seed([seed_fixed("org:day", used=5)], NOW)
    assert store.reserve([hold("h1", day, rpm)], NOW) == [Verdict(admitted=False, missing=(1,))]
    assert store.levels([day, rpm], NOW) == [Level(5, DAY_END), None]

    store.seed([seed_rolling("org:rpm", (NOW_S - 10, 2))], NOW)
    assert store.reserve([hold("h1", day, rpm)], NOW) == [
        Verdict(admitted=True, levels=(Level(15, DAY_END), Level(3, NOW_S - 10 + 60)))
    ]


def test_a_reservation_missing_a_line_still_moves_the_window_of_the_lines_before_it(
    store: CounterStore,
) -> None:
    """As memory checks lines in order, a rolling line before the missing one leaves the minute behind
    it; a read by a clock a little behind (another process) no longer counts what left."""
    store.seed([seed_rolling("r")], NOW)
    store.reserve([hold("a", rolling("r", 5, 100))], NOW)
    verdict = store.reserve([hold("b", rolling("r", 1, 100), fixed("f", 1, 10))], at(61))[0]
    assert verdict == Verdict(admitted=False, missing=(1,))
    assert store.levels([rolling("r", 0, 1)], at(59)) == [Level(0, NOW_S + 59)]


def test_seed_does_not_overwrite(store: CounterStore) -> None:
    day, rpm = fixed("org:day", 10, 100), rolling("org:rpm", 1, 5)
    store.seed([seed_fixed("org:day", used=5), seed_rolling("org:rpm")], NOW)
    store.reserve([hold("h1", day, rpm)], NOW)
    store.seed([seed_fixed("org:day", used=90), seed_rolling("org:rpm", (NOW_S, 4))], NOW)
    assert store.levels([day, rpm], NOW) == [Level(15, DAY_END), Level(1, NOW_S + 60)]


def test_an_empty_seeded_rolling_window_is_not_missing(store: CounterStore) -> None:
    rpm = rolling("org:rpm", 1, 5)
    store.seed([seed_rolling("org:rpm", (NOW_S - 100, 3))], NOW)  # that bucket is out of the window
    assert store.levels([rpm], NOW) == [Level(0, NOW_S)]
    assert store.reserve([hold("h1", rpm)], NOW)[0].admitted


def test_fixed_and_rolling_counters_of_the_same_key_are_apart(store: CounterStore) -> None:
    store.seed([seed_fixed("k", used=7)], NOW)
    assert store.levels([fixed("k", 0, 1), rolling("k", 0, 1)], NOW) == [Level(7, DAY_END), None]


# -- decisions ------------------------------------------------------------------------------------


def test_block_refuses_exactly_at_the_maximum(store: CounterStore) -> None:
    store.seed([seed_fixed("org:day")], NOW)
    line = fixed("org:day", 1, 10)
    for i in range(10):
        assert store.reserve([hold(f"h{i}", line)], NOW)[0].admitted
    verdict = store.reserve([hold("h10", line)], NOW)[0]
    assert verdict == Verdict(
        admitted=False, refused=0, retry_after_s=DAY_END - NOW_S, levels=(Level(10, DAY_END),)
    )
    # An estimate of zero takes nothing, so a used-up meter does not stop it.
    assert store.reserve([hold("zero", fixed("org:day", 0, 10))], NOW)[0] == Verdict(
        admitted=True, levels=(Level(10, DAY_END),)
    )


def test_block_admits_up_to_the_maximum_and_not_one_more(store: CounterStore) -> None:
    store.seed([seed_fixed("org:day", used=8)], NOW)
    assert store.reserve([hold("over", fixed("org:day", 3, 10))], NOW)[0].refused == 0
    assert store.reserve([hold("fits", fixed("org:day", 2, 10))], NOW)[0].admitted
    assert consumed(store, fixed("org:day", 0, 10)) == 10


def test_refused_hold_reserves_nothing_on_any_line(store: CounterStore) -> None:
    store.seed([seed_fixed("a", used=1), seed_fixed("b", used=10), seed_rolling("c", (NOW_S - 5, 2))], NOW)
    a, b, c = fixed("a", 5, 100), fixed("b", 5, 10), rolling("c", 5, 100)
    verdict = store.reserve([hold("h1", a, b, c)], NOW)[0]
    assert (verdict.admitted, verdict.refused) == (False, 1)
    assert verdict.levels == (Level(1, DAY_END), Level(10, DAY_END), Level(2, NOW_S - 5 + 60))
    assert store.levels([a, b, c], NOW) == list(verdict.levels)
    assert store.expired(at(3600)) == []  # and no hold was recorded
    store.settle([Settlement("h1", (1, 1, 1))], NOW)
    assert store.levels([a, b, c], NOW) == list(verdict.levels)


def test_holds_in_one_call_are_decided_in_order(store: CounterStore) -> None:
    store.seed([seed_fixed("a")], NOW)
    verdicts = store.reserve([hold(f"h{i}", fixed("a", 4, 10)) for i in range(3)], NOW)
    assert [v.admitted for v in verdicts] == [True, True, False]


def test_overage_lines_admit_and_report_it(store: CounterStore) -> None:
    store.seed([seed_fixed("credits", used=5), seed_fixed("day")], NOW)
    soft, hard = fixed("credits", 3, 5, block=False), fixed("day", 1, 10)
    verdict = store.reserve([hold("h1", hard, soft)], NOW)[0]
    assert verdict == Verdict(admitted=True, overage=True, levels=(Level(1, DAY_END), Level(8, DAY_END)))
    assert store.reserve([hold("h2", fixed("day", 1, 10))], NOW)[0] == Verdict(
        admitted=True, levels=(Level(2, DAY_END),)
    )


def test_minus_one_is_unlimited(store: CounterStore) -> None:
    store.seed([seed_fixed("day", used=10**17), seed_rolling("tpm")], NOW)
    lines = (fixed("day", 10**17, -1), rolling("tpm", 10**17, -1))
    for i in range(3):
        verdict = store.reserve([hold(f"h{i}", *lines)], NOW)[0]
        assert (verdict.admitted, verdict.overage) == (True, False)


def test_reserving_an_existing_hold_id_is_an_error(store: CounterStore) -> None:
    store.seed([seed_fixed("day")], NOW)
    store.reserve([hold("h1", fixed("day", 1, 10))], NOW)
    with pytest.raises(ValueError, match="exists already"):
        store.reserve([hold("h2", fixed("day", 1, 10)), hold("h1", fixed("day", 1, 10))], NOW)
    assert consumed(store, fixed("day", 0, 10)) == 2  # h2 before it went through, as in memory


def test_a_queued_reservation_answers_as_a_waited_one(store: CounterStore) -> None:
    # The event loop's way in (``reserve_queued``): the same verdicts, a missing counter and a fault too.
    store.seed([seed_fixed("org:day", used=8)], NOW)
    assert store.reserve_queued([hold("fits", fixed("org:day", 2, 10))], NOW).result(5) == [
        Verdict(admitted=True, levels=(Level(10, DAY_END),))
    ]
    refused, missing = store.reserve_queued(
        [hold("over", fixed("org:day", 1, 10)), hold("new", fixed("org:other", 1, 10))], NOW
    ).result(5)
    assert (refused.admitted, refused.refused, missing.missing) == (False, 0, (0,))
    with pytest.raises(ValueError, match="exists already"):
        store.reserve_queued([hold("fits", fixed("org:day", 0, 10))], NOW).result(5)
    assert consumed(store, fixed("org:day", 0, 10)) == 10


# -- settle and release ---------------------------------------------------------------------------


def test_settle_replaces_the_estimate_with_the_actual(store: CounterStore) -> None:
    store.seed([seed_fixed("day"), seed_rolling("tpm")], NOW)
    day, tpm = fixed("day", 100, 1000), rolling("tpm", 100, 1000)
    store.reserve([hold("small", day, tpm)], NOW)
    store.settle([Settlement("small", (40, 30))], at(1))
    assert store.levels([day, tpm], at(1)) == [Level(40, DAY_END), Level(30, NOW_S + 60)]
    assert fixed_parts(store, "day") == (40, 0)
    store.reserve([hold("large", day, tpm)], at(2))
    store.settle([Settlement("large", (250, 260))], at(3))
    assert store.levels([day, tpm], at(3)) == [Level(290, DAY_END), Level(290, NOW_S + 60)]
    assert fixed_parts(store, "day") == (290, 0)


def test_release_gives_the_estimate_back(store: CounterStore) -> None:
    store.seed([seed_fixed("day", used=7), seed_rolling("tpm", (NOW_S - 1, 3))], NOW)
    day, tpm = fixed("day", 100, 1000), rolling("tpm", 100, 1000)
    store.reserve([hold("h1", day, tpm)], NOW)
    assert store.levels([day, tpm], NOW) == [Level(107, DAY_END), Level(103, NOW_S - 1 + 60)]
    store.release([Release("h1")], NOW)
    assert store.levels([day, tpm], NOW) == [Level(7, DAY_END), Level(3, NOW_S - 1 + 60)]
    assert fixed_parts(store, "day") == (7, 0)


def test_settle_or_release_of_an_unknown_hold_is_a_no_op(store: CounterStore) -> None:
    store.seed([seed_fixed("day")], NOW)
    store.reserve([hold("h1", fixed("day", 10, 100))], NOW)
    store.settle([Settlement("nope", (5,))], NOW)
    store.release([Release("nope")], NOW)
    assert consumed(store, fixed("day", 0, 100)) == 10
    store.settle([Settlement("h1", (4,))], NOW)
    store.settle([Settlement("h1", (99,))], NOW)  # already settled
    store.release([Release("h1")], NOW)
    assert consumed(store, fixed("day", 0, 100)) == 4


def test_holds_finished_together_end_each_once(store: CounterStore) -> None:
    """Several settlements in one call (a batch's), then again: each hold is finished once, and none is
    left for the reaper."""
    store.seed([seed_fixed("day")], NOW)
    day = fixed("day", 10, 1000)
    store.reserve([hold("a", day), hold("b", day), hold("c", day), hold("d", day)], NOW)
    store.settle([Settlement("a", (1,)), Settlement("b", (2,)), Settlement("c", (3,))], at(1))
    store.settle([Settlement("a", (50,)), Settlement("b", (50,)), Settlement("c", (50,))], at(2))
    assert store.levels([day], at(2)) == [Level(16, DAY_END)]  # read through the store: after its settles
    assert fixed_parts(store, "day") == (6, 10)
    assert [h.id for h in store.expired(NOW + LEASE + 1)] == ["d"]


# -- rolling windows ------------------------------------------------------------------------------


def test_rolling_usage_leaves_after_sixty_seconds(store: CounterStore) -> None:
    store.seed([seed_rolling("rpm")], NOW)
    line = rolling("rpm", 5, 10)
    assert store.reserve([hold("a", line)], NOW)[0].admitted
    assert store.reserve([hold("b", rolling("rpm", 3, 10))], at(10))[0].admitted
    verdict = store.reserve([hold("c", line)], at(20))[0]
    # 8 + 5 - 10 = 3 too many: the first bucket (5, at NOW) has to leave, at NOW + 60.
    assert verdict == Verdict(admitted=False, refused=0, retry_after_s=40, levels=(Level(8, NOW_S + 60),))
    assert store.levels([line], at(59.9)) == [Level(8, NOW_S + 60)]
    assert store.levels([line], at(60)) == [Level(3, NOW_S + 70)]
    assert store.reserve([hold("c", line)], at(60))[0] == Verdict(
        admitted=True, levels=(Level(8, NOW_S + 70),)
    )
    assert store.levels([line], at(125)) == [Level(0, NOW_S + 125)]


def test_rolling_retry_after_counts_the_buckets_that_must_leave(store: CounterStore) -> None:
    store.seed([seed_rolling("tpm", (NOW_S - 50, 4), (NOW_S - 30, 4), (NOW_S - 10, 4))], NOW)
    assert store.reserve([hold("a", rolling("tpm", 5, 12))], NOW)[0].retry_after_s == 30  # 2 buckets
    assert store.reserve([hold("b", rolling("tpm", 1, 12))], NOW)[0].retry_after_s == 10  # 1 bucket
    assert store.reserve([hold("c", rolling("tpm", 13, 12))], NOW)[0].retry_after_s == 60  # never fits


def test_settle_adjusts_the_bucket_of_the_second_it_was_reserved(store: CounterStore) -> None:
    store.seed([seed_rolling("tpm")], NOW)
    line = rolling("tpm", 50, 100)
    store.reserve([hold("early", line)], NOW)
    store.reserve([hold("late", rolling("tpm", 10, 100))], at(30))
    store.settle([Settlement("early", (20,))], at(40))
    assert store.levels([line], at(40)) == [Level(30, NOW_S + 60)]
    assert store.levels([line], at(60)) == [Level(10, NOW_S + 90)]  # the 20 left with NOW's bucket
    # A settlement after its second left the window changes nothing.
    assert store.levels([line], at(95)) == [Level(0, NOW_S + 95)]
    store.settle([Settlement("late", (99,))], at(95))
    assert store.levels([line], at(95)) == [Level(0, NOW_S + 95)]


# -- leases ---------------------------------------------------------------------------------------


def test_expired_lists_abandoned_holds_oldest_first(store: CounterStore) -> None:
    store.seed([seed_fixed("day"), seed_rolling("rpm")], NOW)
    lines = (fixed("day", 3, 100, block=False), rolling("rpm", 1, -1))
    h1, h2, h3 = (hold(f"h{i}", *lines, expires_us=at(lease)) for i, lease in ((1, 10), (2, 5), (3, 20)))
    store.reserve([h1, h2, h3], NOW)
    assert store.expired(at(5)) == []
    assert store.expired(at(15)) == [h2, h1]
    assert store.expired(at(15), limit=1) == [h2]
    store.settle([Settlement("h2", (1, 1))], at(15))
    assert store.expired(at(25)) == [h1, h3]
    store.release([Release("h1")], at(25))
    assert store.expired(at(25)) == [h3]
    assert store.expired(at(25), limit=0) == []


# -- exactness ------------------------------------------------------------------------------------


def test_values_above_two_to_the_53_stay_exact(store: CounterStore) -> None:
    big = 2**53
    store.seed([seed_fixed("credits", used=big + 1), seed_rolling("tpm", (NOW_S - 1, big + 3))], NOW)
    maximum = 2**62 + 7
    line = fixed("credits", 2**61 + 1, maximum)
    assert store.reserve([hold("a", line, rolling("tpm", big + 5, 2**62))], NOW)[0] == Verdict(
        admitted=True, levels=(Level(big + 1 + 2**61 + 1, DAY_END), Level(2 * big + 8, NOW_S - 1 + 60))
    )
    # Exactly up to the maximum is admitted, one more is not (doubles would see these as equal).
    left = maximum - (big + 1 + 2**61 + 1)
    assert not store.reserve([hold("b", fixed("credits", left + 1, maximum))], NOW)[0].admitted
    assert store.reserve([hold("c", fixed("credits", left, maximum))], NOW)[0].admitted
    assert not store.reserve([hold("d", fixed("credits", 1, maximum))], NOW)[0].admitted
    store.settle([Settlement("a", (2**60 + 3, big + 9))], NOW)
    assert store.levels([line, rolling("tpm", 0, 1)], NOW) == [
        Level(big + 1 + 2**60 + 3 + left, DAY_END),
        Level(2 * big + 12, NOW_S - 1 + 60),
    ]
    assert fixed_parts(store, "credits") == (big + 1 + 2**60 + 3, left)
    # Above 2^63 a counter cannot hold it: refused before anything is sent.
    if isinstance(store, RedisCounterStore):
        with pytest.raises(ValueError, match="64-bit"):
            store.reserve([hold("e", fixed("credits", 2**63, -1))], NOW)


def test_rolling_retry_after_is_exact_for_large_amounts(store: CounterStore) -> None:
    big = 2**55
    store.seed([seed_rolling("tpm", (NOW_S - 40, big), (NOW_S - 20, 1))], NOW)
    # total + amount - max = big + 1 + 1 - (big + 1) = 1: only the first bucket must leave; with
    # doubles, big + 1 == big and the answer would change.
    verdict = store.reserve([hold("a", rolling("tpm", 1, big + 1))], NOW)[0]
    assert (verdict.refused, verdict.retry_after_s) == (0, 20)
    assert store.reserve([hold("b", rolling("tpm", 1, big + 2))], NOW)[0].admitted


def test_a_settlement_far_below_its_estimate_is_exact_in_a_rolling_window(store: CounterStore) -> None:
    """Estimate and actual each below 2^53, their difference beyond it: no rounding."""
    store.seed([seed_rolling("tpm")], NOW)
    store.reserve([hold("a", rolling("tpm", 2**52, -1))], NOW)
    store.settle([Settlement("a", (-(2**52 + 1),))], NOW)
    assert consumed(store, rolling("tpm", 0, 1)) == -(2**52) - 1


# -- tallies (quota refusals for the alert) -------------------------------------------------------


def test_a_tally_counts_a_rolling_hour_by_the_minute(store: CounterStore) -> None:
    # NOW is 10:30:00; the minute 10:30 holds three events, 10:59 one more.
    assert [store.tally("refusals:a", at(s)) for s in (0, 10, 59.9)] == [1, 2, 3]
    assert store.tally("refusals:a", at(29 * 60)) == 4
    # 11:29:59 still counts 10:30 whole (one-minute buckets); at 11:30 that minute has left.
    assert store.tally("refusals:a", at(59 * 60 + 59)) == 5
    assert store.tally("refusals:a", at(60 * 60)) == 3  # 10:59, 11:29 and this one
    assert store.tally("refusals:a", at(3 * 3600)) == 1  # hours later only this one


def test_tallies_of_different_keys_are_apart(store: CounterStore) -> None:
    for _ in range(3):
        store.tally("refusals:a", NOW)
    assert store.tally("refusals:b", NOW) == 1
    assert store.tally("refusals:a", NOW) == 4


def test_processes_sharing_redis_count_into_one_tally(redis_url: str) -> None:
    first, second = RedisCounterStore(redis_url, prefix=PREFIX), RedisCounterStore(redis_url, prefix=PREFIX)
    threads = [
        threading.Thread(target=lambda s=s: [s.tally("refusals:a", NOW) for _ in range(50)])
        for s in (first, second) * 2
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert second.tally("refusals:a", at(1)) == 201
    finally:
        first.close()
        second.close()


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_two_hundred_threads_race_for_one_hundred_units(
    make_store: Callable[[], CounterStore], processes: int
) -> None:
    stores = [make_store() for _ in range(processes)]
    if processes == 2 and stores[0] is stores[1]:
        pytest.skip("a memory store is one process")
    stores[0].seed([seed_fixed("org:day")], NOW)
    line = fixed("org:day", 1, 100)
    start = threading.Barrier(200)
    verdicts: list[Verdict | None] = [None] * 200

    def race(i: int) -> None:
        start.wait()
        verdicts[i] = stores[i % processes].reserve([hold(f"race-{i}", line)], NOW)[0]

    threads = [threading.Thread(target=race, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted = [i for i, verdict in enumerate(verdicts) if verdict is not None and verdict.admitted]
    assert len(admitted) == 100
    assert all(v is not None and (v.admitted or v.refused == 0) for v in verdicts)
    for i in admitted:
        stores[i % processes].settle([Settlement(f"race-{i}", (1,))], NOW)
    for store in stores:
        assert store.levels([line], NOW) == [Level(100, DAY_END)]
    assert fixed_parts(stores[0], "org:day") == (100, 0)
    assert stores[0].expired(at(3600)) == []


def test_threads_reserving_and_settling_at_once_lose_nothing(make_store: Callable[[], CounterStore]) -> None:
    """Each call carries the settlements buffered so far, so concurrent calls carry the same ones: each
    is applied once, and no call fails for it."""
    store = make_store()
    store.seed([seed_fixed("org:day"), seed_rolling("org:tpm")], NOW)
    day, tpm = fixed("org:day", 5, 10**9), rolling("org:tpm", 5, 10**9)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                hold_id = f"t{t}-{i}"
                assert store.reserve([hold(hold_id, day, tpm)], NOW)[0].admitted
                store.settle([Settlement(hold_id, (2, 3))], NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.levels([day, tpm], NOW) == [Level(8 * 40 * 2, DAY_END), Level(8 * 40 * 3, NOW_S + 60)]
    assert store.expired(at(3600)) == []


def test_counters_whose_keys_differ_by_a_suffix_or_prefix_stay_apart(store: CounterStore) -> None:
    """Keys end in free text (identifiers): no key's counter may be another's."""
    store.seed([seed_fixed("o|bob")], NOW)
    assert store.reserve([hold("h1", fixed("o|bob", 7, 100))], NOW)[0].admitted
    others = [fixed(key, 0, 1) for key in ("o|bob~", "o|ubob", "o|vbob", "o|bo", "o|bob ")]
    assert store.levels(others, NOW) == [None] * len(others)
    store.seed([seed_fixed(line.key, used=1) for line in others], NOW)
    assert store.levels([fixed("o|bob", 0, 1), *others], NOW) == [Level(7, DAY_END)] + [Level(1, DAY_END)] * 5


def test_thousands_of_counters_in_one_call(store: CounterStore) -> None:
    """More counters of one window than one Redis command may carry (Lua's unpack stops near 8,000)."""
    lines = tuple(fixed(f"o|k{i}", 1, 1) for i in range(2_500))
    store.seed([seed_fixed(line.key) for line in lines], NOW)
    assert store.reserve([hold("many", *lines)], NOW)[0].admitted
    assert store.levels(list(lines), NOW) == [Level(1, DAY_END)] * len(lines)
    store.settle([Settlement("many", (0,) * len(lines))], NOW)
    assert {level.consumed for level in store.levels(list(lines), NOW) if level} == {0}


def test_values_between_ten_to_the_14_and_two_to_the_53_stay_exact(store: CounterStore) -> None:
    """The store's answers switch representation around here (14 printed digits, 2^53): no rounding."""
    base = 10**14 - 3
    store.seed([seed_fixed("credits", used=base), seed_rolling("tpm", (NOW_S - 1, base))], NOW)
    lines = (fixed("credits", 5, 2**53 + 10), rolling("tpm", 7, 2**53 + 10))
    verdict = store.reserve([hold("a", *lines)], NOW)[0]
    assert verdict.levels == (Level(base + 5, DAY_END), Level(base + 7, NOW_S - 1 + 60))
    near = 2**53 - base - 5 - 1
    assert store.reserve([hold("b", fixed("credits", near, 2**53 + 10))], NOW)[0].levels == (
        Level(2**53 - 1, DAY_END),
    )
    store.settle([Settlement("a", (6, 8))], NOW)
    assert store.levels(list(lines), NOW) == [Level(2**53, DAY_END), Level(base + 8, NOW_S - 1 + 60)]


# -- deferred settlements -------------------------------------------------------------------------


def test_deferred_settlements_are_seen_by_every_later_read(make_store: Callable[[], CounterStore]) -> None:
    writer, reader = make_store(), make_store()
    writer.seed([seed_fixed("day"), seed_rolling("tpm")], NOW)
    day, tpm = fixed("day", 100, 1000), rolling("tpm", 100, 1000)
    writer.reserve([hold("h1", day, tpm), hold("h2", day, tpm)], NOW)
    writer.settle([Settlement("h1", (7, 8))], NOW)
    writer.release([Release("h2")], NOW)
    # The same process: its next call carries them.
    assert writer.levels([day, tpm], NOW) == [Level(7, DAY_END), Level(8, NOW_S + 60)]
    writer.settle([Settlement("nope", (1, 1))], NOW)
    writer.reserve([hold("h3", day, tpm)], NOW)
    writer.settle([Settlement("h3", (1, 2))], NOW)
    assert writer.expired(at(3600)) == []
    # Another process: once the flusher has sent them (no call of the writer needed).
    writer.reserve([hold("h4", day, tpm)], NOW)
    writer.settle([Settlement("h4", (3, 3))], NOW)
    deadline = time.monotonic() + 1.0
    while reader.levels([day, tpm], NOW) != [Level(11, DAY_END), Level(13, NOW_S + 60)]:
        assert time.monotonic() < deadline, "the flusher did not send the settlement"
        time.sleep(0.005)
    while isinstance(writer, RedisCounterStore) and writer.pending:  # the reply may land just after
        assert time.monotonic() < deadline + 1.0
        time.sleep(0.005)


def test_a_hold_made_by_another_process_is_finished_and_reaped_here(
    make_store: Callable[[], CounterStore],
) -> None:
    """Recovery after a crash: another process settles or releases what a dead one reserved; the reaper
    finds expired holds of every organization."""
    maker, other = make_store(), make_store()
    days = {org: fixed(f"{org}|day", 10, 100) for org in ("org_a", "org_b", "org_c")}
    maker.seed([seed_fixed(line.key) for line in days.values()], NOW)
    for i, (org, line) in enumerate(days.items()):
        assert maker.reserve([Hold(f"h{i}", (line,), at(10 + i), org)], NOW)[0].admitted
    other.settle([Settlement("h0", (4,), "org_a")], at(1))
    other.release([Release("h1", "org_b")], at(1))
    levels = other.levels(list(days.values()), at(1))
    assert levels == [Level(4, DAY_END), Level(0, DAY_END), Level(10, DAY_END)]
    assert other.expired(at(60)) == [Hold("h2", (days["org_c"],), at(12), "org_c")]
    other.release([Release("h2", "org_c")], at(60))
    assert other.levels([days["org_c"]], at(61)) == [Level(0, DAY_END)]  # its call carries the release
    assert maker.expired(at(3600)) == []


# -- Redis outages --------------------------------------------------------------------------------


def test_unreachable_redis_raises_unavailable_and_keeps_settlements() -> None:
    store = RedisCounterStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2)
    line = fixed("day", 1, 10)
    try:
        store.settle([Settlement("h1", (1,))], NOW)
        store.release([Release("h2")], NOW)
        for call in (
            lambda: store.reserve([hold("h3", line)], NOW),
            lambda: store.levels([line], NOW),
            lambda: store.seed([seed_fixed("day")], NOW),
            lambda: store.expired(NOW),
        ):
            with pytest.raises(CounterStoreUnavailable, match="unavailable"):
                call()
        assert store.pending == 2
    finally:
        store.close()


def _redis_on(port: int, directory: Path, *args: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--dbfilename", "dump.rdb", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        assert proc.poll() is None, "redis-server exited"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("redis-server did not start")


def test_a_buffered_settlement_survives_an_outage(shared_redis: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = _redis_on(port, tmp_path)
    store = RedisCounterStore(url, prefix=PREFIX, socket_timeout_s=0.3)
    watcher = redis.Redis.from_url(url)
    try:
        line = fixed("day", 10, 100)
        store.seed([seed_fixed("day")], NOW)
        assert store.reserve([hold("h1", line)], NOW)[0].admitted
        watcher.shutdown(save=True)  # down, but the hold comes back with the restarted server
        proc.wait(timeout=15)

        store.settle([Settlement("h1", (3,))], NOW)
        with pytest.raises(CounterStoreUnavailable):
            store.levels([line], NOW)
        time.sleep(0.1)  # the flusher tries too, and fails
        assert store.pending == 1

        proc = _redis_on(port, tmp_path)
        deadline = time.monotonic() + 5
        # The flusher sends it: no call of ours is needed. (Its reply may land just after the write.)
        fields = [f"u{DAY_END}:day", f"v{DAY_END}:day"]
        while watcher.hmget(f"{PREFIX}{{-}}counters", fields) != [b"3", b"0"] or store.pending:
            assert time.monotonic() < deadline, "the settlement was not applied after the outage"
            time.sleep(0.01)
        assert store.levels([line], NOW) == [Level(3, DAY_END)]
    finally:
        store.close()
        watcher.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


def test_a_restarted_server_costs_no_error(shared_redis: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    proc = _redis_on(port, tmp_path)
    store = RedisCounterStore(f"redis://127.0.0.1:{port}/0", prefix=PREFIX)
    try:
        store.seed([seed_fixed("day", used=2)], NOW)  # leaves an idle connection behind
        watcher = redis.Redis(port=port)
        watcher.shutdown(save=True)
        watcher.close()
        proc.wait(timeout=15)
        proc = _redis_on(port, tmp_path)
        # The idle connection was closed by the old server: reopened, not reported; the script is
        # loaded again (NOSCRIPT) on the new server.
        assert store.levels([fixed("day", 0, 1)], NOW) == [Level(2, DAY_END)]
    finally:
        store.close()
        proc.terminate()
        proc.wait(timeout=15)


def _loading(request: pytest.FixtureRequest, module: bool) -> list[str]:
    """redis-server's options to load Meterline's module, where a test asks for it."""
    return ["--loadmodule", str(request.getfixturevalue("redis_module"))] if module else []


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_a_read_only_replica_is_unavailable_and_keeps_settlements(
    shared_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest, module: bool
) -> None:
    """READONLY (a replica, a master just demoted in a failover) means "not now": the engine answers 503
    or fails open, and the buffered settlements wait instead of being dropped."""
    port = free_port()
    proc = _redis_on(port, tmp_path, *_loading(request, module))
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisCounterStore(url, prefix=PREFIX, socket_timeout_s=0.5, flush_interval_s=3600)
    admin = redis.Redis.from_url(url)
    try:
        line = fixed("day", 10, 100)
        store.seed([seed_fixed("day")], NOW)
        assert store.reserve([hold("h1", line)], NOW)[0].admitted
        admin.execute_command("REPLICAOF", "127.0.0.1", str(shared_redis.port))
        store.settle([Settlement("h1", (3,))], NOW)
        with pytest.raises(CounterStoreUnavailable):
            store.reserve([hold("h2", line)], NOW)
        assert store.pending == 1
    finally:
        store.close()
        admin.close()
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture(params=["redis", "redis-cluster"])
def quiet_redis(request: pytest.FixtureRequest) -> Iterator[tuple[str, RedisCounterStore]]:
    """A Redis store on one server or the cluster, with no flusher racing the test's calls."""
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url_clean")
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    yield request.param, store
    store.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_counters_in_redis_are_forgotten_a_day_after_their_use(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """A fixed window is forgotten a day past its end, a rolling window a day after its last reservation
    (by the callers' clock; the engine then seeds them again from the ledger), and Redis' own lifetimes
    catch an organization nobody calls any more: Redis does not grow without bound."""
    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url_clean")
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    counters, windows = f"{PREFIX}{{org}}counters", f"{PREFIX}{{org}}windows"
    day, tpm = fixed("org|day", 1, 9), rolling("org|tpm", 1, 9)
    try:
        store.seed([seed_fixed("org|day"), seed_rolling("org|tpm")], NOW)
        assert store.reserve([Hold("h1", (day, tpm), NOW + LEASE, "org")], NOW)[0].admitted
        store.settle([Settlement("h1", (1, 1), "org")], NOW)
        for key in (counters, windows):
            ttl = store._send_command("TTL", key)
            assert DAY_END + 86_400 - NOW_S - 5 <= ttl <= DAY_END + 86_400 - NOW_S
        # Still there a day later: the rolling window was reserved on since, the fixed one has not ended.
        later = NOW + 86_000 * 1_000_000
        assert store.reserve([Hold("h2", (day, tpm), later + LEASE, "org")], later)[0].admitted
        store.release([Release("h2", "org")], later)
        read = later + 500 * 1_000_000  # an empty rolling window frees up "now"
        assert store.levels([day, tpm], read) == [Level(1, DAY_END), Level(0, read // 10**6)]
        # A day past the end of both: missing, and nothing of them is left in Redis.
        gone = (DAY_END + 86_400) * 1_000_000 + later - NOW
        assert store.levels([day, tpm], gone) == [None, None]
        assert store._send_command("EXISTS", counters, windows) == 0
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_a_fixed_window_with_a_reservation_on_it_is_not_forgotten(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """As memory sweeps only windows with nothing reserved: a hold that outlives its window by more than
    a day still finishes on the counter it reserved on, never on a new one seeded meanwhile."""
    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url_clean")
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    day = fixed("org|day", 5, 100)
    late = (DAY_END + 2 * 86_400) * 1_000_000
    try:
        store.seed([seed_fixed("org|day")], NOW)
        assert store.reserve([Hold("h", (day,), late, "org")], NOW)[0].admitted
        assert store.levels([day], late) == [Level(5, DAY_END)]
        store.release([Release("h", "org")], late)
        assert store.levels([day], late) == [Level(0, DAY_END)]
        # Nothing reserved any more: forgotten at the next call past its time.
        assert store.levels([day], late + 3_601 * 1_000_000) == [None]
    finally:
        store.close()


def test_reservations_waiting_together_are_decided_in_one_call_as_if_alone(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    """Requests queued while a call is out go in the next call together; each gets the verdicts it
    would get alone, a duplicate id fails only its own request, and the requests after it are decided
    again."""
    kind, store = quiet_redis
    # One route: on a cluster, an organization (requests of several do not wait for one another).
    route = "" if kind == "redis" else "org_a"
    x, y = fixed("org_a|x", 4, 10), fixed("org_a|y", 4, 10)
    store.seed([seed_fixed(x.key), seed_fixed(y.key)], NOW)
    assert store.reserve([Hold("taken", (x,), NOW + LEASE, "org_a")], NOW)[0].admitted

    def waiting(*holds: tuple[str, Line]) -> Any:
        return redis_counters._Request([Hold(i, (ln,), NOW + LEASE, "org_a") for i, ln in holds], NOW)

    queued = [
        waiting(("x1", x)),
        waiting(("y1", y)),
        waiting(("y2", y), ("taken", x)),
        waiting(("y3", y)),
        waiting(("x2", x)),
    ]
    store._queues[route] = queued[1:]  # waiting behind the first, which leads
    store._lead(route, queued[0])
    assert [len(r.verdicts) for r in queued] == [1, 1, 0, 1, 1]
    assert [v.admitted for r in queued for v in r.verdicts] == [True, True, False, False]
    assert [str(r.error) if r.error else None for r in queued] == [
        None,
        None,
        "reservation taken exists already",
        None,
        None,
    ]
    # As alone: y2 was decided before its request's duplicate and stands; y3 found y full.
    assert store.levels([x, y], NOW) == [Level(8, DAY_END), Level(8, DAY_END)]
    assert store._queues == {}


def test_reservations_from_an_event_loop_wait_for_the_call_out_and_lead_the_next_one(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    """``reserve_queued`` while a thread's call is out: both requests queue behind it; the lead passes to
    the first of them, whose call the store's own threads make, and each future gets its verdicts."""
    kind, store = quiet_redis
    route = "" if kind == "redis" else "org_a"
    x = fixed("org_a|x", 4, 10)
    store.seed([seed_fixed(x.key)], NOW)
    leader = redis_counters._Request([Hold("x1", (x,), NOW + LEASE, "org_a")], NOW)
    store._queues[route] = []  # the thread's call is out
    second = store.reserve_queued([Hold("x2", (x,), NOW + LEASE, "org_a")], NOW)
    third = store.reserve_queued([Hold("x3", (x,), NOW + LEASE, "org_a")], NOW)
    assert not second.done()
    assert not third.done()
    store._lead(route, leader)
    assert [v.admitted for v in leader.verdicts] == [True]
    assert [v.admitted for v in second.result(5)] == [True]
    assert third.result(5)[0].refused == 0  # 12 would pass 10: decided after x2, as alone
    assert store.levels([x], NOW) == [Level(8, DAY_END)]
    assert store._queues == {}


def test_a_cancelled_request_from_an_event_loop_neither_stops_its_call_nor_the_lead(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    kind, store = quiet_redis
    route = "" if kind == "redis" else "org_a"
    x = fixed("org_a|x", 4, 10)
    store.seed([seed_fixed(x.key)], NOW)
    leader = redis_counters._Request([Hold("x1", (x,), NOW + LEASE, "org_a")], NOW)
    store._queues[route] = []
    gone = store.reserve_queued([Hold("x2", (x,), NOW + LEASE, "org_a")], NOW)
    kept = store.reserve_queued([Hold("x3", (x,), NOW + LEASE, "org_a")], NOW)
    assert gone.cancel()  # its caller went away while it waited
    store._lead(route, leader)
    assert kept.result(5)[0].admitted  # the cancelled one led the call and was not answered
    assert store._queues == {}


def test_a_reservation_from_an_event_loop_after_close_fails_as_unavailable(redis_url: str) -> None:
    store = RedisCounterStore(redis_url, prefix=PREFIX)
    store.close()
    decided = store.reserve_queued([hold("late", fixed("org:day", 1, 10))], NOW)
    with pytest.raises(CounterStoreUnavailable, match="closed"):
        decided.result(5)
    assert store._queues == {}


def test_a_settlement_goes_where_its_hold_is_whatever_group_it_names(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    _kind, store = quiet_redis
    line = fixed("org_a|day", 5, 100)
    store.seed([seed_fixed(line.key)], NOW)
    assert store.reserve([Hold("h1", (line,), NOW + LEASE, "org_a")], NOW)[0].admitted
    store.settle([Settlement("h1", (2,), "org_b")], NOW)
    assert store.levels([line], NOW) == [Level(2, DAY_END)]
    assert store.pending == 0


def test_a_hold_spanning_two_organizations_is_refused_alone(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    """Nothing may cross organizations (one slot per decision on a cluster): such a hold is a caller's
    error, raised before anything is sent, and decisions queued with it are not affected."""
    _kind, store = quiet_redis
    a, b = fixed("org_a|day", 1, 10), fixed("org_b|day", 1, 10)
    store.seed([seed_fixed(a.key), seed_fixed(b.key)], NOW)
    with pytest.raises(ValueError, match="another group"):
        store.reserve([Hold("both", (a, b), NOW + LEASE, "org_a")], NOW)
    assert store.reserve([Hold("one", (a,), NOW + LEASE, "org_a")], NOW)[0].admitted
    assert store.levels([a, b], NOW) == [Level(1, DAY_END), Level(0, DAY_END)]


def test_a_malformed_line_is_refused_before_it_joins_a_call(
    quiet_redis: tuple[str, RedisCounterStore],
) -> None:
    """A fixed window without an end, or an amount no counter can hold, is the caller's error: raised
    before the hold waits with others for the next call (where it would fail all of them)."""
    kind, store = quiet_redis
    route = "" if kind == "redis" else "org_a"
    day = fixed("org_a|day", 1, 10)
    store.seed([seed_fixed(day.key)], NOW)
    endless = Line("org_a|other", 1, 10, True, "fixed", 0)
    huge = fixed("org_a|day", 2**63, 10)
    errors: list[str] = []

    def reserve(lines: tuple[Line, ...]) -> None:
        try:
            store.reserve([Hold("bad", lines, NOW + LEASE, "org_a")], NOW)
        except ValueError as exc:
            errors.append(str(exc))

    store._queues[route] = []  # a call of the route is out: a request now would wait for the next one
    for lines in ((day, endless), (huge,)):
        thread = threading.Thread(target=reserve, args=(lines,), daemon=True)
        thread.start()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the malformed request was queued"
    assert store._queues[route] == []
    del store._queues[route]
    assert len(errors) == 2
    assert "no end" in errors[0]
    assert "64-bit" in errors[1]
    assert store.reserve([Hold("one", (day,), NOW + LEASE, "org_a")], NOW)[0].admitted
    assert store.levels([day], NOW) == [Level(1, DAY_END)]


def test_a_batch_failing_on_one_master_gives_back_what_the_others_admitted(
    redis_cluster_url_clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisCounterStore(redis_cluster_url_clean, prefix=PREFIX, flush_interval_s=3600)
    try:
        days = {org: fixed(f"{org}|day", 5, 100) for org in ("org_a", "org_b")}
        store.seed([seed_fixed(line.key) for line in days.values()], NOW)
        send = store._send

        def org_b_down(route: str, call: Any, now_us: int) -> Any:
            if route == "org_b" and "h" in call.parts:
                raise CounterStoreUnavailable("org_b's master is down")
            return send(route, call, now_us)

        monkeypatch.setattr(store, "_send", org_b_down)
        batch = [Hold(f"h-{org}", (line,), NOW + LEASE, org) for org, line in days.items()]
        with pytest.raises(CounterStoreUnavailable):
            store.reserve(batch, NOW)
        monkeypatch.undo()
        # Nothing stays reserved: the caller was told nothing was.
        assert store.levels(list(days.values()), NOW) == [Level(0, DAY_END), Level(0, DAY_END)]
    finally:
        store.close()


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_a_decision_follows_its_organization_to_another_master(
    request: pytest.FixtureRequest, module: bool
) -> None:
    """Slots move between a cluster's masters (resharding, a cluster scaled out). A process whose slot map
    is older sends its decision to the old master, which answers MOVED without running it: the decision
    follows the redirect to where the organization's counters are now, and counts on them exactly. (The
    module's command names its keys to the cluster as EVALSHA does: redis-py's client routes it.)"""
    cluster: RedisCluster = request.getfixturevalue(
        "shared_redis_cluster_with_module" if module else "shared_redis_cluster"
    )
    url = request.getfixturevalue("redis_cluster_module_url_clean" if module else "redis_cluster_url_clean")
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    key = f"{PREFIX}{{org_m}}counters"
    home = cluster.master_of(key)
    try:
        day = fixed("org_m|day", 5, 12)
        store.seed([seed_fixed("org_m|day")], NOW)
        assert store.reserve([Hold("m1", (day,), NOW + LEASE, "org_m")], NOW)[0].admitted
        store.settle([Settlement("m1", (4,), "org_m")], NOW)
        elsewhere = next(port for port in cluster.master_ports() if port != home)
        cluster.move(key, elsewhere)
        assert cluster.master_of(key) == elsewhere
        # The settlement rides with this call: both land once, on the moved counters.
        assert store.reserve([Hold("m2", (day,), NOW + LEASE, "org_m")], NOW)[0].admitted
        assert store.levels([day], NOW) == [Level(9, DAY_END)]
        assert not store.reserve([Hold("m3", (day,), NOW + LEASE, "org_m")], NOW)[0].admitted  # 14 > 12
        store.release([Release("m2", "org_m")], NOW)
        assert store.levels([day], NOW) == [Level(4, DAY_END)]
        assert store.pending == 0
    finally:
        store.close()
        if cluster.master_of(key) != home:
            cluster.move(key, home)


def test_a_cluster_that_asks_for_a_password_is_used_with_it(redis_cluster_own: RedisCluster) -> None:
    """Managed clusters ask for a password on every node: decisions reach each organization's master with
    the URL's credentials (here with characters a URL must escape), and count exactly, also once an
    organization's slot has moved to another master."""
    cluster = redis_cluster_own
    assert cluster.url.startswith("redis+cluster://:s3cr%7Be%7Dt%40%3A%2Fpw%25@")
    store = RedisCounterStore(cluster.url, prefix=PREFIX, flush_interval_s=3600)
    try:
        # Organizations whose keys sit on every master.
        orgs = [f"org_{n}" for n in range(12)]
        masters = {cluster.master_of(f"{PREFIX}{{{org}}}counters") for org in orgs}
        assert len(masters) == 3
        days = [fixed(f"{org}|day", 4, 10) for org in orgs]
        store.seed([seed_fixed(line.key) for line in days], NOW)
        for round_ in range(3):
            verdicts = store.reserve(
                [
                    Hold(f"{org}-{round_}", (line,), NOW + LEASE, org)
                    for org, line in zip(orgs, days, strict=True)
                ],
                NOW,
            )
            assert [v.admitted for v in verdicts] == [round_ < 2] * len(orgs)
            if round_ == 0:
                key = f"{PREFIX}{{org_0}}counters"
                cluster.move(
                    key, next(port for port in cluster.master_ports() if port != cluster.master_of(key))
                )
        store.settle([Settlement(f"{org}-0", (3,), org) for org in orgs], NOW)
        assert store.levels(days, NOW) == [Level(7, DAY_END)] * len(orgs)
    finally:
        store.close()


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_a_dead_master_fails_its_organizations_until_its_replica_takes_over(
    request: pytest.FixtureRequest, module: bool
) -> None:
    """A master killed (``kill -9``): its organizations' decisions fail as unavailable at once, and once
    its replica has taken over they are decided again without anything done by hand, as are every other
    master's. (Between the master being marked failed and its replica taking over, the whole cluster
    answers CLUSTERDOWN: Redis' ``cluster-require-full-coverage``.)"""
    cluster: RedisCluster = request.getfixturevalue(
        "redis_cluster_own_with_module" if module else "redis_cluster_own"
    )
    store = RedisCounterStore(cluster.url, prefix=PREFIX, flush_interval_s=3600)
    try:
        orgs = [f"org_{n}" for n in range(12)]
        by_master: dict[int, list[str]] = {}
        for org in orgs:
            by_master.setdefault(cluster.master_of(f"{PREFIX}{{{org}}}counters"), []).append(org)
        dead, lost = min(by_master.items())
        lines = {org: fixed(f"{org}|day", 1, 10**6) for org in orgs}
        store.seed([seed_fixed(line.key) for line in lines.values()], NOW)
        numbers = itertools.count()

        def decide(org: str) -> bool:
            hold_ = Hold(f"{org}-{next(numbers)}", (lines[org],), NOW + LEASE, org)
            verdict = store.reserve([hold_], NOW)[0]
            if verdict.missing:
                # What the dead master had not yet passed to its replica is gone (replication is
                # asynchronous): the counter is missing, and the engine seeds it again from the ledger.
                store.seed([seed_fixed(lines[org].key)], NOW)
                verdict = store.reserve([hold_], NOW)[0]
            return verdict.admitted

        assert all(decide(org) for org in orgs)
        cluster.kill(dead)
        with pytest.raises(CounterStoreUnavailable):
            decide(lost[0])
        cluster.wait_ok()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert decide(lost[0])
                break
            except CounterStoreUnavailable:
                assert time.monotonic() < deadline, "the dead master's organizations were not decided again"
                time.sleep(0.2)
        assert all(decide(org) for org in orgs)
        if module:  # every call ran the module's command, also on the replica it promoted
            masters = cluster.master_ports()
            assert [("cmdstat_meterline.counters" in cluster.command(port, "INFO", "commandstats"))
                    for port in masters] == [True] * len(masters)  # fmt: skip
            assert not any(
                "cmdstat_evalsha" in cluster.command(port, "INFO", "commandstats") for port in masters
            )
    finally:
        store.close()


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_out_of_memory_refuses_a_call_whole(
    shared_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest, module: bool
) -> None:
    """Redis out of memory refuses the script (or the module's command) before it runs: 'unavailable',
    nothing half-applied, the buffered settlement kept for later."""
    port = free_port()
    proc = _redis_on(port, tmp_path, *_loading(request, module))
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    admin = redis.Redis.from_url(url)
    try:
        line = fixed("day", 10, 100)
        store.seed([seed_fixed("day")], NOW)
        assert store.reserve([hold("h1", line)], NOW)[0].admitted
        store.settle([Settlement("h1", (3,))], NOW)
        admin.config_set("maxmemory", 1)
        with pytest.raises(CounterStoreUnavailable):
            store.reserve([hold("h2", line)], NOW)
        assert store.pending == 1
        admin.config_set("maxmemory", 0)
        assert store.levels([line], NOW) == [Level(3, DAY_END)]  # applied once, now
    finally:
        store.close()
        admin.close()
        proc.terminate()
        proc.wait(timeout=15)


def test_a_finish_carried_by_a_concurrent_call_is_not_sent_again(redis_url: str) -> None:
    """Two calls may take the same buffered settlement; the one that finds it confirmed by the other
    leaves it out (it failed on its record before)."""
    store = RedisCounterStore(redis_url, prefix=PREFIX, flush_interval_s=3600)
    try:
        store.seed([seed_fixed("day")], NOW)
        assert store.reserve([hold("h1", fixed("day", 5, 100))], NOW)[0].admitted
        store.settle([Settlement("h1", (2,))], NOW)
        taken = list(store._pending.values())  # this call's snapshot...
        store.flush()  # ...and another call carries and confirms them first
        store._send_finishes("", redis_counters._Call(), taken, NOW)
        assert store.levels([fixed("day", 0, 1)], NOW) == [Level(2, DAY_END)]
    finally:
        store.close()


def test_the_buffer_is_capped() -> None:
    store = RedisCounterStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2, max_pending=3)
    try:
        store.release([Release(f"h{i}") for i in range(5)], NOW)
        assert store.pending == 3  # the oldest two went, with a warning
    finally:
        store.close()


# -- the same answers as the reference, on random traffic -----------------------------------------


def _random_key(rng: random.Random, groups: Sequence[str], group: str | None = None) -> str:
    """One of a few keys; of ``group``, or of any of ``groups`` (organizations, like the engine's keys)."""
    group = rng.choice(groups) if group is None else group
    return f"{group}|{rng.choice('abc')}" if group else rng.choice("abc")


def _random_line(rng: random.Random, groups: Sequence[str], group: str | None = None) -> Line:
    amount = rng.choice([0, 1, 3, 7, 2**54 + rng.randrange(5)])
    maximum = rng.choice([-1, 0, 5, 20, 60, 2**56])
    kind: WindowKind = "fixed" if rng.random() < 0.5 else "rolling"
    key = _random_key(rng, groups, group)
    return Line(key, amount, maximum, rng.random() < 0.7, kind, _window_end(key) if kind == "fixed" else 0)


def _window_end(key: str) -> int:
    """A fixed counter's window ends when its key says (as the engine's keys name their window)."""
    return DAY_END + "abc".index(key[-1])


def _random_seed(rng: random.Random, now_us: int, groups: Sequence[str]) -> Seed:
    key = _random_key(rng, groups)
    if rng.random() < 0.5:
        return Seed(key, "fixed", _window_end(key), used=rng.choice([0, 4, 2**54]))
    buckets = tuple(
        (now_us // 1_000_000 - rng.randrange(70), rng.choice([0, 1, 5])) for _ in range(rng.randrange(4))
    )
    return Seed(key, "rolling", 0, buckets=buckets)


def _play(store: CounterStore, rng: random.Random, steps: int, groups: Sequence[str] = ("",)) -> list[Any]:
    answers: list[Any] = []
    now, serial = NOW, 0
    holds: dict[str, Hold] = {}  # the admitted ones, by id (an id comes back once its hold is gone)
    for _ in range(steps):
        now += rng.choice([0, 0, 0, 300_000, 1_000_000, 7_000_000, 25_000_000, -2_000_000])
        op = rng.random()
        try:
            if op < 0.12:
                store.seed([_random_seed(rng, now, groups) for _ in range(rng.randrange(1, 3))], now)
                answers.append("seeded")
            elif op < 0.5:
                batch = []
                for _ in range(rng.randrange(1, 3)):
                    serial += 1
                    hold_id = rng.choice(list(holds)) if holds and rng.random() < 0.03 else f"h{serial}"
                    # A reused id comes with its group: a store spread over servers finds it only there.
                    group = holds[hold_id].group if hold_id in holds else rng.choice(groups)
                    lines = tuple(_random_line(rng, groups, group) for _ in range(rng.randrange(0, 4)))
                    expires_us = now + rng.randrange(1, 60_000_000) * 1000 + serial
                    batch.append(Hold(hold_id, lines, expires_us, group))
                verdicts = store.reserve(batch, now)
                holds.update((h.id, h) for h, v in zip(batch, verdicts, strict=False) if v.admitted)
                answers.append(verdicts)
            elif op < 0.7 and holds:
                chosen = rng.choice(list(holds.values()))
                actual = tuple(rng.choice([0, 2, line.amount, line.amount + 4]) for line in chosen.lines)
                store.settle([Settlement(chosen.id, actual, chosen.group)], now)
                answers.append("settled")
            elif op < 0.78 and holds:
                chosen = rng.choice(list(holds.values()))
                store.release([Release(chosen.id, chosen.group)], now)
                answers.append("released")
            elif op < 0.95:
                answers.append(
                    store.levels([_random_line(rng, groups) for _ in range(rng.randrange(1, 5))], now)
                )
            else:
                answers.append(store.expired(now, limit=rng.randrange(0, 6)))
        except ValueError as exc:
            answers.append(str(exc))
    answers.append(store.expired(now + 10**12, limit=10_000))
    return answers


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", list(_REDIS_URLS))
def test_redis_answers_exactly_as_memory_on_random_traffic(
    request: pytest.FixtureRequest, kind: str, seed: int
) -> None:
    url = request.getfixturevalue(_REDIS_URLS[kind])
    memory = MemoryCounterStore()
    # The traffic reuses hold ids, which the engine never does; with the flusher racing the calls, a
    # finish sent twice could meet a newer hold of the same id. So only the calls send here.
    shared = RedisCounterStore(url, prefix=f"random{seed}:", flush_interval_s=3600)
    # Four organizations: on a cluster their keys sit on different masters, a batch spans several.
    groups = ("", "org_a", "org_b", "org_c")
    try:
        expected = _play(memory, random.Random(seed), 400, groups)
        assert _play(shared, random.Random(seed), 400, groups) == expected
    finally:
        shared.close()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_database_answers_exactly_as_memory_on_random_traffic(
    request: pytest.FixtureRequest, kind: str, seed: int
) -> None:
    memory = MemoryCounterStore()
    db = Database(_database(request, kind))
    try:
        assert _play(SqlCounterStore(db), random.Random(seed), 400) == _play(memory, random.Random(seed), 400)
    finally:
        db.dispose()


# -- choosing a store by URL ----------------------------------------------------------------------


def test_factory_chooses_the_store_by_url_scheme(redis_url: str) -> None:
    assert isinstance(open_counter_store(None), MemoryCounterStore)
    assert isinstance(open_counter_store("memory://"), MemoryCounterStore)
    other_db = redis_url.rsplit("/", 1)[0] + "/3"
    store = open_counter_store(other_db)
    db0, db3 = redis.Redis.from_url(redis_url), redis.Redis.from_url(other_db)
    try:
        assert isinstance(store, RedisCounterStore)
        store.seed([seed_fixed("day", used=4)], NOW)
        assert store.levels([fixed("day", 0, 1)], NOW) == [Level(4, DAY_END)]
        window = "meterline:{-}counters"
        assert (db3.exists(window), db0.exists(window)) == (1, 0)
    finally:
        store.close()
        db3.flushdb()
        db0.close()
        db3.close()
    tls = open_counter_store("rediss://127.0.0.1:1/0")  # not contacted until used
    assert isinstance(tls, RedisCounterStore)
    tls.close()


@pytest.mark.parametrize("url", ["postgresql://db/x", "memcached://cache:11211", "nonsense"])
def test_factory_names_an_unknown_scheme(url: str) -> None:
    scheme = url.split("://")[0] if "://" in url else "(none)"
    with pytest.raises(ConfigError, match=re.escape(f"scheme '{scheme}'")):
        open_counter_store(url)


# -- Meterline's Redis module: the script's calls in C ------------------------------------------------


def _contents(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key of ``prefix``, as Redis holds it (a hash's fields, a sorted set's scores), and whether it
    has a lifetime."""
    found: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*"):
        kind = client.type(key)
        if kind == b"hash":
            value: Any = client.hgetall(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            value = client.smembers(key)
        else:
            value = client.get(key)
        found[key] = (kind, value, client.ttl(key) > 0)
    return found


def _calls(client: redis.Redis) -> dict[str, int]:
    return {
        name: int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("evalsha", "meterline.counters")
    }


@pytest.mark.parametrize("seed", range(3))
def test_the_module_stores_exactly_what_the_script_stores(
    redis_url: str, redis_module_url_clean: str, seed: int
) -> None:
    """The same traffic on a Redis with the module and on one without: the same answers, and every key
    the same, field for field. So processes of either kind may share one Redis, and a Redis may gain or
    lose the module (a restart, a failover) with its counters kept."""
    groups = ("", "org_a", "org_b")
    stores = [
        RedisCounterStore(url, prefix=f"same{seed}:", flush_interval_s=3600)
        for url in (redis_url, redis_module_url_clean)
    ]
    clients = [redis.Redis.from_url(url) for url in (redis_url, redis_module_url_clean)]
    try:
        with_script, with_module = (_play(store, random.Random(seed), 400, groups) for store in stores)
        assert with_module == with_script
        script_keys, module_keys = (_contents(client, f"same{seed}:") for client in clients)
        assert module_keys == script_keys
        assert len(module_keys) > 5
        # Each Redis counted the way it could: the module where it is loaded, the script elsewhere.
        assert _calls(clients[0])["meterline.counters"] == 0 < _calls(clients[0])["evalsha"]
        assert _calls(clients[1])["evalsha"] == 0 < _calls(clients[1])["meterline.counters"]
    finally:
        for store in stores:
            store.close()
        for client in clients:
            client.close()


def test_a_module_of_another_version_leaves_the_calls_to_the_script(
    shared_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis still loading the module an earlier Meterline built (its script's SHA-1 differs): the
    module refuses the call before it runs, the store says so once and counts with the script."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    older = tmp_path / "older.so"
    subprocess.run(
        [compiler, "-O2", "-std=gnu11", "-fPIC", "-shared", '-DMETERLINE_SCRIPT_SHA="' + "0" * 40 + '"',
         "-o", str(older), str(Path(redis_counters.__file__).with_suffix(".c"))],
        check=True,
    )  # fmt: skip
    port = free_port()
    proc = _redis_on(port, tmp_path, "--loadmodule", str(older))
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    client = redis.Redis.from_url(url)
    try:
        with caplog.at_level("INFO", logger="meterline.quotas.redis"):
            day = fixed("day", 4, 10)
            store.seed([seed_fixed("day", used=3)], NOW)
            assert store.reserve([hold("h1", day)], NOW)[0].admitted
            store.settle([Settlement("h1", (2,))], NOW)
            assert store.levels([day], NOW) == [Level(5, DAY_END)]
        said = [r.getMessage() for r in caplog.records if "module" in r.getMessage()]
        assert len(said) == 1, said
        assert "of another version: counting with the script" in said[0]
        calls = _calls(client)
        assert calls["meterline.counters"] == 1  # refused once, then never asked again
        assert calls["evalsha"] >= 3
    finally:
        store.close()
        client.close()
        proc.terminate()
        proc.wait(timeout=15)


def test_a_replica_without_the_module_follows_a_master_with_it(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The module's writes reach replicas (and the AOF) as plain Redis commands: a replica that has no
    module holds exactly the master's counters, ready to be promoted."""
    taken: set[int] = set()
    master_port, replica_port = free_port(taken), free_port(taken)
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    master = _redis_on(master_port, tmp_path / "m", *_loading(request, True))
    replica = _redis_on(replica_port, tmp_path / "r", "--replicaof", "127.0.0.1", str(master_port))
    url = f"redis://127.0.0.1:{master_port}/0"
    store = RedisCounterStore(url, prefix="copy:", flush_interval_s=3600)
    clients = [redis.Redis(port=master_port), redis.Redis(port=replica_port)]
    try:
        deadline = time.monotonic() + 15
        while clients[1].info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not follow its master"
            time.sleep(0.05)
        _play(store, random.Random(7), 300, ("", "org_a"))
        assert clients[0].execute_command("WAIT", 1, 5000) == 1
        on_master, on_replica = (_contents(client, "copy:") for client in clients)
        assert on_replica == on_master
        assert len(on_master) > 3
        assert _calls(clients[0])["meterline.counters"] > 0
    finally:
        store.close()
        for client in clients:
            client.close()
        for proc in (master, replica):
            proc.terminate()
            proc.wait(timeout=15)


def _mutated(rng: random.Random, request: bytes) -> bytes:
    """A call's request damaged as a stray client or a bug could send it."""
    choice = rng.random()
    data = bytearray(request)
    if choice < 0.4:
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice < 0.6:
        return bytes(data[: rng.randrange(len(data))])
    if choice < 0.8:  # a well-formed MessagePack value of the wrong shape

        def value(depth: int) -> Any:
            kind = rng.randrange(5 if depth < 4 else 3)
            if kind == 0:
                return rng.choice([0, 1, -1, 2**31, -(2**63), 2**63 - 1, 2**64 - 1, 10**6])
            if kind == 1:
                return rng.choice(["", "w", "9" * 40, "-", "x" * 300])
            if kind == 2:
                return None
            return [value(depth + 1) for _ in range(rng.randrange(12))]

        parts = msgpack.unpackb(request)
        parts[rng.randrange(len(parts))] = value(0)
        return msgpack.packb(parts)
    if choice < 0.9:  # one number of the request (a key index, a counter, a record, an amount) out of range
        parts = msgpack.unpackb(request)
        places: list[tuple[list[Any], int]] = []

        def walk(items: list[Any]) -> None:
            for place, item in enumerate(items):
                if isinstance(item, list):
                    walk(item)
                elif isinstance(item, int):
                    places.append((items, place))

        walk(parts)
        if places:
            items, place = rng.choice(places)
            items[place] = rng.choice([0, -1, 2**63 - 1, -(2**63), 2**31, 2**32 + 1, items[place] + 1])
        return msgpack.packb(parts)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))


def test_malformed_calls_are_refused_and_leave_the_module_s_redis_up(redis_module_url_clean: str) -> None:
    """The module parses what a call sends; whatever that is (damaged, cut short, of the wrong shape, a
    key count that does not match), Redis answers an error or an answer and keeps serving: a module
    that crashed would take every counter down with it."""
    store = RedisCounterStore(redis_module_url_clean, prefix=PREFIX, flush_interval_s=3600)
    sent: list[tuple[Any, ...]] = []
    send = store._send_command
    store._send_command = lambda *args: sent.append(args) or send(*args)  # type: ignore[assignment]
    try:
        rng = random.Random(11)
        _play(store, random.Random(3), 60, ("", "org_a"))
    finally:
        store._send_command = send  # type: ignore[assignment]
        store.close()
    calls = [args for args in sent if args[0] == redis_counters.MODULE_COMMAND]
    assert len(calls) > 20
    client = redis.Redis.from_url(redis_module_url_clean)
    errors = 0
    try:
        for _ in range(3000):
            command = list(rng.choice(calls))
            count = int(command[2])
            place = 3 + count  # the request
            if rng.random() < 0.1:
                command[2] = rng.choice([count + 1, count - 1, -1, len(command)])
            else:
                command[place] = _mutated(rng, command[place])
            try:
                client.execute_command(*command)
            except redis.ResponseError:
                errors += 1
        assert client.ping()
        assert errors > 1000
    finally:
        client.close()


def test_a_redis_that_loads_or_unloads_the_module_is_followed_without_a_restart(
    shared_redis: RedisServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis given the module at run time (MODULE LOAD) is counted with it once the store asks again
    (each minute; here at once), with every counter as the script left it; a Redis that loses it
    (MODULE UNLOAD, a restart without it) is counted with the script again, said once."""
    port = free_port()
    proc = _redis_on(port, tmp_path, "--enable-module-command", "yes")
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600, module_again_s=0.0)
    client = redis.Redis.from_url(url)
    try:
        day = fixed("day", 4, 100)
        store.seed([seed_fixed("day", used=3)], NOW)
        assert store.reserve([hold("h1", day)], NOW)[0].admitted
        before = _calls(client)
        assert before["evalsha"] > 0
        assert before["meterline.counters"] == 0
        client.execute_command("MODULE", "LOAD", str(request.getfixturevalue("redis_module")))
        store.settle([Settlement("h1", (2,))], NOW)
        assert store.reserve([hold("h2", day)], NOW)[0].admitted  # the settlement rides with it
        assert _calls(client) == {"evalsha": before["evalsha"], "meterline.counters": 1}
        with caplog.at_level("WARNING", logger="meterline.quotas.redis"):
            client.execute_command("MODULE", "UNLOAD", "meterline")
            assert store.levels([day], NOW) == [Level(9, DAY_END)]
            assert store.levels([day], NOW) == [Level(9, DAY_END)]
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1, said
        assert "no longer answers with Meterline's module" in said[0]
    finally:
        store.close()
        client.close()
        proc.terminate()
        proc.wait(timeout=15)


def test_a_redis_user_not_allowed_the_module_s_command_counts_with_the_script(
    redis_module_url_clean: str, shared_redis_with_module: RedisServer
) -> None:
    """Meterline's Redis user with a command list (ACL) that leaves the module's command out: Redis refuses
    it before it runs (NOPERM), and the store counts with the script instead of failing every decision."""
    admin = redis.Redis.from_url(redis_module_url_clean)
    admin.execute_command(
        "ACL", "SETUSER", "counting", "on", ">pw", "~*", "&*", "+@all", "-meterline.counters"
    )
    url = f"redis://counting:pw@127.0.0.1:{shared_redis_with_module.port}/0"
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600)
    try:
        day = fixed("day", 4, 10)
        store.seed([seed_fixed("day", used=3)], NOW)
        assert store.reserve([hold("h1", day)], NOW)[0].admitted
        assert store.levels([day], NOW) == [Level(7, DAY_END)]
    finally:
        store.close()
        admin.execute_command("ACL", "DELUSER", "counting")
        admin.close()


def test_the_start_up_line_s_probe_never_stops_a_start(
    shared_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """How Redis counts is asked with a call of the module's command; a Redis that refuses it for another
    reason (out of memory, a replica) is not a reason not to start: the line says Redis did not say."""
    port = free_port()
    proc = _redis_on(port, tmp_path, *_loading(request, True))
    url = f"redis://127.0.0.1:{port}/0"
    mark = redis_counters.RedisMark(url)
    client = redis.Redis.from_url(url)
    try:
        assert mark.counting_with() == "Meterline's Redis module"
        client.config_set("maxmemory", 1)
        assert mark.counting_with().startswith("the script or the module (Redis did not say: ")
    finally:
        client.config_set("maxmemory", 0)
        mark.close()
        client.close()
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_a_decision_while_its_slot_moves_runs_whole_or_not_at_all(
    request: pytest.FixtureRequest, module: bool
) -> None:
    """Resharding moves a slot's keys one MIGRATE at a time: for a while an organization's counters are on
    one master and its holds on the other. A decision then is refused whole (TRYAGAIN: unavailable),
    never half-applied, and its buffered settlement lands once the slot has moved."""
    cluster: RedisCluster = request.getfixturevalue(
        "shared_redis_cluster_with_module" if module else "shared_redis_cluster"
    )
    url = request.getfixturevalue("redis_cluster_module_url_clean" if module else "redis_cluster_url_clean")
    store = RedisCounterStore(url, prefix=PREFIX, flush_interval_s=3600, socket_timeout_s=2)
    counters = f"{PREFIX}{{org_s}}counters"
    home = cluster.master_of(counters)
    elsewhere = next(port for port in cluster.master_ports() if port != home)
    slot = cluster.command(home, "CLUSTER", "KEYSLOT", counters).strip()
    try:
        day = fixed("org_s|day", 5, 100)
        store.seed([seed_fixed("org_s|day")], NOW)
        assert store.reserve([Hold("s1", (day,), NOW + LEASE, "org_s")], NOW)[0].admitted
        store.settle([Settlement("s1", (4,), "org_s")], NOW)
        # Half-way through a move: the counters on the new master, the holds still on the old one.
        target_id = cluster.command(elsewhere, "CLUSTER", "MYID").strip()
        source_id = cluster.command(home, "CLUSTER", "MYID").strip()
        cluster.command(elsewhere, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        cluster.command(home, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        auth = ["AUTH", cluster.password] if cluster.password else []
        moved = cluster.command(
            home, "MIGRATE", "127.0.0.1", str(elsewhere), "", "0", "5000", *auth, "KEYS", counters
        )
        assert "OK" in moved, moved
        with pytest.raises(CounterStoreUnavailable):
            store.reserve([Hold("s2", (day,), NOW + LEASE, "org_s")], NOW)
        assert store.pending == 1  # the settlement waits: nothing of that call ran
        cluster.move(counters, elsewhere)  # the rest of the slot's keys, and the slot
        assert store.reserve([Hold("s3", (day,), NOW + LEASE, "org_s")], NOW)[0].admitted
        assert store.levels([day], NOW) == [Level(9, DAY_END)]  # 4 settled once, 5 reserved by s3
        assert store.pending == 0
    finally:
        store.close()
        if cluster.master_of(counters) == home:
            cluster.move(counters, elsewhere)  # a move left half-way ends (other tests share the cluster)
        cluster.move(counters, home)
