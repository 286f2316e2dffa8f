"""The in-editor usage bar (seed 002): ``/widget/usage-bar``, a small page an editor embeds in its
header, and its JSON twin ``/widget/usage-bar.json``, which the page polls to follow a stream's credits
as they are consumed (``GET /v1/usage`` counts running streams' consumption as ``in_flight``).

Short polling rather than server-sent events: one small read per interval, no connection held open per
open editor, and it works through every proxy.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from meterline.api import session as sessions
from meterline.api.auth import ServicesDep
from meterline.api.dashboard_pages import Twins
from meterline.api.responses import JSON
from meterline.api.routes.dashboard import html, signed_in, to_sign_in
from meterline.dashboard import views
from meterline.dashboard.templating import render

router = APIRouter(prefix="/widget", include_in_schema=False)

PollMs = Annotated[int, Query(ge=200, le=60_000, description="How often the bar refreshes, in ms.")]


@router.get("/usage-bar")
def usage_bar(request: Request, services: ServicesDep, poll_ms: PollMs = 2000) -> Response:
    session = sessions.read_session(request, services)
    if session is None:
        return to_sign_in(request)
    state = views.usage_bar(Twins(request, session.principal, services).summary())
    # Embeddable by pages of this same site (the editor); never by another site.
    links = views.links(services.settings.upgrade_url, services.settings.referral_url)
    return html(render("usage_bar.html", bar=state, poll_ms=poll_ms, links=links), frames="'self'")


@router.get("/usage-bar.json")
def usage_bar_twin(request: Request, services: ServicesDep) -> JSON:
    session = signed_in(request, services)
    state = views.usage_bar(Twins(request, session.principal, services).summary())
    return JSON(state, headers={"Cache-Control": "no-store"})
