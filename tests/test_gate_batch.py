"""POST /v1/gate/batch: each decision is exactly what POST /v1/gate answers for its body, in
order; a bad item gets its own error in its place and the rest are decided."""

from __future__ import annotations

from tests.helpers import assert_error


def without_age(decision: dict) -> dict:
    """A decision but its `age_ms` (how old the view was: it moves between two calls)."""
    assert isinstance(decision.get("age_ms"), int) or "error" in decision, decision
    return {k: v for k, v in decision.items() if k != "age_ms"}


def test_a_batch_answers_exactly_what_the_single_calls_answer(compute, admin, new_org):
    rich, broke, capped = new_org(), new_org(), new_org()
    admin.post(f"/v1/orgs/{broke}/credits", json={"kind": "adjustment", "amount_micros": -5_000_000})
    admin.put(f"/v1/orgs/{capped}/limits", json={"max_disk_mb": 100,
                                                 "machine_quotas": {"us-central1": {"a3-highgpu-8g": 1}}})
    compute.post("/v1/leases", json={"org_id": capped, "lease_id": "one",
                                     "resources": {"machine_type": "a3-highgpu-8g", "region": "us-central1"}})
    checks = [{"org_id": org, "action": action, "resources": resources}
              for org in (rich, broke, capped)
              for action in ("create", "wake", "ingest", "purchase")
              for resources in ({}, {"disk_mb": 500}, {"machine_type": "a3-highgpu-8g", "region": "us-central1"},
                                {"quantity": 9})]
    batch = compute.post("/v1/gate/batch", json={"checks": checks})
    assert batch.status_code == 200, batch.text
    singles = [without_age(compute.post("/v1/gate", json=check).json()) for check in checks]
    assert [without_age(d) for d in batch.json()["decisions"]] == singles
    assert {d["reason"] for d in singles} >= {"ok", "resource_limit", "concurrency_limit"}
    assert any(d["reason"] != "ok" for d in singles if d["balance_micros"] <= 0)


def test_bad_items_are_refused_alone_and_in_place(compute, new_org):
    org = new_org()
    good = {"org_id": org, "action": "create"}
    checks = [good, {"org_id": org, "action": "explode"}, {"org_id": "org_that_is_not_there", "action": "wake"},
              "not an object", {**good, "colour": "blue"}, good]
    body = compute.post("/v1/gate/batch", json={"checks": checks}).json()
    decisions = body["decisions"]
    assert len(decisions) == len(checks)
    assert without_age(decisions[0]) == without_age(decisions[5]) == without_age(
        compute.post("/v1/gate", json=good).json())
    assert (decisions[1]["error"]["code"], decisions[1]["error"]["status"], decisions[1]["error"]["field"]) == (
        "invalid_request", 422, "action")
    assert (decisions[2]["error"]["code"], decisions[2]["error"]["status"]) == ("unknown_org", 404)
    assert decisions[3]["error"]["status"] == 422 and decisions[4]["error"]["status"] == 422


def test_a_batch_is_bounded_and_needs_the_service_token(compute, admin, service, new_org):
    import httpx

    org = new_org()
    assert_error(compute.post("/v1/gate/batch", json={"checks": [{"org_id": org, "action": "create"}] * 1_001}),
                 413, "too_many_checks")
    assert_error(compute.post("/v1/gate/batch", json={"checks": "all"}), 422, "invalid_request", "checks")
    assert compute.post("/v1/gate/batch", json={"checks": []}).json() == {"decisions": []}
    # A full batch of full bodies is over the 64 KiB of ordinary requests: it has the usage limit.
    full = {"org_id": org, "action": "create", "resources": {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 20480,
                                                             "machine_type": "a3-highgpu-8g", "region": "us-central1"}}
    decisions = compute.post("/v1/gate/batch", json={"checks": [full] * 1_000}).json()["decisions"]
    assert len(decisions) == 1_000 and without_age(decisions[0]) == without_age(decisions[-1])
    assert without_age(decisions[0]) == without_age(compute.post("/v1/gate", json=full).json())
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        assert_error(anonymous.post("/v1/gate/batch", json={"checks": []}), 401, "unauthorized")
