"""The usage dashboard and the in-editor usage bar (SPEC §6, seeds 001 and 002): templates, static files
and the pure view logic that turns the JSON API's bodies into what the pages show.

Nothing here queries storage: every figure comes from the body of a JSON route (``api.routes``), so a
page and its JSON twin can never disagree. HTTP (sessions, routes) lives in ``meterline.api``.
"""

from __future__ import annotations

from meterline.dashboard.allocation import Allocation, allocation_of
from meterline.dashboard.formatting import amount, number, percent

__all__ = ["Allocation", "allocation_of", "amount", "number", "percent"]
