"""Reads asked for by concurrent threads, answered by one read (``storage.read_together``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from meterline.storage.read_together import ReadTogether


class Reads:
    """``read_all``: records each read's questions; the first read waits for ``release`` when ``hold``."""

    def __init__(self, *, hold: bool = False, fail_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_first = fail_first

    def read_all(self, questions: Sequence[int]) -> list[str]:
        self.batches.append(list(questions))
        self.started.set()
        assert self.release.wait(10)
        if self.fail_first and len(self.batches) == 1:
            raise ConnectionError("the database went away")
        return [f"answer {q}" for q in questions]


def queued(together: ReadTogether[int, str], count: int) -> None:
    """Until ``count`` questions wait behind the read under way."""
    deadline = time.monotonic() + 10
    while len(together._queued) < count:
        assert time.monotonic() < deadline, "the askers did not queue"
        time.sleep(0.001)


def ask_in_threads(together: ReadTogether[int, str], questions: range) -> tuple[list[threading.Thread], dict]:
    answers: dict[int, object] = {}

    def ask(q: int) -> None:
        try:
            answers[q] = together.ask(q)
        except ConnectionError as exc:
            answers[q] = exc

    # Daemon threads: a hand-off that left one waiting fails the test rather than hanging the run.
    threads = [threading.Thread(target=ask, args=(q,), daemon=True) for q in questions]
    for thread in threads:
        thread.start()
    return threads, answers


def test_a_lone_question_is_one_read_of_its_own() -> None:
    reads = Reads()
    together: ReadTogether[int, str] = ReadTogether(reads.read_all)
    assert together.ask(7) == "answer 7"
    assert together.ask(8) == "answer 8"
    assert reads.batches == [[7], [8]]


def test_questions_asked_during_a_read_are_answered_by_one_read_that_begins_after_them() -> None:
    reads = Reads(hold=True)
    together: ReadTogether[int, str] = ReadTogether(reads.read_all)
    first, first_answer = ask_in_threads(together, range(1))
    assert reads.started.wait(10)
    others, answers = ask_in_threads(together, range(1, 9))
    queued(together, 8)
    reads.release.set()
    for thread in first + others:
        thread.join(10)
    assert first_answer == {0: "answer 0"}
    assert answers == {q: f"answer {q}" for q in range(1, 9)}
    # Two reads: the one under way when they asked never answers them.
    assert reads.batches[0] == [0]
    assert sorted(reads.batches[1]) == list(range(1, 9))
    assert len(reads.batches) == 2


def test_a_failed_read_fails_its_own_questions_only_and_the_next_read_goes_ahead() -> None:
    reads = Reads(hold=True, fail_first=True)
    together: ReadTogether[int, str] = ReadTogether(reads.read_all)
    first, first_answer = ask_in_threads(together, range(1))
    assert reads.started.wait(10)
    others, answers = ask_in_threads(together, range(1, 4))
    queued(together, 3)
    reads.release.set()
    for thread in first + others:
        thread.join(10)
    assert isinstance(first_answer[0], ConnectionError)
    assert answers == {q: f"answer {q}" for q in range(1, 4)}
    assert together.ask(9) == "answer 9"  # nobody is left reading


def test_those_waiting_on_a_failed_read_raise_each_their_own_error_caused_by_it() -> None:
    reads = Reads(hold=True, fail_first=True)
    together: ReadTogether[int, str] = ReadTogether(reads.read_all)
    first, _ = ask_in_threads(together, range(1))
    assert reads.started.wait(10)
    reads.batches.clear()
    reads.fail_first = False
    reads.release.clear()
    # Queued behind the first read, then all read (and failed) together by one of them.
    failing = Reads(fail_first=True)
    together._read_all = failing.read_all  # type: ignore[method-assign]
    others, answers = ask_in_threads(together, range(1, 4))
    queued(together, 3)
    reads.release.set()
    for thread in first + others:
        thread.join(10)
        assert not thread.is_alive()
    errors = [answers[q] for q in range(1, 4)]
    assert all(isinstance(e, ConnectionError) for e in errors)
    assert len({id(e) for e in errors}) == 3  # three objects: tracebacks not mixed
    assert len({id(e.__cause__) for e in errors if e.__cause__ is not None}) == 1  # the read's own, twice


def test_a_failure_reaches_the_asker() -> None:
    reads = Reads(fail_first=True)
    together: ReadTogether[int, str] = ReadTogether(reads.read_all)
    with pytest.raises(ConnectionError, match="went away"):
        together.ask(1)
    assert together.ask(2) == "answer 2"
