"""Test doubles that are real servers: a fake OpenAI/Anthropic upstream on loopback (``fake_upstream``).

Names are imported lazily so that ``python -m meterline.testing.fake_upstream`` does not import its own
module twice (once through this package, once as ``__main__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterline.testing.fake_upstream import MESSAGE_OVERHEAD, MODES, PIECE, FakeUpstream, RecordedRequest

__all__ = ["MESSAGE_OVERHEAD", "MODES", "PIECE", "FakeUpstream", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("meterline.testing.fake_upstream"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
