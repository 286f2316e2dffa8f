"""Kept values (``meterline.kept``): answered until they end, read again ahead of that by one caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from meterline.kept import Kept


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Store:
    """What the kept values are read from: counts its reads, fails when told to."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {"a": "a1"}
        self.reads = 0
        self.failing = False
        self.after_reading: Callable[[], None] = lambda: None

    def load(self, key: str) -> str | None:
        self.reads += 1
        if self.failing:
            raise ConnectionError("the database went away")
        value = self.values.get(key)
        self.after_reading()
        return value


@pytest.fixture
def parts() -> tuple[Clock, Store, list[Callable[[], None]], Kept[str, str]]:
    clock, store, jobs = Clock(), Store(), []
    kept: Kept[str, str] = Kept(1.0, store.load, ahead=0.25, clock=clock, background=jobs.append)
    return clock, store, jobs, kept


def read(kept: Kept[str, str], store: Store, key: str) -> str | None:
    """What a caller that may read does when ``get`` answers None."""
    value = kept.get(key)
    if value is None:
        began = kept.began()
        value = store.load(key)
        if value is not None:
            kept.keep(key, value, began)
    return value


def test_a_value_is_answered_until_it_ends_and_never_after(parts) -> None:
    clock, store, jobs, kept = parts
    assert kept.get("a") is None  # nothing kept yet: the caller reads
    assert read(kept, store, "a") == "a1"
    assert store.reads == 1
    clock.now += 0.5
    assert kept.get("a") == "a1"
    clock.now += 0.5  # 1 s after the read began: ended, even though nobody read it again
    assert kept.get("a") is None
    assert jobs == []
    assert store.reads == 1


def test_many_callers_of_a_due_value_start_one_read_and_are_all_answered(parts) -> None:
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    store.values["a"] = "a2"
    clock.now += 0.8  # due (within 0.25 s of its end)
    answers = [kept.get("a") for _ in range(64)]
    assert answers == ["a1"] * 64  # nobody waits for the read, nobody reads themselves
    assert len(jobs) == 1
    assert store.reads == 1
    jobs.pop()()  # the background read
    assert store.reads == 2
    clock.now += 0.5  # past the first value's end, and the second's not due yet
    assert kept.get("a") == "a2"
    assert jobs == []


def test_a_failed_read_leaves_the_value_to_end_on_time_and_the_next_caller_reads(parts) -> None:
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    store.failing = True
    clock.now += 0.75
    assert kept.get("a") == "a1"
    jobs.pop()()  # fails: logged at debug, nothing kept
    clock.now += 0.125
    assert kept.get("a") == "a1"
    assert jobs == []  # claimed once for this value
    clock.now += 0.125  # the value's end
    assert kept.get("a") is None
    store.failing = False
    assert read(kept, store, "a") == "a1"
    assert store.reads == 3


def test_a_forget_during_a_background_read_keeps_nothing_of_it(parts) -> None:
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    clock.now += 0.8
    kept.get("a")
    kept.forget("a")  # a change made through this process, while the read is on its way
    store.values["a"] = "a3"
    jobs.pop()()  # what it read began before the change: not kept
    assert kept.get("a") is None
    assert read(kept, store, "a") == "a3"


def test_a_forget_while_the_old_value_is_being_read_keeps_nothing_of_it(parts) -> None:
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    clock.now += 0.8
    kept.get("a")

    def changed() -> None:  # the change, made through this process once the old value was read
        store.values["a"] = "a4"
        kept.forget("a")

    store.after_reading = changed
    jobs.pop()()  # read "a1", then the change: "a1" is not kept
    store.after_reading = lambda: None
    assert kept.get("a") is None
    assert read(kept, store, "a") == "a4"


def test_a_key_gone_from_the_store_is_forgotten_by_its_background_read(parts) -> None:
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    del store.values["a"]
    clock.now += 0.8
    assert kept.get("a") == "a1"
    jobs.pop()()
    assert kept.get("a") is None  # the caller reads, and says it is gone


def test_forget_where_drops_only_the_keys_it_names(parts) -> None:
    _clock, store, _jobs, kept = parts
    store.values.update({"b": "b1", "c": "c1"})
    for key in "abc":
        read(kept, store, key)
    kept.forget(where=lambda key: key != "b")
    assert [kept.get(k) for k in "abc"] == [None, "b1", None]
    kept.forget()
    assert kept.get("b") is None


def test_past_its_size_everything_kept_is_dropped() -> None:
    store = Store()
    store.values.update({"b": "b1", "c": "c1"})
    kept: Kept[str, str] = Kept(1.0, store.load, ahead=0.25, entries=2, clock=Clock())
    read(kept, store, "a")
    read(kept, store, "b")
    read(kept, store, "c")
    assert [kept.get(k) for k in "abc"] == [None, None, "c1"]


def test_ahead_must_be_within_the_lifetime() -> None:
    with pytest.raises(ValueError, match="ahead"):
        Kept(1.0, Store().load, ahead=1.0)


def test_the_background_read_runs_on_a_refresh_thread_of_its_own() -> None:
    clock, store, read_on = Clock(), Store(), []
    done = threading.Event()

    def load(key: str) -> str | None:
        read_on.append(threading.current_thread())
        value = store.load(key)
        done.set()
        return value

    kept: Kept[str, str] = Kept(1.0, load, ahead=0.25, clock=clock)
    read(kept, store, "a")
    store.values["a"] = "a2"
    clock.now += 0.8
    assert kept.get("a") == "a1"  # answered at once, the read goes on beside it
    assert done.wait(10)
    deadline = time.monotonic() + 10
    while kept.get("a") != "a2":  # kept right after the read returns
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert read_on[0].name.startswith("meterline-refresh")
    assert read_on[0].daemon  # never holds the process open


