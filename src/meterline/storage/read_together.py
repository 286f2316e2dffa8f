"""Reads asked for by concurrent threads, answered by one read for all of them.

The event API looks up a batch's idempotency keys before it asks the limits (a repeat gets its first
answer even once the limit is full), from a worker thread per request. Each look-up alone was a pooled
connection, a transaction and a statement: with 64 clients, up to 40 of them at once (one per worker
thread, most of a process's PostgreSQL connections) and ~150 µs of a SQLite server's CPU each.

Here the first thread to ask reads for every question queued when it starts, and those that ask
meanwhile wait. Once its read is done, one of them (the first) reads for all that queued since, and so
on: no thread of its own, one read at a time, and a question is never answered by a read that began
before it was asked (so it sees every write committed before it was asked). A read that fails fails
every question it was reading for.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Q = TypeVar("Q")
A = TypeVar("A")


def _own(error: BaseException) -> BaseException:
    """A copy of the read's error for one waiting asker to raise: every ``raise`` adds its thread's frames
    to the exception's traceback, and one shared object would carry every asker's. The read's own error
    is its cause (its traceback is where the read failed)."""
    try:
        own = copy.copy(error)
    except Exception:  # an exception that cannot be copied: the shared one, tracebacks mixed
        return error
    own.__cause__ = error
    return own


class _Asked(Generic[Q, A]):
    __slots__ = ("answer", "done", "error", "leads", "question")

    def __init__(self, question: Q) -> None:
        self.question = question
        self.answer: A | None = None
        self.error: BaseException | None = None
        self.leads = False  # woken to read for those queued, not with an answer
        self.done = threading.Event()


class ReadTogether(Generic[Q, A]):
    """``ask(q)`` answers ``read_all([..., q, ...])[i]``: ``read_all`` answers a list of questions in order
    (one transaction, say)."""

    def __init__(self, read_all: Callable[[Sequence[Q]], Sequence[A]]) -> None:
        self._read_all = read_all
        self._lock = threading.Lock()
        self._queued: list[_Asked[Q, A]] = []
        self._reading = False  # a thread reads, or is about to: the others queue

    def ask(self, question: Q) -> A:
        asked: _Asked[Q, A] = _Asked(question)
        with self._lock:
            self._queued.append(asked)
            leads = not self._reading
            self._reading = True
        if not leads:
            asked.done.wait()
        if leads or asked.leads:
            self._read_queued(asked)
            if asked.error is not None:
                raise asked.error  # this thread's read failed
        elif asked.error is not None:
            raise _own(asked.error)
        return asked.answer  # type: ignore[return-value]  # set by the read (None only as an answer)

    def _read_queued(self, reader: _Asked[Q, A]) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
        try:
            answers = self._read_all([asked.question for asked in batch])
            for asked, answer in zip(batch, answers, strict=True):
                asked.answer = answer
        except BaseException as exc:  # every question's: each asker raises it
            for asked in batch:
                asked.error = exc
        with self._lock:
            if self._queued:
                following = self._queued[0]
                following.leads = True
                following.done.set()
            else:
                self._reading = False
        for asked in batch:
            if asked is not reader:
                asked.done.set()
