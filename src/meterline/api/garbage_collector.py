"""A serving process's garbage collector: start-up's objects kept out of its walks, and fewer walks of
the young ones.

Python's cyclic collector walks every object of the generations it collects:

* The oldest generation holds everything start-up made and never frees: the tokenizer's tables, the
  price tables, SQLAlchemy's and pydantic's models, the application's routes. Each full collection walked
  all of it again, though none of it is ever garbage. ``perf`` of two SQLite workers under the gateway
  load: 13 % of their CPU in the collector (``gc_collect_main``, ``visit_decref``, ``visit_reachable``).
  ``tune`` moves start-up's objects to a generation the collector never walks (``gc.freeze``): 4.5 to
  5.1 %.
* The youngest generation was collected every 700 net new container objects: a request makes thousands,
  so each request paid for several walks of what every request in flight still holds. Collected every
  ``YOUNG_THRESHOLD``, most of a request's objects are freed by their reference counts first: 1.4 %.
  Alternated three times with one and with two SQLite workers: the CPU per gateway request 2 to 19 %
  lower in each of the six pairs (docs/benchmarks.md, "The garbage collector out of the way").

Frozen objects are still freed when their last reference goes. A cycle that holds one is never
collected, with whatever it holds: a full collection runs first and frees what start-up left in cycles,
and a start-up object that later dies in a cycle is kept once, so what can be kept is bounded by what
start-up made. ``restore`` gives the objects back to the collector and its thresholds back, when the
application stops: for a process that goes on (a test that starts and stops applications), not for
the server, which exits.

Only serving processes do this (``meterline serve`` and ``meterline demo``, through ``create_app(...,
tune_collector=True)``): an application made in a process that goes on making others would freeze
their objects too. One at a time: ``restore`` undoes only what ``tune`` did.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7_000  # Python's default is 700
_before: tuple[int, int, int] | None = None  # the thresholds ``tune`` replaced; None: not tuned


def tune() -> int:
    """Collect, freeze every object the process holds now, and collect the youngest generation less
    often; answers how many objects were frozen. Tuned already: nothing more is frozen."""
    global _before
    if _before is None:
        gc.collect()
        gc.freeze()
        _before = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, _before[1], _before[2])
    return gc.get_freeze_count()


def restore() -> None:
    """Give what ``tune`` froze back to the collector (its oldest generation), and its thresholds; not
    tuned: nothing."""
    global _before
    if _before is None:
        return
    gc.unfreeze()
    gc.set_threshold(*_before)
    _before = None
