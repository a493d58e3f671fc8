"""The served OpenAPI document describes every route, the hot-path bodies included, and
Schemathesis driving every operation from it (with the admin, service, an org's and a bad
token) never gets a 5xx, and every answer it gets (status, content type, body) is one the
document gives the operation; errors have the documented error shape."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from schemathesis.core.failures import FailureGroup

from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN

EXAMPLES_PER_OPERATION = 6  # bounded: CI time, not coverage, sets it; the soak goes further
# Moving the shared test clock would shift time for the rest of the session; the gate feed
# is a stream that never ends by itself (its bad input is tested in test_gate_client.py).
NOT_FUZZED = ("/v1/test-clock", "/v1/gate/feed")


@pytest.fixture(scope="session")
def openapi_document(service) -> dict:
    return httpx.get(f"{service.base_url}/openapi.json", timeout=30).json()


@pytest.fixture(scope="session")
def tokens(service, admin, new_org_session) -> dict[str, str]:
    org_token = admin.post(f"/v1/orgs/{new_org_session}/tokens", json={}).json()["token"]
    return {"admin": ADMIN_TOKEN, "service": SERVICE_TOKEN, "org": org_token, "bad": "not-a-token-0123456789"}


@pytest.fixture(scope="session")
def new_org_session(admin) -> str:
    org_id = "org_fuzz_owner"
    admin.post("/v1/orgs", json={"org_id": org_id, "email": "fuzz@example.com"})
    return org_id


@pytest.fixture(scope="session")
def api_schema(openapi_document):
    document = {**openapi_document,
                "paths": {p: ops for p, ops in openapi_document["paths"].items() if not p.startswith(NOT_FUZZED)}}
    return schemathesis.openapi.from_dict(document)


def test_hot_path_and_webhook_bodies_are_in_the_document(openapi_document):
    paths = openapi_document["paths"]
    schemas = openapi_document["components"]["schemas"]
    for path, body in (("/v1/gate", "GateBody"), ("/v1/leases", "LeaseBody"), ("/v1/usage", "TypedUsageBody"),
                       ("/webhooks/svix", "SvixEvent"), ("/webhooks/stripe", "StripeEvent")):
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert body in schemas
        assert {"400", "422"} <= set(operation["responses"])
    tick = schemas["TickIn"]
    assert {"tick_id", "org_id", "started_at", "duration_ms"} <= set(tick["required"])
    assert tick["properties"]["duration_ms"]["maximum"] == 3_600_000
    assert sorted(schemas["GateBody"]["properties"]["action"]["enum"]) == ["create", "ingest", "purchase", "wake"]


def test_no_operation_answers_a_5xx_or_an_undocumented_error(api_schema, service, tokens):
    """Valid and invalid examples of every operation (Schemathesis' positive and negative
    modes), each sent with a token drawn from admin, service, an org's and a bad one."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 25
    failures: list = []
    parser_refusals: list = []  # requests HAProxy 2.8's parser refused with its own page (haproxy#3032)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode), role=st.sampled_from(sorted(tokens)))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def send(case, role: str) -> None:
                response = case.call(base_url=service.base_url, timeout=60,
                                     headers={**(case.headers or {}), "Authorization": f"Bearer {tokens[role]}"})
                if _haproxy_parser_refusal(response):
                    parser_refusals.append((operation.label, mode.value, case.path, case.query))
                    return
                problem = _problem(response) or _undocumented(case, response)
                if problem:
                    failures.append((operation.label, mode.value, role, response.status_code, problem))

            try:
                send()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to make invalid (no parameters)
    assert failures == [], failures[:5]
    if parser_refusals:
        print(f"{len(parser_refusals)} requests refused by HAProxy's parser with its own page (blocked upstream, "
              f"tests/test_security.py): {parser_refusals[:3]}")


def _haproxy_parser_refusal(response) -> bool:
    """HAProxy's built-in 400 page, which its parser answers with whatever the error files say
    before 3.2 (haproxy#3032): the one answer not in metergate's shape, and only on a HAProxy
    that old; tests/test_security.py holds the rest to it (xfail until Ray ships a newer one)."""
    from tests.test_security import PARSER_TAKES_ERROR_FILES_FROM, haproxy_version

    return (response.status_code == 400 and response.text.startswith("<html><body><h1>400 Bad request</h1>")
            and haproxy_version() < PARSER_TAKES_ERROR_FILES_FROM)


def _undocumented(case, response) -> str | None:
    """The answer's status, content type and body are those the document gives the operation."""
    try:
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance])
    except FailureGroup as failed:  # a BaseExceptionGroup: Schemathesis' report of what differs
        return "not as documented: " + "; ".join(str(e).splitlines()[0] + " " + " ".join(str(e).split())[:300]
                                                 for e in failed.exceptions)
    return None


def _problem(response) -> str | None:
    if response.status_code >= 500:
        return response.text[:300]
    if response.status_code < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not the error shape: {response.text[:300]}"
    if not (isinstance(error.get("code"), str) and error["code"] and isinstance(error.get("message"), str)):
        return f"not the error shape: {response.text[:300]}"
    return "a traceback" if "Traceback" in response.text else None
