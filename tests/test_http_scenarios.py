"""Scenarios through real HTTP, real Ray, real Postgres."""

from __future__ import annotations

import time
import uuid

from tests.helpers import HOUR_TICK_MICROS, SIGNUP_MICROS, hour_tick, ledger_sum, now_rfc3339, outbox


def test_org_runs_out_of_money_halts_and_a_grant_resumes_it_without_a_lease(admin, compute, sql, new_org):
    org = new_org()
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS
    assert state["max_concurrent"] == 5 and state["tier"] == "base"

    gate = compute.post("/v1/gate", json={"org_id": org, "action": "create",
                                          "resources": {"memory_mb": 4096, "cpu_count": 2}})
    assert gate.status_code == 200
    assert gate.json()["allowed"] is True and gate.json()["reason"] == "ok"

    for n in range(5):
        response = compute.post("/v1/leases", json={"org_id": org, "lease_id": f"sbx_{n}", "ttl_s": 600})
        assert response.status_code == 201, response.text
    over = compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_5", "ttl_s": 600})
    assert over.status_code == 429
    assert over.json()["reason"] == "concurrency_limit" and over.json()["error"]["code"] == "concurrency_limit"
    again = compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_0", "ttl_s": 600})
    assert again.status_code == 200 and again.json()["lease_id"] == "sbx_0"

    ticks = [hour_tick(org, f"t{n}", f"sbx_{n % 5}") for n in range(31)]  # 31 × 165,600 > 5,000,000
    response = compute.post("/v1/usage", json={"ticks": ticks})
    assert response.json() == {"accepted": 31, "duplicates": 0, "rejected": []}

    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS - 31 * HOUR_TICK_MICROS
    assert state["is_halted"] is True
    gate = compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()
    # Its free credit is used up and it has no card: the gateway should ask for one.
    assert (gate["allowed"], gate["reason"], gate["status"]) == (False, "no_payment_method", 402)
    wake = compute.post("/v1/gate", json={"org_id": org, "action": "wake"}).json()
    assert (wake["allowed"], wake["reason"], wake["status"]) == (False, "halted", 402)
    halted = outbox(sql, org, "org.halted")
    assert len(halted) == 1
    assert halted[0]["lease_ids"] == [f"sbx_{n}" for n in range(5)]

    grant = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 10_000_000},
                       headers={"Idempotency-Key": f"grant-{org}"})
    assert grant.status_code == 201, grant.text
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["is_halted"] is False
    assert state["balance_micros"] == SIGNUP_MICROS - 31 * HOUR_TICK_MICROS + 10_000_000
    assert state["active_leases"] == 5  # the credit unblocked; it did not create or wake anything
    assert len(outbox(sql, org, "org.resumed")) == 1
    assert compute.post("/v1/gate", json={"org_id": org, "action": "ingest"}).json()["reason"] == "ok"
    assert ledger_sum(sql, org) == state["balance_micros"]


def test_duplicate_ticks_are_billed_once_and_a_bad_tick_is_rejected_alone(admin, compute, sql, new_org):
    org = new_org()
    good = hour_tick(org, "dup-1")
    bad = {**hour_tick(org, "bad-1"), "duration_ms": -5}
    unknown = hour_tick("no_such_org_x", "t-unknown")
    response = compute.post("/v1/usage", json={"ticks": [good, good, bad, unknown]})
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1 and body["duplicates"] == 1
    errors = {r["tick_id"]: r["error"] for r in body["rejected"]}
    assert "duration_ms" in errors["bad-1"]
    assert errors["t-unknown"] == "unknown_org"

    again = compute.post("/v1/usage", json={"ticks": [good]}).json()
    assert again == {"accepted": 0, "duplicates": 1, "rejected": []}
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS - HOUR_TICK_MICROS
    assert sql.val("SELECT sum(ticks)::int8 FROM usage_rollups WHERE org_id = $1", org) == 1
    assert ledger_sum(sql, org) == state["balance_micros"]


def test_split_ticks_cost_exactly_the_same_as_one_tick(admin, compute, new_org):
    whole, split = new_org(), new_org()
    started = now_rfc3339()
    base = {"lease_id": "s", "started_at": started, "memory_mb": 1000, "cpu_count": 1, "disk_mb": 777}
    compute.post("/v1/usage", json={"ticks": [{**base, "org_id": whole, "tick_id": "w", "duration_ms": 59_999}]})
    parts = [7, 1, 59_991]  # an odd split: no part is a whole micro on its own
    compute.post("/v1/usage", json={"ticks": [
        {**base, "org_id": split, "tick_id": f"p{i}", "duration_ms": d} for i, d in enumerate(parts)]})
    balance_whole = admin.get(f"/v1/orgs/{whole}").json()["balance_micros"]
    balance_split = admin.get(f"/v1/orgs/{split}").json()["balance_micros"]
    assert balance_whole == balance_split < SIGNUP_MICROS


