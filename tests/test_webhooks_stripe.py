"""POST /webhooks/stripe: verified events, each effect once, order-proof, bad deliveries refused."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import stripe

from tests.helpers import SIGNUP_MICROS, STRIPE_WEBHOOK_SECRET, ledger_sum, stripe_deliver, stripe_event, stripe_signed


def paid_session(org: str, cents: int, payment_intent: str, **metadata) -> dict:
    return {"id": f"cs_{uuid.uuid4().hex[:12]}", "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "amount_total": cents, "payment_intent": payment_intent,
            "client_reference_id": org, "metadata": {"org_id": org, **metadata}}


def test_a_paid_checkout_is_credited_once_whatever_the_deliveries(compute, admin, sql, new_org):
    org = new_org()
    session = paid_session(org, 1_000, "pi_topup_1")
    completed = stripe_event("checkout.session.completed", session)
    body, headers = stripe_signed(completed)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        compute.post("/webhooks/stripe", content=body, headers=headers).status_code)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [200, 200, 200]
    assert compute.post("/webhooks/stripe", content=body, headers=headers).json()["duplicate"] is True
    # Another event about the same payment (an async method confirming later) changes nothing.
    assert stripe_deliver(compute, stripe_event("checkout.session.async_payment_succeeded", session)).status_code == 200
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + 10_000_000
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'topup'", org) == 1
    assert ledger_sum(sql, org) == SIGNUP_MICROS + 10_000_000


def test_an_unpaid_session_credits_nothing_and_a_pack_may_expire(compute, admin, new_org):
    org = new_org()
    pending = {**paid_session(org, 5_000, "pi_later"), "payment_status": "unpaid"}
    assert stripe_deliver(compute, stripe_event("checkout.session.completed", pending)).json()["applied"] == []
    expires = int(time.time()) + 30 * 86_400
    pack = paid_session(org, 5_000, "pi_pack", credit_micros="50000000", credit_expires_at=str(expires))
    stripe_deliver(compute, stripe_event("checkout.session.completed", pack))
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS + 50_000_000
    assert [g["expires_at"] is not None for g in state["grants"]] == [True, False]


def test_subscription_events_set_the_tier_and_an_older_one_never_undoes_a_newer_one(compute, admin, new_org):
    org = new_org()
    t0 = int(time.time()) - 1000

    def subscription(kind: str, tier: str, status: str, created: int):
        sub = {"id": "sub_1", "object": "subscription", "status": status, "metadata": {"org_id": org, "tier": tier}}
        return stripe_deliver(compute, stripe_event(kind, sub, created=created))

    subscription("customer.subscription.created", "pro", "active", t0)
    assert admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 100
    for n in range(7):
        compute.post("/v1/leases", json={"org_id": org, "lease_id": f"l{n}"})
    subscription("customer.subscription.updated", "pro_plus", "active", t0 + 300)
    late = subscription("customer.subscription.updated", "pro", "active", t0 + 200)
    assert late.json()["applied"][0]["stale"] is True
    state = admin.get(f"/v1/orgs/{org}").json()
    assert (state["tier"], state["max_concurrent"]) == ("pro_plus", 600)
    subscription("customer.subscription.deleted", "pro_plus", "canceled", t0 + 400)
    state = admin.get(f"/v1/orgs/{org}").json()
    assert (state["tier"], state["max_concurrent"], state["active_leases"]) == ("base", 5, 7)


def test_refunds_claw_back_each_refund_once_and_only_from_the_payment_they_refund(compute, admin, sql, new_org):
    org = new_org()
    stripe_deliver(compute, stripe_event("checkout.session.completed", paid_session(org, 1_000, "pi_r")))  # +10 USD

    def refunded(*refunds: tuple[str, int], intent: str = "pi_r"):
        charge = {"id": f"ch_{intent}", "object": "charge", "payment_intent": intent, "metadata": {"org_id": org},
                  "amount_refunded": sum(c for _, c in refunds),
                  "refunds": {"data": [{"id": rid, "amount": cents, "status": "succeeded"} for rid, cents in refunds]}}
        return stripe_deliver(compute, stripe_event("charge.refunded", charge))

    refunded(("re_1", 500))  # half of the top-up
    refunded(("re_1", 500))  # the same refund reported again
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS + 5_000_000 and state["is_halted"] is False
    refunded(("re_1", 500), ("re_2", 500))  # a later event lists every refund so far
    refunded(("re_3", 300), intent="pi_subscription_invoice")  # bought no credit: claws back nothing
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == SIGNUP_MICROS  # the signup grant is not what was refunded
    assert [g["kind"] for g in state["grants"]] == ["signup_grant"]
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'refund'", org) == 2
    assert ledger_sum(sql, org) == SIGNUP_MICROS


def test_a_setup_event_is_checked_with_stripe_not_taken_at_its_word(compute, admin, new_org):
    """A card saved is Stripe's fact (tests/test_stripe_contract.py saves real ones): a setup
    event naming no customer of the org saves nothing."""
    org = new_org()
    setup = {"id": "cs_setup", "object": "checkout.session", "mode": "setup", "metadata": {"org_id": org}}
    answer = stripe_deliver(compute, stripe_event("checkout.session.completed", setup)).json()
    assert (answer["outcome"], answer["reason"]) == ("ignored", "no_customer")
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is False


def test_events_for_no_org_are_ignored_and_for_an_unknown_org_are_a_200_dead_letter(compute):
    customer = stripe_event("customer.created", {"id": "cus_1", "object": "customer"})
    assert stripe_deliver(compute, customer).json()["applied"] == []
    ghost = stripe_deliver(compute, stripe_event("checkout.session.completed", paid_session("ghost_org", 100, "pi_g")))
    # A 4xx would make Stripe retry for days and disable the endpoint: answered, kept as a dead letter.
    assert ghost.status_code == 200 and ghost.json()["outcome"] == "dead_letter", ghost.text
    assert ghost.json()["applied"] == [] and ghost.json()["reason"].startswith("unknown_org")


@pytest.mark.parametrize("case", ["bad_signature", "wrong_secret", "replayed", "future", "missing_header",
                                  "not_json"])
def test_bad_deliveries_are_400_and_apply_nothing(compute, admin, sql, new_org, case):
    org = new_org()
    evt = stripe_event("checkout.session.completed", paid_session(org, 700, f"pi_{case}"))
    now = int(time.time())
    body, headers = stripe_signed(evt, secret="whsec_someone_else" if case == "wrong_secret" else STRIPE_WEBHOOK_SECRET,
                           # 5 s past the tolerance: the server reads its clock a moment later
                           at={"replayed": now - 305, "future": now + 305}.get(case, now))
    if case == "bad_signature":
        body = body.replace(b'"amount_total": 700', b'"amount_total": 70000')
    elif case == "missing_header":
        del headers["Stripe-Signature"]
    elif case == "not_json":
        body = b"definitely not json"
        headers["Stripe-Signature"] = stripe.WebhookSignature.generate_signature_header(
            body.decode(), STRIPE_WEBHOOK_SECRET, timestamp=now)
    response = compute.post("/webhooks/stripe", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_signature", "invalid_json")
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", org) == 1
