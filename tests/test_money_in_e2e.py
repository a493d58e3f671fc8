"""Money in, end to end, against localstripe with its own signed webhooks delivered to the service.

A customer saves a card, tops up, auto-recharge fires once under the threshold, the org
subscribes to `pro` (cap 100), cancels (cap 5), and half a top-up is refunded. The Stripe
objects are real localstripe objects; the front fake adds only Checkout and the two events
localstripe does not send (`checkout.session.completed`, `charge.refunded`).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.helpers import (
    HOUR_TICK_MICROS,
    SIGNUP_MICROS,
    STRIPE_WEBHOOK_SECRET,
    URLS,
    fake_sessions,
    hour_tick,
    ledger_sum,
    mint,
    org_client,
    outbox,
    shard_pid,
    stripe_client,
    stripe_deliver,
    stripe_event,
    wait_for,
)

US = 1_000_000
EVENTS = ["checkout.session.completed", "payment_intent.succeeded", "payment_intent.payment_failed",
          "customer.subscription.created", "customer.subscription.deleted", "charge.refunded"]


@pytest.fixture(scope="module")
def stripe_webhooks(service):
    """localstripe (and the front) deliver their events to the running service while this module runs."""
    api = service.settings.stripe_api_base
    hook = {"url": f"{service.base_url}/webhooks/stripe", "secret": STRIPE_WEBHOOK_SECRET, "events": EVENTS}
    assert httpx.post(f"{api}/_config/webhooks/metergate", json=hook, timeout=10).status_code == 200
    yield
    httpx.post(f"{api}/_config/webhooks/metergate", json={**hook, "events": []}, timeout=10)


def complete(service, session_id: str, **options) -> dict:
    response = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{session_id}/complete",
                          json=options, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def delivered(sql, event_type: str, org: str) -> list[dict]:
    """The service's answers to the Stripe events of a type that concerned an org."""
    rows = sql.fetch("SELECT response FROM inbound_webhooks WHERE source = 'stripe' AND event_type = $1", event_type)
    answers = [json.loads(r["response"]) for r in rows]
    return [a for a in answers if any(x["org_id"] == org for x in a.get("applied", []))]


def kinds(sql, org: str) -> list[tuple[str, int]]:
    rows = sql.fetch("SELECT kind, amount_micros FROM ledger WHERE org_id = $1 AND kind <> 'usage'"
                     " ORDER BY created_at, entry_id", org)
    return [(r["kind"], r["amount_micros"]) for r in rows]


