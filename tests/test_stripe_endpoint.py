"""Stripe as it really behaves, at the endpoint and the charger (issue 24, findings 8, 9, 11):
a verified event is answered 2xx and recorded with its outcome whatever became of it (a 4xx
makes Stripe retry for days and disable the endpoint); a removed card or a deleted customer
reaches the org; the charger sends the same parameters under one idempotency key, after a
restart too, and takes an idempotency error for an answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from actors.charger import Charger
from actors.clock import now_us
from actors.recharge import ChargeRequest
from serve_app.webhooks_in import livemode_matches
from tests.helpers import (
    ADMIN_TOKEN,
    SERVICE_TOKEN,
    SIGNUP_MICROS,
    URLS,
    footprint,
    ledger_sum,
    stripe_client,
    stripe_deliver,
    stripe_event,
)

US = 1_000_000
CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2031, "cvc": "123"}
OTHER_CARD = {**CARD, "number": "5555555555554444"}
METERGATE = Path(sys.executable).parent / "metergate"


def paid_session(org: str, cents: int, **extra) -> dict:
    return {"id": f"cs_{uuid.uuid4().hex[:12]}", "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "amount_total": cents, "payment_intent": f"pi_{uuid.uuid4().hex[:12]}",
            "client_reference_id": org, "metadata": {"org_id": org}, **extra}


def inbound(admin, **params) -> dict:
    response = admin.get("/v1/webhooks/inbound", params=params)
    assert response.status_code == 200, response.text
    return response.json()


# ----- finding 9: permanent failures are 2xx and recorded; transient ones stay 5xx -----------


def test_an_event_for_an_unknown_org_is_answered_200_and_kept_as_a_dead_letter(compute, admin):
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    event = stripe_event("checkout.session.completed", paid_session(ghost, 100))
    answer = stripe_deliver(compute, event)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["outcome"], body["applied"]) == ("dead_letter", [])
    assert body["reason"].startswith("unknown_org:") and ghost in body["reason"]
    # Stripe delivers it again: the first answer, applied no more than before.
    again = stripe_deliver(compute, event)
    assert again.status_code == 200 and again.json() == {**body, "duplicate": True}
    (listed,) = [e for e in inbound(admin, outcome="dead_letter", limit=50)["events"] if e["id"] == event["id"]]
    assert (listed["type"], listed["outcome"], listed["status"]) == ("checkout.session.completed", "dead_letter", 200)
    assert listed["reason"] == body["reason"]
    assert event["id"] not in [e["id"] for e in inbound(admin, outcome="ignored", limit=50)["events"]]


def test_an_event_metergate_cannot_read_is_a_dead_letter_that_changes_nothing(compute, admin, sql, new_org):
    org = new_org()
    before = footprint(sql, org)
    for amount in (12.7, True, "lots", 0):
        answer = stripe_deliver(compute, stripe_event("checkout.session.completed",
                                                      paid_session(org, 100, amount_total=amount)))
        assert answer.status_code == 200, (amount, answer.text)
        assert answer.json()["outcome"] == "dead_letter", (amount, answer.text)
        assert answer.json()["reason"].startswith("unprocessable_event:"), answer.text
    assert footprint(sql, org) == before


def test_an_event_of_the_other_mode_is_ignored_and_one_of_this_mode_applied(compute, admin, sql, new_org):
    org = new_org()
    live = stripe_event("checkout.session.completed", paid_session(org, 700))
    live["livemode"] = True  # the tests' key is sk_test_...: a live event is another deployment's
    answer = stripe_deliver(compute, live).json()
    assert (answer["outcome"], answer["reason"], answer["applied"]) == ("ignored", "livemode_mismatch", [])
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS
    listed = inbound(admin, outcome="ignored", limit=50)["events"]
    assert [e["reason"] for e in listed if e["id"] == live["id"]] == ["livemode_mismatch"]
    test = stripe_event("checkout.session.completed", paid_session(org, 700))
    test["livemode"] = False
    assert stripe_deliver(compute, test).json()["outcome"] == "applied"
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + 7 * US
    assert ledger_sum(sql, org) == SIGNUP_MICROS + 7 * US


def test_livemode_matches_the_mode_of_the_key():
    assert livemode_matches({"livemode": True}, "sk_live_abc") and livemode_matches({"livemode": True}, "rk_live_abc")
    assert livemode_matches({"livemode": False}, "sk_test_abc") and livemode_matches({"livemode": False}, None)
    assert not livemode_matches({"livemode": True}, "sk_test_abc") and not livemode_matches({"livemode": True}, None)
    assert not livemode_matches({"livemode": False}, "sk_live_abc")
    assert not livemode_matches({"livemode": "true"}, "sk_live_abc")  # not Stripe's boolean
    assert livemode_matches({}, "sk_live_abc") and livemode_matches({}, "sk_test_abc")  # no field: matches


def test_events_with_nothing_to_apply_are_ignored_with_why(compute, new_org):
    created = stripe_deliver(compute, stripe_event("customer.created", {"id": "cus_x", "object": "customer"})).json()
    assert (created["outcome"], created["reason"]) == ("ignored", "ignored_type: metergate creates its customers itself")
    nobody = {**paid_session("x", 100), "client_reference_id": None, "metadata": {}}
    answer = stripe_deliver(compute, stripe_event("checkout.session.completed", nobody)).json()
    assert (answer["outcome"], answer["reason"]) == ("ignored", "no_org")
    unpaid = {**paid_session(new_org(), 100), "payment_status": "unpaid"}
    answer = stripe_deliver(compute, stripe_event("checkout.session.completed", unpaid)).json()
    assert (answer["outcome"], answer["reason"], answer["applied"]) == ("ignored", "nothing_to_apply", [])
    other = stripe_deliver(compute, stripe_event("balance.available", {"object": "balance"})).json()
    assert (other["outcome"], other["reason"]) == ("ignored", "unhandled_type")


def test_the_dead_letter_view_pages_newest_first_and_refuses_what_it_cannot_read(compute, admin, service):
    ids = []
    for _ in range(3):
        event = stripe_event("checkout.session.completed", paid_session(f"ghost_{uuid.uuid4().hex[:8]}", 100))
        assert stripe_deliver(compute, event).json()["outcome"] == "dead_letter"
        ids.append(event["id"])
    pages, cursor = [], None
    for n in range(3):
        page = inbound(admin, outcome="dead_letter", limit=1, **({"cursor": cursor} if cursor else {}))
        pages += [e["id"] for e in page["events"]]
        assert n == 2 or (page["has_more"] is True and page["next_cursor"]), page
        cursor = page["next_cursor"]
    assert pages == ids[::-1]
    both = [e["id"] for e in inbound(admin, limit=3)["events"]]
    assert both == ids[::-1]
    for params, status, code in (({"outcome": "applied"}, 422, "invalid_request"),
                                 ({"limit": 0}, 422, "invalid_request"),
                                 ({"cursor": "not-a-cursor"}, 400, "invalid_cursor"),
                                 ({"cursor": "MTJ8AA=="}, 400, "invalid_cursor")):  # "12|\x00"
        response = admin.get("/v1/webhooks/inbound", params=params)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (params, response.text)
    with httpx.Client(base_url=service.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as not_admin:
        assert not_admin.get("/v1/webhooks/inbound").status_code == 403

    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update(METERGATE_URL=service.base_url, METERGATE_ADMIN_TOKEN=ADMIN_TOKEN, COLUMNS="200")

    def cli(*args: str) -> str:
        done = subprocess.run([str(METERGATE), "inbound", "list", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert (done.returncode, done.stderr) == (0, ""), (done.stdout, done.stderr)
        return done.stdout

    listed = json.loads(cli("--outcome", "dead_letter", "--limit", "2", "--json"))
    assert [e["id"] for e in listed["events"]] == ids[:0:-1] and listed["has_more"] is True
    table = cli("--limit", "3")
    assert all(event_id in table for event_id in ids) and "unknown_org" in table


# ----- finding 8: a removed card, a deleted customer -----------------------------------------


def customer_with_cards(service, admin, compute, org: str, cards: int) -> tuple[str, list[str]]:
    """The org's Stripe customer (made by metergate's Checkout) with cards attached, on file."""
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
    client = stripe_client(service)
    customer = None
    for session in httpx.get(f"{service.settings.stripe_api_base}/_fake/sessions", timeout=10).json():
        if session.get("client_reference_id") == org:
            customer = session["customer"]
    assert customer is not None
    methods = []
    for number in (CARD, OTHER_CARD)[:cards]:
        card = client.v1.payment_methods.create(params={"type": "card", "card": number})
        attached = client.v1.payment_methods.attach(card.id, params={"customer": customer})
        stripe_deliver(compute, stripe_event("payment_method.attached", attached.to_dict()))
        methods.append(card.id)
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is True
    return customer, methods


def detached_event(service, method_id: str, customer: str) -> dict:
    detached = stripe_client(service).v1.payment_methods.detach(method_id).to_dict()
    assert detached["customer"] is None
    event = stripe_event("payment_method.detached", detached)
    event["data"]["previous_attributes"] = {"customer": customer}
    return event


def test_removing_the_last_card_leaves_the_org_without_a_payment_method(service, admin, compute, new_org):
    org = new_org()
    customer, (first, second) = customer_with_cards(service, admin, compute, org, 2)
    answer = stripe_deliver(compute, detached_event(service, first, customer))
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is True  # the other card is left
    assert answer.json()["outcome"] == "applied", answer.text
    answer = stripe_deliver(compute, detached_event(service, second, customer))
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is False
    assert answer.json()["applied"] == [{"org_id": org, "command": "SetPaymentMethod", "replayed": False,
                                         "stale": False}], answer.text


def test_a_stripe_read_refused_for_good_is_a_dead_letter_not_a_503_stripe_retries_for_days(service, admin, compute,
                                                                                          new_org):
    """A key that may not read payment methods (403) will not be allowed on the next delivery
    either: the operator must act, and Stripe must not retry for days and disable the endpoint."""
    org = new_org()
    customer, (card,) = customer_with_cards(service, admin, compute, org, 1)
    control = f"{service.settings.stripe_api_base}/_fake/payment_methods"
    httpx.post(control, json={"fail_next": 100, "status": 403}, timeout=10)
    try:
        answer = stripe_deliver(compute, detached_event(service, card, customer))
    finally:
        httpx.post(control, json={"fail_next": 0}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "dead_letter" and "refused to show" in answer.json()["reason"]


def test_a_detached_card_while_stripe_is_unreachable_is_a_503_that_stripe_retries(service, admin, compute, new_org):
    org = new_org()
    customer, (card,) = customer_with_cards(service, admin, compute, org, 1)
    event = detached_event(service, card, customer)
    control = f"{service.settings.stripe_api_base}/_fake/payment_methods"
    httpx.post(control, json={"fail_next": 100}, timeout=10)
    try:
        answer = stripe_deliver(compute, event)
    finally:
        httpx.post(control, json={"fail_next": 0}, timeout=10)
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "stripe_unavailable"), answer.text
    assert answer.headers.get("retry-after")
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is True
    # Stripe delivers it again once it answers: nothing was recorded, so now it applies.
    again = stripe_deliver(compute, event)
    assert again.json()["outcome"] == "applied" and "duplicate" not in again.json(), again.text
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is False


def test_a_deleted_customer_is_forgotten_and_the_next_checkout_makes_a_new_one(service, admin, compute, sql,
                                                                               new_org):
    org = new_org()
    customer, _ = customer_with_cards(service, admin, compute, org, 1)
    stripe_client(service).v1.customers.delete(customer)
    deleted = stripe_event("customer.deleted", {"id": customer, "object": "customer", "metadata": {"org_id": org}})
    answer = stripe_deliver(compute, deleted)
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is False
    assert answer.json()["outcome"] == "applied", answer.text
    assert sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org) is None
    assert sql.val("SELECT org_id FROM stripe_customers_forgotten WHERE customer_id = $1", customer) == org
    # The same deletion again (another event id): the customer is no one's any more.
    later = stripe_deliver(compute, stripe_event("customer.deleted", {"id": customer, "object": "customer"})).json()
    assert (later["outcome"], later["reason"]) == ("ignored", "unknown_customer")
    response = admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS)
    assert response.status_code == 200, response.text
    renewed = sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org)
    assert renewed is not None and renewed != customer


# ----- finding 11 and build item 5: the charger ------------------------------------------------


def charge_with_new_chargers(service, request: ChargeRequest, times: int = 1):
    """Each attempt by a new Charger, as after a shard restart: nothing kept in memory."""

    async def run():
        pool = await asyncpg.create_pool(service.settings.database_url, min_size=1, max_size=2)
        try:
            return [await Charger(service.settings, pool).charge(request) for _ in range(times)]
        finally:
            await pool.close()

    return asyncio.run(run())


def customer_of_org(service, sql, org: str) -> str:
    customer = stripe_client(service).v1.customers.create(params={"email": f"{org}@example.com",
                                                                  "metadata": {"org_id": org}})
    sql.val("INSERT INTO stripe_customers (org_id, customer_id) VALUES ($1, $2) RETURNING 1", org, customer.id)
    return customer.id


def new_card(service, customer: str, number: dict, default: bool) -> str:
    client = stripe_client(service)
    card = client.v1.payment_methods.create(params={"type": "card", "card": number})
    client.v1.payment_methods.attach(card.id, params={"customer": customer})
    if default:
        client.v1.customers.update(customer, params={"invoice_settings": {"default_payment_method": card.id}})
    return card.id


def intents_by_key(service) -> dict:
    return httpx.get(f"{service.settings.stripe_api_base}/_fake/payment_intents/keys", timeout=10).json()


def charge_request(org: str) -> ChargeRequest:
    charge_id = uuid.uuid4().hex[:8]
    return ChargeRequest(org, charge_id, 10 * US, f"metergate:{org}:test:auto_recharge:{charge_id}", now_us())


def test_a_charge_of_an_org_whose_customer_is_linked_just_after_waits_for_it_then_goes_through(
        service, sql, new_org):
    """An import asks for the charge in the org's commit and links its Stripe customer right
    after: the charger leaves the charge pending a while (the shard asks again), then charges.
    One asked for long ago with still no customer fails as before."""
    org = new_org()
    request = charge_request(org)
    assert charge_with_new_chargers(service, request) == [None]  # pending, not failed
    customer = customer_of_org(service, sql, org)
    new_card(service, customer, CARD, default=True)
    (done,) = charge_with_new_chargers(service, request)
    assert done is not None and done.succeeded, done
    old = msgspec.structs.replace(charge_request(new_org()), requested_us=now_us() - 11 * 60 * US)
    (failed,) = charge_with_new_chargers(service, old)
    assert failed is not None and (failed.succeeded, failed.reason) == (False, "no_stripe_customer")


def test_a_charge_retried_after_a_restart_sends_what_its_first_attempt_sent(service, sql, new_org):
    org = new_org()
    customer = customer_of_org(service, sql, org)
    first_card = new_card(service, customer, CARD, default=True)
    sql.val("INSERT INTO charge_payment_methods (idempotency_key, payment_method_id, chosen_at)"
            " VALUES ($1, 'pm_long_ago', now() - interval '3 days') RETURNING 1", f"old_{org}")
    request = charge_request(org)
    (first,) = charge_with_new_chargers(service, request)
    assert first is not None and first.succeeded, first
    # The customer makes another card the default; the shard restarts and asks again.
    new_card(service, customer, OTHER_CARD, default=True)
    started = time.monotonic()
    (again,) = charge_with_new_chargers(service, request)
    assert again is not None and again.succeeded, again  # not an idempotency error retried as an outage
    assert time.monotonic() - started < 5
    assert (again.payment_id, again.amount_micros) == (first.payment_id, 10 * US)  # one PaymentIntent
    intent = intents_by_key(service)[request.idempotency_key]
    assert (intent["id"], intent["payment_method"]) == (first.payment_id, first_card)
    assert sql.val("SELECT payment_method_id FROM charge_payment_methods WHERE idempotency_key = $1",
                   request.idempotency_key) == first_card
    assert sql.val("SELECT count(*) FROM charge_payment_methods WHERE idempotency_key = $1", f"old_{org}") == 0


def test_a_charge_sent_under_the_key_of_the_release_before_keeps_it_and_is_not_made_twice(service, sql, new_org):
    """Keys now end with the instant the charge was asked for (a restore rewinds the count k).
    A charge in flight across the upgrade was sent under the old key: its retry uses it."""
    org = new_org()
    customer = customer_of_org(service, sql, org)
    new_card(service, customer, CARD, default=True)
    asked = now_us()
    legacy = ChargeRequest(org, "ar_7", 10 * US, f"metergate:{org}:1:auto_recharge:ar_7", asked)
    (first,) = charge_with_new_chargers(service, legacy)  # the release before sends it
    assert first is not None and first.succeeded, first
    upgraded = ChargeRequest(org, "ar_7", 10 * US, f"{legacy.idempotency_key}:{asked}", asked)
    (again,) = charge_with_new_chargers(service, upgraded)
    assert again is not None and again.payment_id == first.payment_id  # one PaymentIntent, not two
    assert upgraded.idempotency_key not in intents_by_key(service)
    # A charge asked for after the upgrade goes out under its new key.
    fresh = ChargeRequest(org, "ar_8", 10 * US, f"metergate:{org}:1:auto_recharge:ar_8:{asked + 1}", asked + 1)
    (made,) = charge_with_new_chargers(service, fresh)
    assert made is not None and made.succeeded and made.payment_id != first.payment_id
    assert intents_by_key(service)[fresh.idempotency_key]["id"] == made.payment_id


def test_an_idempotency_error_settles_the_charge_as_failed_at_once(service, sql, new_org):
    org = new_org()
    customer = customer_of_org(service, sql, org)
    card = new_card(service, customer, CARD, default=True)
    request = charge_request(org)
    # The key was used before with other parameters (another amount): Stripe refuses it for good.
    stripe_client(service).v1.payment_intents.create(params={
        "amount": 500, "currency": "usd", "customer": customer, "payment_method": card, "confirm": True,
        "off_session": True}, options={"idempotency_key": request.idempotency_key})
    started = time.monotonic()
    (settled,) = charge_with_new_chargers(service, request)
    assert settled is not None, "an idempotency error was taken for an outage (the charge stays pending)"
    assert (settled.succeeded, settled.reason, settled.charge_id) == (False, "idempotency_conflict", request.charge_id)
    assert time.monotonic() - started < 5


def test_without_a_default_the_charger_uses_the_newest_payment_method_of_any_type(service, sql, new_org):
    org = new_org()
    customer = customer_of_org(service, sql, org)
    client = stripe_client(service)
    new_card(service, customer, CARD, default=False)
    debit = client.v1.payment_methods.create(params={"type": "sepa_debit",
                                                     "sepa_debit": {"iban": "DE89370400440532013000"}})
    client.v1.payment_methods.attach(debit.id, params={"customer": customer})
    request = charge_request(org)
    (settled,) = charge_with_new_chargers(service, request)
    assert settled is None or settled.succeeded, settled  # a SEPA debit may still be processing
    assert intents_by_key(service)[request.idempotency_key]["payment_method"] == debit.id
