"""schemathesis against the served OpenAPI schema: no 5xx, and every answer matches the schema."""

from __future__ import annotations

import pytest

from tests import serve_helpers as sh

pytestmark = pytest.mark.slow

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = sh.start_server(tmp_path_factory.mktemp("serve-schema"))
    sh.add_token(srv, "alice", "alice")
    sh.add_token(srv, "ops", "ops", admin=True)
    yield srv
    assert sh.stop_server(srv) == 0


@pytest.mark.parametrize("who", ["alice", "ops"])
def test_schema_holds_for_generated_requests(served, who):
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    headers = {"Authorization": f"Bearer {served.tokens[who]}"}
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # a stream that lasts as long as its job; test_serve.py reads it

        @given(operation.as_strategy())
        @settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers=headers, timeout=30)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation is tried; failures reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(calls) >= 20 and all(code < 500 for code in calls)
