"""Whatever a caller sends, the answer is never a 500 and always the API's error shape."""

from __future__ import annotations

import json
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)

FIELDS = ["org_id", "action", "resources", "lease_id", "ttl_s", "ticks", "tick_id", "started_at",
          "duration_ms", "memory_mb", "cpu_count", "disk_mb", "units", "kind", "amount_micros",
          "expires_at", "note", "email", "plan_id", "billing_mode", "tier", "max_concurrent",
          "max_disk_mb", "machine_quotas", "quantity", "region", "machine_type"]
# Objects built from the API's own field names reach deeper than random keys would.
api_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    api_like.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda v: json.dumps({"ticks": [v]}).encode(), api_like),
    st.binary(max_size=64),
)

ROUTES = [
    ("POST", "/v1/gate", "compute"), ("POST", "/v1/leases", "compute"), ("POST", "/v1/usage", "compute"),
    ("POST", "/v1/leases/{org}/l1/renew", "compute"), ("DELETE", "/v1/leases/{org}/l1", "compute"),
    ("POST", "/v1/orgs", "admin"), ("POST", "/v1/orgs/{org}/credits", "admin"),
    ("PUT", "/v1/orgs/{org}/plan", "admin"), ("PUT", "/v1/orgs/{org}/tier", "admin"),
    ("PUT", "/v1/orgs/{org}/limits", "admin"), ("POST", "/v1/orgs/{org}/halt", "admin"),
    ("GET", "/v1/orgs/{org}/ledger?limit={text}&cursor={text}", "admin"),
    ("GET", "/v1/orgs/{org}/usage?group_by={text}&from={text}", "admin"),
    ("GET", "/billing/{org}?token={text}", "admin"),
    ("POST", "/webhooks/svix", "admin"), ("POST", "/webhooks/stripe", "admin"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies, text=st.text(max_size=12),
       idempotency_key=st.none() | st.text(alphabet=string.ascii_letters + string.digits + "-_:.",
                                           min_size=1, max_size=300))
def test_no_request_gets_a_500_or_a_trace(admin, compute, fuzz_org, route, body, text, idempotency_key):
    method, path, who = route
    client = admin if who == "admin" else compute
    url = path.replace("{org}", fuzz_org).replace("{text}", quote(text, safe=""))
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    response = client.request(method, url, content=body if method != "GET" else None, headers=headers)
    assert response.status_code < 500, (method, url, body, response.text)
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]



@pytest.fixture(scope="module")
def fuzz_org(admin):
    response = admin.post("/v1/orgs", json={"org_id": "fuzz_org", "email": "fuzz@example.com"})
    assert response.status_code in (200, 201)
    return "fuzz_org"
