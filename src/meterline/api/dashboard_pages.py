"""The dashboard's bridge to the JSON API: each page is built from the bodies of its JSON twins, got by
calling the very route functions that answer ``/v1/usage``, ``/v1/usage/timeseries``,
``/v1/usage/breakdown``, ``/v1/alerts``, ``/v1/alerts/webhooks``, ``/v1/organization`` and
``/v1/admin/credits``. No query is written twice, so a page can never show a figure its JSON twin does
not; the Billing page's forms change settings through the same route functions as the JSON API.

Bodies are decoded with ``parse_float=Decimal``: money and credits stay exact on their way to the page.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from fastapi import Request
from starlette.responses import Response

from meterline.api.routes import admin as admin_api
from meterline.api.routes import alerts as alerts_api
from meterline.api.routes import analytics as analytics_api
from meterline.api.routes import organization as organization_api
from meterline.api.routes import usage as usage_api
from meterline.dashboard import views
from meterline.metering.analytics import BreakdownBy, RangeName
from meterline.services import Services
from meterline.tenancy import Principal

ALERTS_SHOWN = 10


def body_of(response: Response) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(bytes(response.body), parse_float=Decimal)
    return decoded


class Twins:
    """The JSON twins of one signed-in request."""

    def __init__(self, request: Request, principal: Principal, services: Services) -> None:
        self.request, self.principal, self.services = request, principal, services

    def _call(self, route: Callable[..., Response], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return body_of(route(*args, **kwargs))

    def summary(self) -> dict[str, Any]:
        return self._call(
            usage_api.get_usage, self.request, self.principal, self.services, identifier_id=None
        )

    def timeseries(self, range_: RangeName) -> dict[str, Any]:
        return self._call(
            analytics_api.get_timeseries,
            self.request,
            self.principal,
            self.services,
            range_=range_,
            by="source",
            identifier_id=None,
        )

    def breakdown(self, by: BreakdownBy, *, limit: int, offset: int = 0) -> dict[str, Any]:
        """This billing period's top ``by`` values (the breakdown's default range)."""
        return self._call(
            analytics_api.get_breakdown,
            self.request,
            self.principal,
            self.services,
            by=by,
            range_=None,
            start=None,
            end=None,
            limit=limit,
            offset=offset,
            identifier_id=None,
        )

    def alerts(self) -> dict[str, Any]:
        return self._call(alerts_api.list_alerts, self.principal, self.services, limit=ALERTS_SHOWN, offset=0)

    def credit_grants(self) -> list[dict[str, Any]]:
        body = self._call(
            admin_api.list_credit_grants, self.services, organization_id=self.principal.organization_id
        )
        grants: list[dict[str, Any]] = body["data"]
        return grants

    def organization(self) -> dict[str, Any]:
        return self._call(organization_api.get_organization, self.principal, self.services)

    def webhooks(self) -> dict[str, Any]:
        return self._call(alerts_api.list_webhooks, self.principal, self.services)

    def export(self, start: str) -> Response:
        return analytics_api.get_export(
            self.request,
            self.principal,
            self.services,
            start=start,
            end=None,
            model=None,
            key_prefix=None,
            identifier_id=None,
            modality=None,
            provider=None,
        )


def usage_twins(twins: Twins, range_: RangeName) -> dict[str, Any]:
    """Every body the usage page is drawn from: the page's JSON twin (``/dashboard/usage.json``)."""
    return {
        "usage": twins.summary(),
        "timeseries": twins.timeseries(range_),
        "models": twins.breakdown("model", limit=views.MODELS_SHOWN),
        "endpoints": twins.breakdown("endpoint", limit=10),
        "tables": {by: twins.breakdown(by, limit=views.TABLE_PAGE) for by, _, _ in views.TABLES},
        "alerts": twins.alerts(),
    }


def usage_context(bodies: dict[str, Any]) -> dict[str, Any]:
    tables = [views.table(by, title, column, bodies["tables"][by]) for by, title, column in views.TABLES]
    return views.usage_page(
        bodies["usage"], bodies["timeseries"], bodies["models"], bodies["endpoints"], tables, bodies["alerts"]
    )


def billing_twins(twins: Twins) -> dict[str, Any]:
    return {
        "usage": twins.summary(),
        "credit_grants": twins.credit_grants(),
        "organization": twins.organization(),
        "webhooks": twins.webhooks(),
    }