def test_lease_release_frees_the_slot_and_renew_extends_it(admin, compute, new_org):
    org = new_org()
    lease = compute.post("/v1/leases", json={"org_id": org, "lease_id": "a", "ttl_s": 30}).json()
    renewed = compute.post(f"/v1/leases/{org}/a/renew")
    assert renewed.status_code == 200 and renewed.json()["expires_at"] >= lease["expires_at"]
    assert compute.delete(f"/v1/leases/{org}/a").status_code == 204
    assert compute.delete(f"/v1/leases/{org}/a").status_code == 204  # already gone: still 204
    assert admin.get(f"/v1/orgs/{org}").json()["active_leases"] == 0
    missing = compute.post(f"/v1/leases/{org}/a/renew")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_lease"


def test_resource_limits_deny_with_limit_and_requested(admin, compute, new_org):
    org = new_org()
    put = admin.put(f"/v1/orgs/{org}/limits", json={"max_disk_mb": 10_240,
                                                    "machine_quotas": {"us-central1": {"a3-highgpu-8g": 2}}})
    assert put.status_code == 200, put.text
    disk = compute.post("/v1/gate", json={"org_id": org, "action": "create", "resources": {"disk_mb": 20_480}}).json()
    assert (disk["reason"], disk["status"], disk["limit"], disk["requested"], disk["resource"]) == (
        "resource_limit", 403, 10_240, 20_480, "disk_mb")
    gpu = {"machine_type": "a3-highgpu-8g", "region": "us-central1", "quantity": 2}
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "g", "resources": gpu}).status_code == 201
    deny = compute.post("/v1/gate", json={"org_id": org, "action": "create",
                                          "resources": {**gpu, "quantity": 1}}).json()
    assert (deny["reason"], deny["limit"], deny["requested"]) == ("resource_limit", 2, 3)
    assert deny["resource"] == "machine_type:us-central1/a3-highgpu-8g"


def test_tier_change_raises_the_cap_and_a_lower_cap_keeps_running_leases(admin, compute, new_org):
    org = new_org()
    assert admin.put(f"/v1/orgs/{org}/tier", json={"tier": "pro"}).json()["max_concurrent"] == 100
    for n in range(7):
        assert compute.post("/v1/leases", json={"org_id": org, "lease_id": f"l{n}"}).status_code == 201
    state = admin.put(f"/v1/orgs/{org}/tier", json={"tier": "base"}).json()
    assert state["max_concurrent"] == 5 and state["active_leases"] == 7
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "l8"}).status_code == 429
    custom = admin.put(f"/v1/orgs/{org}/tier", json={"tier": "custom", "max_concurrent": 9})
    assert custom.json()["max_concurrent"] == 9


def test_admin_halt_is_not_lifted_by_credit_only_by_resume(admin, compute, new_org):
    org = new_org()
    assert admin.post(f"/v1/orgs/{org}/halt").json()["is_halted"] is True
    admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000})
    assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()["reason"] == "halted"
    assert admin.post(f"/v1/orgs/{org}/resume").json()["is_halted"] is False
    assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()["reason"] == "ok"


def test_creating_an_org_twice_applies_the_signup_grant_once(admin, sql, new_org):
    org = new_org()
    again = admin.post("/v1/orgs", json={"org_id": org, "email": f"{org}@example.com"})
    assert again.status_code == 200
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'signup_grant'", org) == 1
    assert again.json()["balance_micros"] == SIGNUP_MICROS


def test_credit_with_the_same_key_is_applied_once_and_other_content_conflicts(admin, sql, new_org):
    org = new_org()
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 2_000_000}, headers=key)
    second = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 2_000_000}, headers=key)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    conflict = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 3_000_000}, headers=key)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + 2_000_000
    assert ledger_sum(sql, org) == SIGNUP_MICROS + 2_000_000


def test_refund_claws_back_and_halts_a_prepaid_org_at_zero(admin, compute, sql, new_org):
    org = new_org()
    refund = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "refund", "amount_micros": SIGNUP_MICROS})
    assert refund.status_code == 201 and refund.json()["amount_micros"] == -SIGNUP_MICROS
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == 0 and state["is_halted"] is True
    assert ledger_sum(sql, org) == 0