# -- one read at a time: callers that would all read wait for the one in flight -----------------------
def callers(kept: Kept[str, str], key: str, n: int) -> tuple[list[threading.Thread], list[object]]:
    """``n`` threads calling ``kept.read(key)``: what each got (a value, or the error it raised)."""
    answers: list[object] = []

    def call() -> None:
        try:
            answers.append(kept.read(key))
        except Exception as exc:
            answers.append(exc)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads, answers


def waiting(threads: list[threading.Thread]) -> bool:
    """Every thread still blocked after a moment (they wait for a read held back by the test)."""
    time.sleep(0.2)
    return all(thread.is_alive() for thread in threads)


def test_callers_of_a_value_that_ended_wait_for_the_read_in_flight_instead_of_reading(parts) -> None:
    # A machine too busy for the background read to come back before the value's end: every request in
    # flight then read the value itself (on PostgreSQL, new sessions past the pool's size).
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    store.values["a"] = "a2"
    clock.now += 0.8
    assert kept.get("a") == "a1"  # due: one read claimed
    gate = threading.Event()
    store.after_reading = lambda: gate.wait(10)  # the background read, slow to come back
    background = threading.Thread(target=jobs.pop())
    background.start()
    deadline = time.monotonic() + 10
    while store.reads < 2:  # it has begun
        assert time.monotonic() < deadline
        time.sleep(0.001)
    clock.now += 0.3  # the value ended before it came back
    assert kept.get("a") is None
    threads, answers = callers(kept, "a", 16)
    assert waiting(threads)
    gate.set()
    for thread in [background, *threads]:
        thread.join(10)
    assert answers == ["a2"] * 16
    assert store.reads == 2  # the first read and the background one: nobody read it again
    assert kept.get("a") == "a2"


def test_a_read_ahead_not_begun_yet_is_not_waited_for(parts) -> None:
    # Claimed, but its refresh thread is busy (or stuck): the callers of the ended value read it once.
    clock, store, jobs, kept = parts
    read(kept, store, "a")
    clock.now += 0.8
    kept.get("a")
    clock.now += 0.3
    assert [kept.read("a") for _ in range(3)] == ["a1"] * 3
    assert store.reads == 2
    jobs.pop()()  # begins at last: a caller's read is kept already, and newer, so it reads nothing
    assert store.reads == 2


def test_callers_wait_for_a_hung_read_only_so_long_then_one_of_them_reads_again() -> None:
    clock, store, jobs = Clock(), Store(), []
    kept: Kept[str, str] = Kept(1.0, store.load, ahead=0.25, clock=clock, background=jobs.append, wait_s=0.3)
    hung = threading.Event()
    store.after_reading = lambda: hung.wait(10)  # the first read never answers (until the test ends)
    first, first_answer = callers(kept, "a", 1)
    assert waiting(first)
    store.after_reading = lambda: None
    threads, answers = callers(kept, "a", 6)
    for thread in threads:
        thread.join(10)
    assert answers == ["a1"] * 6
    assert store.reads == 2  # the hung read and one read in its place, not one per caller
    assert [kept.read("a") for _ in range(3)] == ["a1"] * 3  # kept: later callers wait for nothing
    assert store.reads == 2
    hung.set()
    first[0].join(10)
    assert first_answer == ["a1"]


def test_callers_of_a_key_nobody_has_read_yet_make_one_read(parts) -> None:
    _clock, store, jobs, kept = parts
    gate = threading.Event()
    store.after_reading = lambda: gate.wait(10)  # the first caller's read, held back
    threads, answers = callers(kept, "a", 8)
    assert waiting(threads)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert answers == ["a1"] * 8
    assert store.reads == 1
    assert jobs == []


# A timeout of the read itself (a socket's) is its failure too, not the wait for it running out.
@pytest.mark.parametrize("error", [ConnectionError, TimeoutError])
def test_a_failed_read_fails_every_caller_waiting_for_it_and_the_next_caller_reads_again(
    parts, error: type[Exception]
) -> None:
    _clock, store, _jobs, kept = parts
    gate = threading.Event()

    def fail_once_released() -> None:
        gate.wait(10)
        raise error("the database did not answer")

    store.after_reading = fail_once_released
    threads, answers = callers(kept, "a", 4)
    assert waiting(threads)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert [type(answer) for answer in answers] == [error] * 4
    assert store.reads == 1
    store.after_reading = lambda: None
    assert kept.read("a") == "a1"  # nothing of the failure is kept
    assert store.reads == 2


def test_a_caller_after_a_forget_does_not_wait_for_a_read_that_began_before_it(parts) -> None:
    _clock, store, _jobs, kept = parts
    gate = threading.Event()
    store.after_reading = lambda: gate.wait(10)
    threads, answers = callers(kept, "a", 1)
    assert waiting(threads)  # reading "a1", held back
    store.values["a"] = "a5"
    kept.forget("a")  # a change made through this process meanwhile
    store.after_reading = lambda: None
    assert kept.read("a") == "a5"  # read by itself, not "a1" from the read before the change
    gate.set()
    threads[0].join(10)
    assert answers == ["a1"]  # the caller that began before the change
    assert kept.get("a") == "a5"  # and the old read kept nothing


def test_a_caller_may_read_with_a_loader_of_its_own_that_says_why_a_value_is_missing(parts) -> None:
    _clock, store, _jobs, kept = parts

    def or_refusal(key: str) -> str:
        value = store.load(key)
        if value is None:
            raise LookupError(f"{key} is unknown")
        return value

    assert kept.read("a", or_refusal) == "a1"
    with pytest.raises(LookupError, match="b is unknown"):
        kept.read("b", or_refusal)
    assert kept.get("a") == "a1"
