"""Time-driven billing with the test clock: periods, dunning, expirations, outbound webhooks.

These move the service's shared clock forward (days at a time), so they run after every other
test of the session (see conftest). The scheduler, not a request, applies what time changed:
each check reads what it wrote before any request touches the org.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import pytest
import ray

from actors.timeutil import period_bounds, us_to_rfc3339
from config.catalog import load_catalog
from config.settings import Settings
from serve_app.app import build_app
from serve_app.context import Context
from tests.helpers import (
    ADMIN_TOKEN,
    HOUR_TICK_MICROS,
    SIGNUP_MICROS,
    advance,
    clock_us,
    hour_tick,
    outbox,
    stripe_client,
    stripe_deliver,
    stripe_event,
    wait_for,
)

pytestmark = pytest.mark.time_travel
US = 1_000_000
DAY_S = 86_400


def tick_now(admin, org: str, tick_id: str, lease_id: str) -> dict:
    """An hour tick started at the service's now: once the test clock ran ahead, a tick of real
    time would be older than tick ids are remembered, and rejected tick_too_old."""
    return hour_tick(org, tick_id, lease_id) | {"started_at": us_to_rfc3339(clock_us(admin) // US * US)}


def test_the_test_clock_moves_forward_only_and_is_absent_without_the_setting(service, admin):
    before = clock_us(admin)
    moved = advance(admin, 3_600)
    assert moved["now_us"] >= before + 3_600 * US
    assert clock_us(admin) >= before + 3_600 * US
    for body in ({"seconds": 0}, {"seconds": -5}, {"seconds": "1"}, {}):
        response = admin.post("/v1/test-clock/advance", json=body)
        assert response.status_code == 422, body
    settings = Settings(**{**service.settings.model_dump(), "test_clock": False})
    app = build_app(Context(settings, load_catalog(settings.catalog), router=None))

    async def call() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mg") as client:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            return [(await client.get("/v1/test-clock", headers=auth)).status_code,
                    (await client.post("/v1/test-clock/advance", json={"seconds": 5}, headers=auth)).status_code]

    assert asyncio.run(call()) == [404, 404]


# First of the clock-moving tests that need it: the rollup looks back 35 days of service time.
def test_meter_events_bill_only_what_credit_did_not_cover_shadow_then_sent_after_a_429(
        service, admin, compute, sql, new_org):
    from datetime import datetime, timedelta, timezone

    from actors.jobs import SchedulerActor
    from actors.placement import NAMESPACE

    api = service.settings.stripe_api_base
    org = new_org(billing_mode="postpaid")  # 5 USD signup grant
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json={}).status_code == 200  # its Stripe customer
    customer = sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org)
    compute.post("/v1/leases", json={"org_id": org, "lease_id": "meter", "ttl_s": 86_400})

    def service_hour() -> datetime:
        return datetime.fromtimestamp(clock_us(admin) // 1_000_000, timezone.utc).replace(minute=0, second=0)

    def usage(prefix: str, count: int) -> None:
        ticks = [tick_now(admin, org, f"{prefix}_{n}", "meter") for n in range(count)]
        assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == count

    first_hour = service_hour()
    usage("a", 40)  # 40 × 0.1656 = 6.624 USD: the grant pays 5, 1.624 USD is invoiced
    advance(admin, 2 * 3_600)
    later_hour = service_hour()
    usage("b", 10)  # 1.656 USD, all invoiced
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == 0  # no debt: Stripe bills the rest
    advance(admin, 3 * 3_600)  # both hours are closed now; the scheduler rolls them up, in shadow

    def rows():
        return {(r["meter"], r["hour"]): (r["identifier"], r["status"], r["value"]) for r in sql.fetch(
            "SELECT identifier, meter, hour, status, value FROM meter_events WHERE org_id = $1", org)}

    shadow = wait_for("shadow meter events", lambda: len(rows()) == 2 and rows())
    assert {k: v[2] for k, v in shadow.items()} == {
        ("usage_micros", first_hour): 40 * HOUR_TICK_MICROS - SIGNUP_MICROS,
        ("usage_micros", later_hour): 10 * HOUR_TICK_MICROS}
    assert {status for _, status, _ in shadow.values()} == {"shadow"}
    assert sum(v[2] for v in shadow.values()) == sql.val(
        "SELECT sum(invoiced_micros)::int8 FROM ledger WHERE org_id = $1", org)
    assert [e for e in httpx.get(f"{api}/_fake/meter_events", timeout=10).json()
            if e["payload"]["stripe_customer_id"] == customer] == []

    # Shadow off, billing from the later hour on; the first send meets a 429 and backs off.
    settings = service.settings.model_copy(update={
        "jobs_enabled": False, "stripe_meter_shadow": False, "stripe_meter_bill_from": later_hour}).model_dump_json()
    billing = ray.remote(SchedulerActor).options(num_cpus=0.01, namespace=NAMESPACE).remote(settings, service.slot_map)
    httpx.post(f"{api}/_fake/meter_events", json={"fail_next": 1}, timeout=10)
    first = ray.get(billing.meter_rollup.remote())
    assert first["deferred"] == 1
    time.sleep(1.2)  # the backoff: 1 s
    for _ in range(10):
        ray.get(billing.meter_rollup.remote())
        if all(status != "pending" for _, status, _ in rows().values()):
            break
        time.sleep(1.0)
    final = rows()
    assert {k: v[1] for k, v in final.items()} == {("usage_micros", first_hour): "consumed",
                                                   ("usage_micros", later_hour): "sent"}
    assert {k: v[0] for k, v in final.items()} == {k: v[0] for k, v in shadow.items()}  # the same identifiers
    seen = [e for e in httpx.get(f"{api}/_fake/meter_events", timeout=10).json()
            if e["payload"]["stripe_customer_id"] == customer]
    assert {e["identifier"] for e in seen} == {final[("usage_micros", later_hour)][0]}  # nothing before BILL_FROM
    assert sorted(e["status"] for e in seen) == [200, 429]  # the 429'd one went again, same identifier
    assert {e["payload"]["value"] for e in seen} == {str(10 * HOUR_TICK_MICROS)}

    # Invoiced usage that lands late for an hour already sent (a shard whose clock lags the
    # scheduler's): one more event, with the difference.
    sql.val("UPDATE ledger SET invoiced_micros = invoiced_micros + 7 WHERE org_id = $1 AND usage_minute ="
            " (SELECT max(usage_minute) FROM ledger WHERE org_id = $1 AND invoiced_micros > 0) RETURNING 1", org)
    assert ray.get(billing.meter_rollup.remote())["new"] == 1
    assert ray.get(billing.meter_rollup.remote())["new"] == 0  # nothing more to add
    ray.kill(billing)
    later = sql.fetch("SELECT identifier, value, status FROM meter_events WHERE org_id = $1 AND hour = $2"
                      " ORDER BY created_at, identifier", org, later_hour)
    assert [(r["value"], r["status"]) for r in later] == [(10 * HOUR_TICK_MICROS, "sent"), (7, "sent")]
    assert len({r["identifier"] for r in later}) == 2

    # A restore to before those events, a day ago: the database forgot them, the usage came
    # back (gateways sent it again), and Stripe no longer dedupes their identifiers. Stripe's
    # meter is read back first (the runbook's reconcile): the roll-up sends nothing again.
    def at_stripe() -> dict:
        summaries = stripe_client(service).v1.billing.meters.event_summaries.list(
            f"mtr_{service.settings.stripe_meter_prefix}_usage_micros", params={
                "customer": customer, "start_time": int(first_hour.timestamp()),
                "end_time": int(later_hour.timestamp()) + 3_600, "value_grouping_window": "hour"})
        return {s.start_time: int(s.aggregated_value) for s in summaries.data}

    held = at_stripe()
    assert held == {int(later_hour.timestamp()): 10 * HOUR_TICK_MICROS + 7}
    # The backup held the hour's first event still pending (sent just after it) and not the second.
    first_id, second_id = later[0]["identifier"], later[1]["identifier"]
    sql.val("UPDATE meter_events SET status = 'pending', sent_at = NULL WHERE identifier = $1 RETURNING 1", first_id)
    sql.val("DELETE FROM meter_events WHERE identifier = $1 RETURNING 1", second_id)
    httpx.post(f"{api}/_fake/meter_events", json={"forget_identifiers": True}, timeout=10)
    billing = ray.remote(SchedulerActor).options(num_cpus=0.01, namespace=NAMESPACE).remote(settings, service.slot_map)
    since_us = int(later_hour.timestamp()) * 1_000_000
    read_back = ray.get(billing.reconcile_meters.remote(since_us))
    assert (read_back["orgs"] >= 1, read_back["hours"] >= 1) == (True, True), read_back
    assert ray.get(billing.reconcile_meters.remote(since_us))["recorded_micros"] == 0  # nothing twice
    # Which of the hour's unsent events Stripe has cannot be told: they are retired, and what
    # Stripe holds beyond the sent ones is one event already sent.
    assert sql.val("SELECT status || ' ' || value FROM meter_events WHERE identifier = $1", first_id) == "consumed 0"
    assert ray.get(billing.meter_rollup.remote())["new"] == 0
    ray.kill(billing)
    assert at_stripe() == held  # billed once, not twice
    assert sql.val("SELECT sum(value)::int8 FROM meter_events WHERE org_id = $1 AND hour = $2", org,
                   later_hour) == 10 * HOUR_TICK_MICROS + 7


def test_a_weekly_quota_resets_at_the_boundary_and_after_a_subscription_period_change(admin, compute, sql, new_org):
    org = new_org(plan_id="hobby_weekly")
    compute.post("/v1/leases", json={"org_id": org, "lease_id": "w1", "ttl_s": 86_400})
    compute.post("/v1/usage", json={"ticks": [tick_now(admin, org, f"w_{n}", "w1") for n in range(3)]})
    period = admin.get(f"/v1/orgs/{org}").json()["period"]
    assert period["usage_micros"] == 3 * HOUR_TICK_MICROS
    now = clock_us(admin)
    _, _, end = period_bounds("week", now)
    advance(admin, (end - now) // US + 1)
    archived = sql.fetch("SELECT period_key, usage_micros FROM period_usage WHERE org_id = $1", org)
    assert [(r["period_key"], r["usage_micros"]) for r in archived] == [(period["key"], 3 * HOUR_TICK_MICROS)]
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["period"]["key"] != period["key"] and state["period"]["usage_micros"] == 0

    # A subscription's period moving resets the quota too (the first one only sets the anchor).
    compute.post("/v1/usage", json={"ticks": [tick_now(admin, org, f"w2_{n}", "w1") for n in range(2)]})
    advance(admin, 60)  # a start in the same second as the week's would be "the running period"
    now_s = clock_us(admin) // US
    subscription = {"id": f"sub_{uuid.uuid4().hex[:8]}", "object": "subscription", "status": "active",
                    "metadata": {"org_id": org, "tier": "pro"}, "current_period_start": now_s - 3_600}
    created = stripe_event("customer.subscription.created", subscription, created=now_s)
    assert stripe_deliver(compute, created).status_code == 200
    assert admin.get(f"/v1/orgs/{org}").json()["period"]["usage_micros"] == 2 * HOUR_TICK_MICROS
    moved = {**subscription, "current_period_start": now_s}
    answer = stripe_deliver(compute, stripe_event("customer.subscription.updated", moved, created=now_s + 1))
    assert answer.status_code == 200, answer.text
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["period"]["usage_micros"] == 0, (answer.text, state["period"], now_s)
    assert sql.val("SELECT count(*) FROM period_usage WHERE org_id = $1", org) == 2
    replayed = stripe_event("customer.subscription.updated", moved, created=now_s + 2)
    assert stripe_deliver(compute, replayed).status_code == 200
    assert sql.val("SELECT count(*) FROM period_usage WHERE org_id = $1", org) == 2  # same period: no reset


def test_the_dunning_ladder_and_payment_clearing_it(admin, compute, sql, new_org):
    org = new_org(plan_id="hobby_weekly")
    invoice = {"id": f"in_{uuid.uuid4().hex[:8]}", "object": "invoice", "billing_reason": "subscription_cycle",
               "metadata": {"org_id": org}}
    failed_at = clock_us(admin) // US
    failed = stripe_event("invoice.payment_failed", invoice, created=failed_at)
    assert stripe_deliver(compute, failed).status_code == 200
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["past_due_since"] == us_to_rfc3339(failed_at * US) and state["suspended"] is False

    advance(admin, 3 * DAY_S)
    assert len(outbox(sql, org, "org.suspended")) == 1  # the scheduler did it, before any request
    gate = compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()
    assert (gate["allowed"], gate["status"], gate["reason"]) == (False, 402, "suspended")

    advance(admin, 4 * DAY_S)
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["degraded"] is True and state["plan"]["id"] == "hobby_weekly"
    purchase = compute.post("/v1/gate", json={"org_id": org, "action": "purchase"}).json()
    assert (purchase["status"], purchase["reason"]) == (402, "suspended")  # suspended comes first
    advance(admin, 7 * DAY_S)
    assert admin.get(f"/v1/orgs/{org}").json()["plan"]["id"] == "free"
    assert len(outbox(sql, org, "org.suspended")) == 1

    paid_at = clock_us(admin) // US
    assert stripe_deliver(compute, stripe_event("invoice.paid", invoice, created=paid_at)).status_code == 200
    state = admin.get(f"/v1/orgs/{org}").json()
    assert (state["suspended"], state["degraded"], state["past_due_since"], state["plan"]["id"]) == (
        False, False, None, "hobby_weekly")
    assert len(outbox(sql, org, "org.unsuspended")) == 1
    assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()["allowed"] is True


def test_a_grant_lapses_with_exactly_its_unused_part_and_a_lease_expires(admin, compute, sql, new_org):
    org = new_org()
    expires_at = clock_us(admin) + DAY_S * US
    credit = admin.post(f"/v1/orgs/{org}/credits", json={
        "kind": "grant", "amount_micros": 2 * US, "expires_at": us_to_rfc3339(expires_at), "note": "trial"})
    assert credit.status_code == 201, credit.text
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "short", "ttl_s": 60}).status_code == 201
    compute.post("/v1/usage", json={"ticks": [tick_now(admin, org, "g1", "short")]})  # burns the expiring grant first
    advance(admin, 120)
    (expired,) = wait_for("lease.expired", lambda: outbox(sql, org, "lease.expired"))
    assert expired["lease_id"] == "short"
    advance(admin, DAY_S)
    rows = sql.fetch("SELECT amount_micros FROM ledger WHERE org_id = $1 AND kind = 'expiration'", org)
    assert [r["amount_micros"] for r in rows] == [-(2 * US - HOUR_TICK_MICROS)]
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS


def test_outbound_webhooks_are_signed_retried_with_one_id_and_dead_lettered(admin, sql, receiver, new_org):
    org = new_org()
    receiver.fail_next[org] = 2
    assert admin.post(f"/v1/orgs/{org}/halt").status_code == 200
    def halted_deliveries() -> list[dict]:
        return [m for m in receiver.of_org(org) if m["type"] == "org.halted"]

    deliveries = wait_for("three deliveries", lambda: len(halted_deliveries()) >= 3 and halted_deliveries())
    assert [m["accepted"] for m in deliveries] == [False, False, True]
    assert len({m["svix_id"] for m in deliveries}) == 1  # the same message id on every attempt
    # Random, not the outbox row's number (a sequence a restore rewinds: new events would get
    # the ids of events receivers already took).
    assert re.fullmatch(r"msg_[0-9a-f]{32}", deliveries[0]["svix_id"]), deliveries[0]["svix_id"]
    assert not sql.val("SELECT count(*) FROM outbox WHERE message_id = 'msg_' || id")
    assert receiver.rejected == 0  # every delivery verified with the svix library
    time.sleep(2)
    assert len(halted_deliveries()) == 3  # accepted once, then left alone

    dead = new_org()
    receiver.fail_next[dead] = 1_000
    admin.post(f"/v1/orgs/{dead}/halt")
    for _ in range(12):  # backoff 1, 2, 4 s... moved along by the clock
        advance(admin, 60)
        rows = admin.get("/v1/webhooks/outbox", params={"status": "dead"}).json()["events"]
        if any(r["org_id"] == dead for r in rows):
            break
        time.sleep(0.5)
    (letter,) = [r for r in rows if r["org_id"] == dead]
    assert (letter["type"], letter["attempts"]) == ("org.halted", 4) and "HTTP 500" in letter["last_error"]
    receiver.fail_next[dead] = 0
    assert admin.post(f"/v1/webhooks/outbox/{letter['id']}/retry").status_code == 200
    (retried,) = wait_for("the retried dead letter", lambda: receiver.of_org(dead, accepted_only=True))
    assert retried["svix_id"] == letter["id"]  # the id the listing shows is the one receivers get
    assert admin.post(f"/v1/webhooks/outbox/{letter['id']}/retry").status_code == 409
    assert admin.post("/v1/webhooks/outbox/msg_999999999/retry").status_code == 404
    assert admin.get("/v1/webhooks/outbox", params={"status": "lost"}).status_code == 422


def test_two_schedulers_at_once_apply_every_effect_once(service, admin, compute, sql, receiver, new_org):
    from actors.jobs import SchedulerActor
    from actors.placement import NAMESPACE, shard_name

    orgs = [new_org() for _ in range(4)]
    start = clock_us(admin)
    for org in orgs:
        admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": US,
                                                    "expires_at": us_to_rfc3339(start + 600 * US)})
        compute.post("/v1/leases", json={"org_id": org, "lease_id": "twin", "ttl_s": 300})
    # Move the clock behind the schedulers' backs, then let three runners race for the work.
    offset = sql.val("UPDATE test_clock SET offset_us = offset_us + $1 RETURNING offset_us", 900 * US)
    ray.get([ray.get_actor(shard_name(k), namespace=NAMESPACE).set_clock.remote(offset)
             for k in range(service.settings.shards)])
    settings = service.settings.model_copy(update={"jobs_enabled": False}).model_dump_json()
    twins = [ray.remote(SchedulerActor).options(num_cpus=0.01, namespace=NAMESPACE).remote(settings, service.slot_map)
             for _ in range(2)]
    ray.get([t.ready.remote() for t in twins])
    ray.get([t.run_due.remote() for t in twins] + [t.run_due.remote() for t in twins])
    advance(admin, 1)  # and the real scheduler
    for org in orgs:
        assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'expiration'", org) == 1
        assert len(outbox(sql, org, "lease.expired")) == 1
    for org in orgs:
        wait_for("delivery", lambda: [m for m in receiver.of_org(org, accepted_only=True) if m["type"] == "lease.expired"])
    time.sleep(1.5)
    for org in orgs:
        ids = [m["svix_id"] for m in receiver.of_org(org) if m["type"] == "lease.expired"]
        assert len(ids) == 1, ids  # delivered once, though three runners saw it due
    for twin in twins:
        ray.kill(twin)


def test_the_month_summary_closes_with_the_month_and_recomputes_identically(admin, compute, new_org):
    org = new_org()
    compute.post("/v1/leases", json={"org_id": org, "lease_id": "mm", "ttl_s": 86_400})
    at = us_to_rfc3339(clock_us(admin) // US * US)  # service time: the month the ledger sees too
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, f"mm_{n}", "mm") | {"started_at": at}
                                              for n in range(3)]})
    before = admin.get(f"/v1/orgs/{org}/months").json()["months"]
    assert [m["status"] for m in before] == ["open"]
    advance(admin, 32 * DAY_S)
    after = admin.get(f"/v1/orgs/{org}/months").json()
    assert admin.get(f"/v1/orgs/{org}/months").json() == after  # recomputed, the same
    (month,) = [m for m in after["months"] if m["month"] == before[0]["month"]]
    assert month == {**before[0], "status": "closed"}
    assert (month["spend_micros"], month["credits_applied_micros"], month["usage_hours"]) == (
        3 * HOUR_TICK_MICROS, 3 * HOUR_TICK_MICROS, 3.0)
