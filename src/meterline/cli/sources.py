"""Where the reading commands (``usage``, ``history``, ``top``, ``export``) get their figures: a running
server through the SDK (``--url``/``--api-key`` or ``$METERLINE_URL``/``$METERLINE_API_KEY``), or the
local database with ``--org``.

The local mode runs the same HTTP application in process, on the configured database, as an
organization-wide reader of ``--org`` (the operator has the database, so no key is needed). Every figure
therefore comes from the same routes and renderers as over HTTP. Nothing is started: no background
tasks, no recovery of reservations, so it is safe next to a running server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from meterline.cli.common import fail, services_for
from meterline.sdk import Client, MeterlineError

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="METERLINE_URL", help="A Meterline server (default: $METERLINE_URL)."),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="METERLINE_API_KEY", help="Its API key (default: $METERLINE_API_KEY)."),
]
OrgOption = Annotated[
    str | None,
    typer.Option("--org", help="Read the local database instead, as this organization (no server needed)."),
]
WorkspaceOption = Annotated[
    str | None, typer.Option("--workspace", help="Narrow an organization-wide view to one workspace.")
]
LOCAL_URL = "http://meterline.local"


@contextmanager
def client_for(
    url: str | None,
    api_key: str | None,
    org: str | None,
    workspace: str | None,
    config: Path | None,
    database_url: str | None,
) -> Iterator[Client]:
    """A client of the server, or of the local database for ``org``; SDK errors end the command with
    the server's message."""
    try:
        if org is not None:
            with _local(org, workspace, config, database_url) as client:
                yield client
            return
        if not url:
            fail(
                "say where to read: --url and --api-key (or $METERLINE_URL and $METERLINE_API_KEY) for a "
                "server, or --org ORG_ID for the local database",
                2,
            )
        if not api_key:
            fail("--url needs --api-key (or $METERLINE_API_KEY)", 2)
        with Client(url, api_key, workspace_id=workspace) as client:
            yield client
    except MeterlineError as exc:
        fail(str(exc))


@contextmanager
def _local(
    org: str, workspace: str | None, config: Path | None, database_url: str | None
) -> Iterator[Client]:
    from starlette.testclient import TestClient

    from meterline.api.app import create_app
    from meterline.api.auth import principal_of
    from meterline.tenancy import Principal

    with services_for(config, database_url) as services:
        organization = services.tenancy.get_organization(org)  # NotFound names it
        if workspace is not None and services.tenancy.get_workspace(workspace).organization_id != org:
            fail(f"workspace {workspace} is not a workspace of organization {org}", 2)
        workspaces, _ = services.tenancy.list_workspaces(organization.id, limit=1)
        principal = Principal(organization.id, workspaces[0].id if workspaces else "", "organization")
        app = create_app(services.settings, services=services)
        app.dependency_overrides[principal_of] = lambda: principal
        # Starlette's in-process client: requests go through the real routes, without a socket. It is not
        # entered as a context manager, so the app's lifespan (background tasks, recovery of
        # reservations) never runs.
        asgi = TestClient(app, base_url=LOCAL_URL, raise_server_exceptions=False)
        http = httpx.Client(transport=InProcess(asgi))
        try:
            yield Client(LOCAL_URL, None, workspace_id=workspace, http_client=http)
        finally:
            http.close()
            asgi.close()


class InProcess(httpx.BaseTransport):
    """An httpx transport that hands each request to Starlette's in-process client (which speaks its
    own httpx fork, so it cannot be the SDK's client itself)."""

    def __init__(self, asgi: Any) -> None:
        self._asgi = asgi

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self._asgi.request(
            request.method,
            str(request.url),
            headers=list(request.headers.multi_items()),
            content=request.read(),
        )
        return httpx.Response(
            answer.status_code, headers=list(answer.headers.multi_items()), content=answer.content
        )
