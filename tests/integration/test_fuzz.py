"""A schema-driven fuzzer (schemathesis) against the real app on SQLite and PostgreSQL: no input yields a
5xx, and every 4xx is the error envelope. Authenticated, so the generated bodies reach validation and the
database (PostgreSQL refuses text SQLite takes: NUL, unpaired surrogates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from conftest import ADMIN, ADMIN_KEY, NOW, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import build_services


def test_no_input_yields_a_server_error(database_url: str, tmp_path: Path) -> None:
    app_settings = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
    )
    services = build_services(app_settings, clock=FrozenClock(NOW), migrate=False)
    app = create_app(app_settings, services=services)
    with TestClient(app) as client:
        tenant = make_tenant(client)
        client.post(
            "/v1/events", json={"events": [{"id": "seed", "prompt_tokens": 5}]}, headers=tenant.headers
        )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    def token_for(case: Any) -> str:
        if case.path.startswith("/v1/admin"):
            return ADMIN["Authorization"]
        return tenant.headers["Authorization"]

    cases = [(op.as_strategy(generation_mode=mode), mode) for op in operations for mode in GenerationMode]
    for strategy, mode in cases:

        @given(case=strategy)
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": token_for(case)})
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"]
                assert error["message"]
                # schemathesis keeps every header as a list of values
                assert [error["request_id"]] == response.headers["x-request-id"]

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid form to generate.
            assert mode is GenerationMode.NEGATIVE
    services.close()
