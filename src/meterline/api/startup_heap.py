"""What a serving process built at start-up, kept out of the cyclic garbage collector's walks.

Python's collector walks every object of the generations it collects, and the oldest generation holds
everything start-up made and never frees: the tokenizer's tables, the price tables, SQLAlchemy's and
pydantic's models, the application's routes. Each full collection walked all of it again, though none
of it is ever garbage. ``perf`` of two SQLite workers under the gateway load: 13 % of their CPU in the
collector (``gc_collect_main``, ``visit_decref``, ``visit_reachable``); with start-up's objects frozen
(``gc.freeze``: moved to a generation the collector never walks), 4.5 % (docs/benchmarks.md, "The
start-up heap frozen").

Frozen objects are still freed when their last reference goes; only a cycle among them would never be
collected, so a full collection runs first and frees what start-up left in cycles. ``thaw`` gives
the objects back to the collector when the application stops: for a process that goes on (a test
that starts and stops applications), not for the server, which exits.

Only ``meterline serve`` freezes (``create_app(..., freeze_heap=True)``): an application made
in a process that goes on making others would freeze their objects too.
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect, then freeze every object the process holds now; answers how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give frozen objects back to the collector (its oldest generation)."""
    gc.unfreeze()
