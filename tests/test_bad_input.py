"""Bad input gets its 4xx with a clear error body, and changes nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN, assert_error, footprint, hour_tick


@pytest.fixture
def org(new_org):
    return new_org()


def test_malformed_json_is_400_everywhere(admin, compute, sql, org):
    before = footprint(sql, org)
    for path, client in (("/v1/gate", compute), ("/v1/leases", compute), ("/v1/usage", compute),
                         ("/v1/orgs", admin), (f"/v1/orgs/{org}/credits", admin)):
        assert_error(client.post(path, content=b'{"org_id": "x",'), 400, "invalid_json")
    assert footprint(sql, org) == before


def test_wrong_types_are_422_naming_the_field(admin, compute, sql, org):
    before = footprint(sql, org)
    assert_error(compute.post("/v1/gate", json={"org_id": org, "action": "create", "resources": {"memory_mb": "4GB"}}),
                 422, "invalid_request", "memory_mb")
    assert_error(compute.post("/v1/gate", json={"org_id": org, "action": "explode"}), 422, "invalid_request", "action")
    assert_error(compute.post("/v1/leases", json={"org_id": org, "lease_id": "x", "ttl_s": 0}), 422,
                 "invalid_request", "ttl_s")
    assert_error(compute.post("/v1/usage", json={"ticks": "all of them"}), 422, "invalid_request", "ticks")
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": "100"}),
                 422, "invalid_request", "amount_micros")
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "gift", "amount_micros": 100}),
                 422, "invalid_request", "kind")
    assert_error(admin.post("/v1/orgs", json={"org_id": "bad id with spaces", "email": "a@b.co"}),
                 422, "invalid_request", "org_id")
    assert_error(admin.put(f"/v1/orgs/{org}/tier", json={"tier": "platinum"}), 422, "invalid_request", "tier")
    assert_error(admin.put(f"/v1/orgs/{org}/plan", json={"plan_id": "no_such_plan"}), 422, "unknown_plan")
    assert footprint(sql, org) == before


def test_negative_zero_and_huge_amounts_are_refused(admin, sql, org):
    before = footprint(sql, org)
    for amount in (-1, 0, 10**12 + 1, 10**30):
        response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": amount})
        assert response.status_code == 422, (amount, response.text)
        assert "amount_micros" in response.text
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "adjustment", "amount_micros": 0}),
                 422, "invalid_amount")
    assert_error(admin.post(f"/v1/orgs/{org}/credits",
                            json={"kind": "grant", "amount_micros": 5, "expires_at": "2001-01-01T00:00:00Z"}),
                 422, "invalid_request", "expires_at")
    assert footprint(sql, org) == before


def test_bad_ticks_are_rejected_one_by_one(compute, sql, org):
    before = footprint(sql, org)
    ticks = [
        {**hour_tick(org, "neg"), "memory_mb": -1},
        {**hour_tick(org, "huge"), "duration_ms": 10**12},
        {**hour_tick(org, "when"), "started_at": 12},
        {**hour_tick(org, "future"), "started_at": "2099-01-01T00:00:00Z"},
        {**hour_tick(org, "unit"), "units": {"teleports": 1}},
        {**hour_tick(org, "extra"), "colour": "blue"},
        "not a tick",
    ]
    body = compute.post("/v1/usage", json={"ticks": ticks}).json()
    assert body["accepted"] == 0
    assert len(body["rejected"]) == len(ticks)
    assert footprint(sql, org) == before


def test_unknown_org_is_404_unknown_org(admin, compute):
    assert_error(compute.post("/v1/gate", json={"org_id": "ghost", "action": "create"}), 404, "unknown_org")
    assert_error(compute.post("/v1/leases", json={"org_id": "ghost", "lease_id": "l"}), 404, "unknown_org")
    assert_error(admin.get("/v1/orgs/ghost"), 404, "unknown_org")
    assert_error(admin.post("/v1/orgs/ghost/credits", json={"kind": "grant", "amount_micros": 5}), 404, "unknown_org")
    assert_error(admin.get("/v1/orgs/ghost/ledger"), 404, "unknown_org")
    assert_error(admin.post("/v1/orgs/ghost/halt"), 404, "unknown_org")


def test_missing_or_wrong_token_is_401_and_the_service_token_on_admin_endpoints_is_403(service, sql, org):
    before = footprint(sql, org)
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        assert_error(anonymous.post("/v1/gate", json={"org_id": org, "action": "create"}), 401, "unauthorized")
        assert_error(anonymous.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5},
                                    headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}), 401, "unauthorized")
        # A valid token without the role is 403, not 401.
        assert_error(anonymous.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5},
                                    headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}), 403, "forbidden")
        assert_error(anonymous.post("/v1/usage", json={"ticks": [hour_tick(org, "x")]},
                                    headers={"Authorization": f"Basic {ADMIN_TOKEN}"}), 401, "unauthorized")
    assert footprint(sql, org) == before


def test_oversize_bodies_are_413_declared_or_streamed(admin, compute, sql, org):
    before = footprint(sql, org)
    big = b'{"org_id": "' + b"x" * 100_000 + b'"}'
    assert_error(admin.post("/v1/orgs", content=big), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit must hold on the streamed bytes
        for _ in range(100):
            yield b" " * 1024

    assert_error(compute.post("/v1/gate", content=chunks()), 413, "payload_too_large")
    too_many = {"ticks": [hour_tick(org, f"m{n}") for n in range(10_001)]}
    assert_error(compute.post("/v1/usage", json=too_many), 413, "too_many_ticks")
    assert footprint(sql, org) == before


def test_unknown_route_is_a_json_404(compute):
    assert_error(compute.get("/v1/nothing-here"), 404, "not_found")


def test_ids_in_the_path_are_validated_like_ids_in_bodies(admin, compute):
    assert_error(admin.get("/v1/orgs/" + "x" * 200), 422, "invalid_request", "org_id")
    assert_error(compute.post("/v1/leases/org%20with%20space/l1/renew"), 422, "invalid_request", "org_id")
    assert_error(compute.delete("/v1/leases/org_1/" + "y" * 129), 422, "invalid_request", "lease_id")
