"""Self-serve money in against a Stripe-protocol server on loopback (localstripe + a Checkout fake)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from config.catalog import load_catalog
from config.settings import Settings
from serve_app.app import build_app
from serve_app.context import Context
from tests.helpers import (
    ADMIN_TOKEN,
    SIGNUP_MICROS,
    URLS,
    fake_sessions,
    free_port,
    ledger_sum,
    mint,
    org_client,
    stripe_client,
    stripe_deliver,
    stripe_event,
)

def test_a_top_up_goes_from_checkout_to_credit_once(service, admin, compute, sql, new_org):
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        first = customer.post(f"/v1/orgs/{org}/checkout/topup", json={"amount_micros": 10_000_000, **URLS})
        double_click = customer.post(f"/v1/orgs/{org}/checkout/topup", json={"amount_micros": 10_000_000, **URLS})
        other = customer.post(f"/v1/orgs/{org}/checkout/topup", json={"amount_micros": 20_000_000, **URLS})
    assert first.status_code == 200, first.text
    assert first.json()["url"].startswith("http") and first.json()["session_id"] == double_click.json()["session_id"]
    assert other.json()["session_id"] != first.json()["session_id"]
    sessions = fake_sessions(service, org)
    assert len(sessions) == 2  # the double click made no second session
    session = next(s for s in sessions if s["id"] == first.json()["session_id"])
    assert (session["mode"], session["amount_total"], session["metadata"]["credit_micros"]) == ("payment", 1000, "10000000")
    # One Stripe customer per org, really created in the Stripe-protocol server.
    assert {s["customer"] for s in sessions} == {session["customer"]}
    assert stripe_client(service).v1.customers.retrieve(session["customer"]).metadata["org_id"] == org

    paid = {**session, "payment_status": "paid", "status": "complete"}
    assert stripe_deliver(compute, stripe_event("checkout.session.completed", paid)).status_code == 200
    again = stripe_event("checkout.session.completed", paid)  # another delivery
    assert stripe_deliver(compute, again).status_code == 200
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + 10_000_000
    assert ledger_sum(sql, org) == SIGNUP_MICROS + 10_000_000


def test_a_pack_with_extras_that_lapse(service, admin, compute, new_org):
    org = new_org()
    response = admin.post(f"/v1/orgs/{org}/checkout/topup", json={"pack_id": "extras_50_30d", **URLS})
    assert response.status_code == 200, response.text
    session = fake_sessions(service, org)[0]
    expires = int(session["metadata"]["credit_expires_at"])
    assert abs(expires - (time.time() + 30 * 86_400)) < 120
    stripe_deliver(compute, stripe_event("checkout.session.completed", {**session, "payment_status": "paid"}))
    grants = admin.get(f"/v1/orgs/{org}").json()["grants"]
    assert [(g["remaining_micros"], g["expires_at"] is not None) for g in grants] == [
        (50_000_000, True), (SIGNUP_MICROS, False)]


def test_saving_a_card_subscribing_to_a_tier_and_the_portal(service, admin, compute, new_org):
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        setup = customer.post(f"/v1/orgs/{org}/checkout/setup", json={})
        tier = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro"})
        portal = customer.post(f"/v1/orgs/{org}/portal", json={})
    assert setup.status_code == tier.status_code == portal.status_code == 200, (setup.text, tier.text, portal.text)
    assert portal.json()["url"].startswith("http")
    sessions = {s["mode"]: s for s in fake_sessions(service, org) if s.get("object") == "checkout.session"}
    assert sessions["setup"]["success_url"].endswith(f"/billing/{org}")
    assert sessions["subscription"]["line_items"][0]["price"] == "price_metergate_pro_monthly"
    assert sessions["subscription"]["subscription_data"]["metadata"] == {"org_id": org, "tier": "pro"}

    # The card, really attached in the Stripe-protocol server; its event names only the customer.
    client = stripe_client(service)
    card = client.v1.payment_methods.create(params={"type": "card", "card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
    attached = client.v1.payment_methods.attach(card.id, params={"customer": sessions["setup"]["customer"]})
    stripe_deliver(compute, stripe_event("payment_method.attached", attached.to_dict()))
    assert admin.get(f"/v1/orgs/{org}").json()["has_payment_method"] is True

    subscription = {"id": "sub_t", "object": "subscription", "status": "active",
                    "customer": sessions["subscription"]["customer"],
                    "metadata": sessions["subscription"]["subscription_data"]["metadata"]}
    stripe_deliver(compute, stripe_event("customer.subscription.created", subscription))
    assert admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 100
    stripe_deliver(compute, stripe_event("customer.subscription.deleted", {**subscription, "status": "canceled"},
                           created=int(time.time()) + 1))
    assert admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 5


def test_self_serve_refuses_bad_requests_and_other_orgs(service, admin, new_org):
    org_a, org_b = new_org(), new_org()
    with org_client(service, mint(admin, org_b)) as other:
        for path, body in ((f"/v1/orgs/{org_a}/checkout/topup", {"amount_micros": 1_000_000}),
                           (f"/v1/orgs/{org_a}/checkout/setup", {}),
                           (f"/v1/orgs/{org_a}/checkout/tier", {"tier": "pro"}),
                           (f"/v1/orgs/{org_a}/portal", {})):
            assert other.post(path, json=body).status_code == 403
    cases = [({"amount_micros": 1_000_000, "pack_id": "starter_10"}, "invalid_request"),
             ({"amount_micros": 1_000_001}, "invalid_amount"),
             ({"amount_micros": 100}, "invalid_request"),
             ({"pack_id": "no_such_pack"}, "unknown_pack")]
    for body, code in cases:
        response = admin.post(f"/v1/orgs/{org_a}/checkout/topup", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (422, code), body
    assert admin.post(f"/v1/orgs/{org_a}/checkout/tier", json={"tier": "base"}).status_code == 422
    assert fake_sessions(service, org_a) == []


def test_without_stripe_keys_the_service_runs_and_self_serve_is_503(service):
    settings = Settings(**{**service.settings.model_dump(), "stripe_secret_key": None})
    app = build_app(Context(settings, load_catalog(settings.catalog), router=None))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate") as client:
            return await client.post("/v1/orgs/any_org/checkout/topup", json={"amount_micros": 1_000_000},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    response = asyncio.run(call())
    assert response.status_code == 503 and response.json()["error"]["code"] == "stripe_not_configured"


@pytest.mark.parametrize("path", ["checkout/setup", "checkout/tier", "portal"])
def test_unknown_org_self_serve_is_404(admin, path):
    body = {"tier": "pro"} if path == "checkout/tier" else {}
    response = admin.post(f"/v1/orgs/ghost_self_serve/{path}", json=body)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_org"


def test_stripe_out_of_reach_is_a_502_not_a_500(service, new_org):
    org = new_org()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(**{**service.settings.model_dump(), "stripe_api_base": closed})
    app = build_app(Context(settings, load_catalog(settings.catalog), router=None))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     timeout=60) as client:
            return await client.post(f"/v1/orgs/{org}/checkout/setup", json={},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    response = asyncio.run(call())
    assert response.status_code == 502 and response.json()["error"]["code"] == "stripe_error"