def test_ledger_pages_newest_first_with_a_cursor(admin, new_org):
    org = new_org()
    for n in range(4):
        admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000 + n})
        time.sleep(0.002)
    page1 = admin.get(f"/v1/orgs/{org}/ledger", params={"limit": 3}).json()
    page2 = admin.get(f"/v1/orgs/{org}/ledger", params={"limit": 3, "cursor": page1["next_cursor"]}).json()
    amounts = [e["amount_micros"] for e in page1["entries"] + page2["entries"]]
    assert amounts == [1_003, 1_002, 1_001, 1_000, SIGNUP_MICROS]
    assert page1["has_more"] is True and page2["has_more"] is False


def test_usage_report_groups_by_lease_and_day(admin, compute, new_org):
    org = new_org()
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "u1", "a"), hour_tick(org, "u2", "b"),
                                              hour_tick(org, "u3", "b")]})
    by_lease = admin.get(f"/v1/orgs/{org}/usage", params={"group_by": "lease"}).json()["groups"]
    assert [(g["lease_id"], g["ticks"], g["cost_micros"]) for g in by_lease] == [
        ("a", 1, HOUR_TICK_MICROS), ("b", 2, 2 * HOUR_TICK_MICROS)]
    by_day = admin.get(f"/v1/orgs/{org}/usage", params={"group_by": "day"}).json()["groups"]
    assert sum(g["cost_micros"] for g in by_day) == 3 * HOUR_TICK_MICROS


def test_ops_endpoints_answer(service, compute):
    assert compute.get("/healthz").json() == {"ok": True}
    ready = compute.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert compute.get("/docs").status_code == 200


def test_readyz_answers_within_its_bound_when_postgres_takes_connections_and_never_answers(service, monkeypatch):
    """The ingress's own /readyz, on a Context whose database is a loopback socket that
    accepts and stays silent (what a host dropping Postgres' packets looks like): the
    Postgres check gives up after READY_TIMEOUT_S, as the shard check does, with the same
    error shape, and the shards still report ok."""
    import asyncio
    import socket

    import httpx
    from fastapi import FastAPI

    from actors.routing import ShardRouter
    from config.catalog import load_catalog
    from serve_app.context import Context
    from serve_app.routes import ops

    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []
    monkeypatch.setattr(ops, "READY_TIMEOUT_S", 2)
    settings = service.settings.model_copy(update={
        "database_url": f"postgresql://metergate@127.0.0.1:{silent.getsockname()[1]}/metergate"})
    ctx = Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map))
    app = FastAPI()
    app.include_router(ops.routes(ctx))

    async def probe() -> tuple[httpx.Response, float]:
        loop = asyncio.get_running_loop()
        silent.setblocking(False)
        accepting = loop.create_task(loop.sock_accept(silent))
        accepting.add_done_callback(lambda t: accepted.append(t.result()[0]) if not t.cancelled() else None)
        started = time.monotonic()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate") as client:
            response = await client.get("/readyz")
        accepting.cancel()
        return response, time.monotonic() - started

    try:
        response, took_s = asyncio.run(probe())
    finally:
        for conn in accepted:
            conn.close()
        silent.close()
    assert accepted, "the probe never reached the silent Postgres"
    assert response.status_code == 503, response.text
    assert response.json() == {"ready": False, "checks": {"postgres": "error: TimeoutError", "shards": "ok"}}
    assert took_s < 2 + 3, took_s  # the bound, plus the shard check's and the loop's own time


def test_a_usage_report_adds_costs_exactly_across_commits(admin, compute, sql, new_org):
    """Each rollup kept the floor of its cost in nanos at every commit, so a lease's or a day's
    cost drifted from the ledger. A tick of 2 vCPU and 1,177,600 MB of disk for 1 ms costs
    62.5 nano-USD; sixteen of them, each its own commit, cost exactly 1 µUSD (the floors made
    992 nanos: 0 µUSD)."""
    org = new_org()
    started = now_rfc3339()
    for n in range(16):
        answer = compute.post("/v1/usage", json={"ticks": [{
            "tick_id": f"e{n}", "org_id": org, "lease_id": "exact", "started_at": started, "duration_ms": 1,
            "cpu_count": 2, "disk_mb": 1_177_600}]})
        assert answer.json()["accepted"] == 1, answer.text
    (group,) = admin.get(f"/v1/orgs/{org}/usage", params={"group_by": "lease"}).json()["groups"]
    assert (group["lease_id"], group["ticks"], group["cost_micros"]) == ("exact", 16, 1)
    assert ledger_sum(sql, org) == SIGNUP_MICROS - 1  # the ledger's exact debit: the same micro