def test_card_topup_auto_recharge_tiers_and_refund(service, stripe_webhooks, admin, compute, sql, new_org):
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        # 1. Save a card through Checkout (setup mode).
        assert customer.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
        (setup,) = [s for s in fake_sessions(service, org) if s["mode"] == "setup"]
        complete(service, setup["id"])
        wait_for("the card on file", lambda: admin.get(f"/v1/orgs/{org}").json()["has_payment_method"])

        # 2. Top up 20 USD: credited once when Stripe says it is paid.
        topup = customer.post(f"/v1/orgs/{org}/checkout/topup", json={"amount_micros": 20 * US, **URLS}).json()
        paid = complete(service, topup["session_id"])
        wait_for("the top-up", lambda: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + 20 * US)

        # 3. Auto-recharge: 10 USD whenever the balance goes under 24 USD. 25 USD now: no charge.
        state = customer.put(f"/v1/orgs/{org}/auto-recharge", json={
            "enabled": True, "threshold_micros": 24 * US, "amount_micros": 10 * US, "max_per_day": 3})
        assert state.status_code == 200, state.text
        assert state.json()["auto_recharge"]["pending"] is None
        assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_e2e", "ttl_s": 600}).status_code == 201
        ticks = [hour_tick(org, f"e2e_{n}", "sbx_e2e") for n in range(8)]  # 8 × 0.1656 USD: 23.67 USD left
        assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == 8
        after_charge = SIGNUP_MICROS + 20 * US - 8 * HOUR_TICK_MICROS + 10 * US
        wait_for("the auto-recharge credit", lambda: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == after_charge)
        # Stripe's own payment_intent.succeeded arrives too and replays: one credit, not two.
        (answer,) = wait_for("payment_intent.succeeded", lambda: delivered(sql, "payment_intent.succeeded", org))
        assert answer["applied"][0]["replayed"] is True
        more = [hour_tick(org, f"e2e_more_{n}", "sbx_e2e") for n in range(5)]  # still above 24 USD after
        compute.post("/v1/usage", json={"ticks": more})
        time.sleep(1.5)
        recharges = [amount for kind, amount in kinds(sql, org) if kind == "auto_recharge"]
        assert recharges == [10 * US]
        (succeeded,) = outbox(sql, org, "auto_recharge.succeeded")
        assert succeeded["amount_micros"] == 10 * US
        intent = stripe_client(service).v1.payment_intents.retrieve(succeeded["payment_intent_id"])
        assert (intent.status, intent.amount, intent.metadata["charge_id"]) == ("succeeded", 1000, "ar_1")

        # 4. Subscribe to pro: localstripe's customer.subscription.created sets the cap.
        tier = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro", **URLS}).json()
        (session,) = [s for s in fake_sessions(service, org) if s["mode"] == "subscription"]
        assert tier["url"] == session["url"]
        subscribed = complete(service, session["id"])
        wait_for("the pro cap", lambda: admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 100)

        # 5. Cancel: customer.subscription.deleted brings it back to base.
        stripe_client(service).v1.subscriptions.cancel(subscribed["subscription"])
        wait_for("the base cap", lambda: admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 5)

        # 6. Refund half the top-up: charge.refunded claws back 10 USD, once.
        balance = admin.get(f"/v1/orgs/{org}").json()["balance_micros"]
        refund = stripe_client(service).v1.refunds.create(
            params={"payment_intent": paid["payment_intent"], "amount": 1000})
        # The same refund reported as newer API versions do, without refunds.data: metergate
        # lists the charge's refunds from Stripe. Either report may come first; one clawback.
        charge = stripe_client(service).v1.charges.retrieve(refund.charge).to_dict()
        charge.pop("refunds", None)
        answer = stripe_deliver(compute, stripe_event("charge.refunded", charge))
        assert answer.status_code == 200, answer.text
        assert [a["command"] for a in answer.json()["applied"]] == ["RefundPayment"]
        wait_for("the refund", lambda: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == balance - 10 * US)
    assert [k for k in kinds(sql, org)] == [("signup_grant", SIGNUP_MICROS), ("topup", 20 * US),
                                            ("auto_recharge", 10 * US), ("refund", -10 * US)]
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == ledger_sum(sql, org)


def test_auto_recharge_on_the_runway_charges_the_card_once_when_the_runway_falls_under_it(
        service, stripe_webhooks, admin, compute, sql, new_org):
    """Billing-rules 9.2: two sandboxes burn 331,200 µUSD an hour; by the balance alone (1 µUSD)
    nothing would be charged before the halt; by the runway, one charge under 2 hours."""
    org = new_org()
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
    (setup,) = [s for s in fake_sessions(service, org) if s["mode"] == "setup"]
    complete(service, setup["id"])
    wait_for("the card on file", lambda: admin.get(f"/v1/orgs/{org}").json()["has_payment_method"])
    for lease in ("sbx_r1", "sbx_r2"):
        assert compute.post("/v1/leases", json={"org_id": org, "lease_id": lease, "ttl_s": 3_600, "resources": {
            "memory_mb": 4096, "cpu_count": 2}}).status_code == 201
    state = admin.put(f"/v1/orgs/{org}/auto-recharge", json={
        "enabled": True, "threshold_micros": 1, "amount_micros": 10 * US, "threshold_runway_s": 7_200})
    assert state.status_code == 200 and state.json()["auto_recharge"]["threshold_runway_s"] == 7_200
    ticks = [hour_tick(org, f"rw_{n}", "sbx_r1") for n in range(26)]  # 694,400 µUSD left: 7,547 s
    assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == 26
    assert admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]["pending"] is None
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, "rw_26", "sbx_r2")]})  # 528,800 left: 5,747 s
    after = SIGNUP_MICROS - 27 * HOUR_TICK_MICROS + 10 * US
    wait_for("the runway's charge", lambda: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == after)
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, f"rw_more_{n}", "sbx_r2") for n in range(3)]})
    time.sleep(1.5)
    assert [amount for kind, amount in kinds(sql, org) if kind == "auto_recharge"] == [10 * US]
    assert admin.get(f"/v1/orgs/{org}").json()["runway"]["runway_s"] > 7_200
    assert outbox(sql, org, "balance.runway_low") == []  # never under the 60 minutes' alert