def test_a_lease_id_released_cannot_be_taken_again_by_a_late_retry(compute, new_org):
    org = new_org()
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "once", "ttl_s": 60}).status_code == 201
    assert compute.delete(f"/v1/leases/{org}/once").status_code == 204
    late = compute.post("/v1/leases", json={"org_id": org, "lease_id": "once", "ttl_s": 60})
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_ended", late.text
    # A release that overtook its take: the take that arrives after it is refused too.
    assert compute.delete(f"/v1/leases/{org}/overtaken").status_code == 204
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "overtaken"}).status_code == 409


def test_a_tick_older_than_tick_ids_are_remembered_is_rejected_tick_too_old(admin, compute, new_org):
    org = new_org()
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 26 * 3_600))
    answer = compute.post("/v1/usage", json={"ticks": [
        {"tick_id": "old", "org_id": org, "started_at": old, "duration_ms": 1_000, "memory_mb": 1024},
        hour_tick(org, "fresh")]}).json()
    assert answer["accepted"] == 1
    (rejected,) = answer["rejected"]
    assert rejected["index"] == 0 and rejected["error"].startswith("tick_too_old:")
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS - HOUR_TICK_MICROS


def test_balance_threshold_crossed_goes_out_once_per_fall_under_the_orgs_alert(admin, compute, sql, new_org):
    org = new_org()
    assert admin.get(f"/v1/orgs/{org}").json()["alerts"]["low_balance_micros"] == 1_000_000  # the catalog's
    put = admin.put(f"/v1/orgs/{org}/alerts", json={"low_balance_micros": 4_900_000})
    assert put.status_code == 200 and put.json()["alerts"] == {"low_balance_micros": 4_900_000, "runway_alert_s": 3_600}
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "a1")]})  # 4.8344 USD left: under
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "a2")]})  # still under: no second one
    (crossed,) = outbox(sql, org, "balance.threshold_crossed")
    assert crossed == {"org_id": org, "threshold_micros": 4_900_000,
                       "balance_micros": SIGNUP_MICROS - HOUR_TICK_MICROS}
    bad = admin.put(f"/v1/orgs/{org}/alerts", json={"low_balance_micros": -1})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_the_runway_falls_as_usage_is_billed_and_runway_low_goes_out_once(admin, compute, sql, new_org):
    """Billing-rules 2.10 through HTTP: two sandboxes of 4 GiB and 2 vCPUs burn 331,200 µUSD an
    hour; the signup's 5 USD last 54,347 s; under the catalog's 60 minutes, one event."""
    org = new_org()
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["runway"] == {"burn_micros_per_hour": 0, "runway_s": None, "runs_out_at": None}
    assert state["alerts"] == {"low_balance_micros": 1_000_000, "runway_alert_s": 3_600}  # the catalog's
    for lease in ("sbx_a", "sbx_b"):
        response = compute.post("/v1/leases", json={"org_id": org, "lease_id": lease, "ttl_s": 3_600,
                                                    "resources": {"memory_mb": 4096, "cpu_count": 2}})
        assert response.status_code == 201, response.text
    before = time.time()
    runway = admin.get(f"/v1/orgs/{org}").json()["runway"]
    assert (runway["burn_micros_per_hour"], runway["runway_s"]) == (2 * HOUR_TICK_MICROS, 54_347)
    runs_out = time.mktime(time.strptime(runway["runs_out_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(runs_out - (before + 54_347)) < 30
    answer = compute.post("/v1/usage", json={"ticks": [hour_tick(org, f"r{n}", "sbx_a") for n in range(28)]})
    assert answer.json()["accepted"] == 28
    assert admin.get(f"/v1/orgs/{org}").json()["runway"]["runway_s"] == 3_947  # 363,200 µUSD left
    assert outbox(sql, org, "balance.runway_low") == []
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "r28", "sbx_b")]})  # 197,600 left: 2,147 s
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "r29", "sbx_b")]})  # still under: no second one
    (low,) = outbox(sql, org, "balance.runway_low")
    assert low == {"org_id": org, "threshold_s": 3_600, "runway_s": 2_147, "burn_micros_per_hour": 331_200,
                   "balance_micros": SIGNUP_MICROS - 29 * HOUR_TICK_MICROS, "lease_ids": ["sbx_a", "sbx_b"]}
    # The alert is per org: another threshold, or off; an empty body names nothing to set.
    put = admin.put(f"/v1/orgs/{org}/alerts", json={"runway_alert_s": 0})
    assert put.status_code == 200 and put.json()["alerts"] == {"low_balance_micros": 1_000_000, "runway_alert_s": 0}
    for bad in ({}, {"runway_alert_s": -1}, {"runway_alert_s": 30 * 86_400 + 1}, {"runway_alert_s": "1h"}):
        response = admin.put(f"/v1/orgs/{org}/alerts", json=bad)
        assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_request"), bad