def test_a_declined_auto_recharge_is_reported_once_and_not_retried(service, stripe_webhooks, admin, compute, sql, new_org):
    org = new_org()
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
    (setup,) = [s for s in fake_sessions(service, org) if s["mode"] == "setup"]
    complete(service, setup["id"], card="4000000000000341")  # attaches, declines when charged
    wait_for("the card on file", lambda: admin.get(f"/v1/orgs/{org}").json()["has_payment_method"])
    # Enabling with 5 USD under a 6 USD threshold: the arming charge, which the card declines.
    state = admin.put(f"/v1/orgs/{org}/auto-recharge", json={
        "enabled": True, "threshold_micros": 6 * US, "amount_micros": 10 * US})
    assert state.status_code == 200, state.text
    wait_for("the failure", lambda: outbox(sql, org, "auto_recharge.failed"))
    view = admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]
    assert (view["paused"], view["pending"], view["charges_today"]) == ("payment_failed", None, 1)
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_d", "ttl_s": 600}).status_code == 201
    compute.post("/v1/usage", json={"ticks": [hour_tick(org, f"d_{n}", "sbx_d") for n in range(3)]})
    time.sleep(1.5)
    (failed,) = outbox(sql, org, "auto_recharge.failed")
    assert failed["reason"] == "card_declined"
    assert [k for k, _ in kinds(sql, org)] == ["signup_grant"]
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS - 3 * HOUR_TICK_MICROS


def test_auto_recharge_settings_are_checked(admin, new_org):
    org = new_org()
    cases = [({"enabled": True, "amount_micros": 10 * US}, "invalid_request"),
             ({"enabled": True, "threshold_micros": 1, "amount_micros": 10 * US + 1}, "invalid_amount"),
             ({"enabled": True, "threshold_micros": 1, "amount_micros": 100}, "invalid_request"),
             ({"enabled": True, "threshold_micros": -1, "amount_micros": 10 * US}, "invalid_request"),
             ({"enabled": True, "threshold_micros": 1, "amount_micros": 10 * US, "max_per_day": 0}, "invalid_request"),
             ({"enabled": "yes"}, "invalid_request"), ({}, "invalid_request")]
    for body, code in cases:
        response = admin.put(f"/v1/orgs/{org}/auto-recharge", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (422, code), (body, response.text)
    off = admin.put(f"/v1/orgs/{org}/auto-recharge", json={"enabled": False})
    assert off.status_code == 200 and off.json()["auto_recharge"] == {"enabled": False}
    assert admin.put("/v1/orgs/ghost_ar/auto-recharge", json={"enabled": False}).status_code == 404


def test_a_charge_pending_when_the_shard_dies_is_made_once_after_the_restart(
        service, stripe_webhooks, admin, sql, org_id_on, new_org):
    import os
    import signal

    api = service.settings.stripe_api_base
    org = new_org(org_id=org_id_on(0, "arcrash"))
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
    (setup,) = [s for s in fake_sessions(service, org) if s["mode"] == "setup"]
    complete(service, setup["id"])
    wait_for("the card on file", lambda: admin.get(f"/v1/orgs/{org}").json()["has_payment_method"])
    # Stripe fails every attempt the charger makes: the charge stays pending, nothing else is asked.
    httpx.post(f"{api}/_fake/payment_intents", json={"fail_next": 4}, timeout=10)
    state = admin.put(f"/v1/orgs/{org}/auto-recharge", json={
        "enabled": True, "threshold_micros": 6 * US, "amount_micros": 10 * US}).json()
    pending = state["auto_recharge"]["pending"]
    assert pending["amount_micros"] == 10 * US
    wait_for("the charger to give up for now",
             lambda: httpx.get(f"{api}/_fake/payment_intents", timeout=10).json()["next"] == 0)
    time.sleep(0.5)
    assert admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]["pending"] == pending

    os.kill(shard_pid(0), signal.SIGKILL)  # the process that knew about the charge is gone
    # On restart the org reloads with its pending charge, which is made, with the same key, once.
    wait_for("the charge after the restart",
             lambda: _balance_or_none(admin, org) == SIGNUP_MICROS + 10 * US, timeout_s=90)
    assert [amount for kind, amount in kinds(sql, org) if kind == "auto_recharge"] == [10 * US]
    view = admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]
    assert (view["pending"], view["charges_today"]) == (None, 1)


def _balance_or_none(admin, org: str) -> int | None:
    try:
        response = admin.get(f"/v1/orgs/{org}")
    except httpx.HTTPError:
        return None
    return response.json().get("balance_micros") if response.status_code == 200 else None
