"""Self-serve money in against a Stripe-protocol server on loopback (localstripe + a Checkout fake)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from actors.routing import ShardRouter
from config.catalog import load_catalog
from config.settings import Settings
from serve_app.app import build_app
from serve_app.context import Context
from serve_app.routes.self_serve import TierSubscription, tier_subscriptions
from tests.helpers import (
    ADMIN_TOKEN,
    CATALOG,
    SIGNUP_MICROS,
    STRIPE_WEBHOOK_SECRET,
    URLS,
    fake_sessions,
    free_port,
    ledger_sum,
    mint,
    org_client,
    stripe_client,
    stripe_deliver,
    stripe_event,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
PRICES = CATALOG.stripe_prices
SUBSCRIPTION_EVENTS = ["checkout.session.completed", "customer.subscription.created",
                       "customer.subscription.updated", "customer.subscription.deleted"]


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
    app = build_app(Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map)))

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
    app = build_app(Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map)))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     timeout=60) as client:
            return await client.post(f"/v1/orgs/{org}/checkout/setup", json={},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    response = asyncio.run(call())
    assert response.status_code == 502 and response.json()["error"]["code"] == "stripe_error"


# ----- a tier change of an org already subscribed: the subscription is changed in place --------


def subscription(status: str = "active", price: str | None = PRICES["pro"], metadata: dict | None = None,
                 items: int = 1, sub_id: str = "sub_1") -> dict:
    """A subscription as Stripe lists it: the first item priced `price` (None: not a catalog
    price), the others an add-on."""
    prices = [price or "price_elsewhere"] + ["price_other_addon"] * (items - 1)
    data = [{"id": f"si_{sub_id}_{n}", "price": {"id": item_price}} for n, item_price in enumerate(prices)]
    return {"id": sub_id, "status": status, "metadata": metadata or {}, "items": {"data": data}}


def test_only_live_subscriptions_of_the_org_with_a_tier_price_or_tag_are_its_tier_subscription():
    live = [subscription(status, sub_id=f"sub_{status}") for status in ("active", "trialing", "past_due")]
    ended = [subscription(status, sub_id=f"sub_{status}")
             for status in ("incomplete", "incomplete_expired", "canceled", "unpaid", "paused")]
    assert [s.subscription_id for s in tier_subscriptions(live + ended, "org_a", CATALOG)] == [
        "sub_active", "sub_trialing", "sub_past_due"]
    # A portal-made subscription has no metadata: its price says the tier.
    assert tier_subscriptions([subscription(price=PRICES["pro_plus"])], "org_a", CATALOG) == [
        TierSubscription("sub_1", "si_sub_1_0", "pro_plus", 0)]
    # Tagged only (a price metergate no longer sells): the one item carries it.
    tagged = subscription(price=None, metadata={"org_id": "org_a", "tier": "pro", "tier_changes": "3"})
    assert tier_subscriptions([tagged], "org_a", CATALOG) == [TierSubscription("sub_1", "si_sub_1_0", "pro", 3)]
    # Several items, none a tier's price: a tier subscription whose item cannot be told.
    unpriced = subscription(price=None, items=2, metadata={"tier": "pro"})
    assert tier_subscriptions([unpriced], "org_a", CATALOG)[0].item_id is None
    # The tier price's item among others is the one that changes.
    assert tier_subscriptions([subscription(items=3)], "org_a", CATALOG)[0].item_id == "si_sub_1_0"
    # Not metergate's (no tier price, no tag), or another org's.
    assert tier_subscriptions([subscription(price=None)], "org_a", CATALOG) == []
    assert tier_subscriptions([subscription(metadata={"org_id": "org_b", "tier": "pro"})], "org_a", CATALOG) == []
    assert tier_subscriptions([subscription(metadata={"tier_changes": "x1"})], "org_a", CATALOG)[0].tier_changes == 0


def test_an_unknown_proration_behavior_is_refused_at_start_naming_the_variable_and_the_choices(tmp_path):
    with pytest.raises(ValidationError):
        Settings(stripe_proration_behavior="prorate")
    env = {**os.environ, "METERGATE_STRIPE_PRORATION_BEHAVIOR": "prorate", "METERGATE_DATA_DIR": str(tmp_path)}
    started = subprocess.run([sys.executable, "-m", "serve_app.main"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    assert started.returncode == 2, (started.stdout, started.stderr)
    assert "METERGATE_STRIPE_PRORATION_BEHAVIOR" in started.stderr
    assert all(choice in started.stderr for choice in ("create_prorations", "always_invoice", "'none'"))
    assert "Traceback" not in started.stderr and not (tmp_path / "pg").exists()  # nothing was started


@pytest.fixture(scope="module")
def subscription_webhooks(service):
    """localstripe and the front deliver their subscription events to the service meanwhile."""
    api = service.settings.stripe_api_base
    hook = {"url": f"{service.base_url}/webhooks/stripe", "secret": STRIPE_WEBHOOK_SECRET,
            "events": SUBSCRIPTION_EVENTS}
    assert httpx.post(f"{api}/_config/webhooks/self_serve_tiers", json=hook, timeout=10).status_code == 200
    yield
    httpx.post(f"{api}/_config/webhooks/self_serve_tiers", json={**hook, "events": []}, timeout=10)


def subscribe(service, customer, org: str, tier: str) -> dict:
    """The org's first tier, through Checkout as a customer does it: the session, then Stripe's subscription."""
    answer = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": tier, **URLS})
    assert answer.status_code == 200, answer.text
    assert set(answer.json()) == {"url", "session_id"}  # the Checkout answer, as before tier changes
    done = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{answer.json()['session_id']}/complete",
                      json={}, timeout=30)
    assert done.status_code == 200, done.text
    return done.json()


def updates_of(service, subscription_id: str) -> list[dict]:
    updates = httpx.get(f"{service.settings.stripe_api_base}/_fake/subscription_updates", timeout=10).json()
    return [u for u in updates if u["subscription"] == subscription_id]


def live_subscriptions(service, customer_id: str) -> list[dict]:
    listed = stripe_client(service).v1.subscriptions.list(params={"customer": customer_id, "limit": 100})
    return [s.to_dict() for s in listed.data if s.status in ("active", "trialing", "past_due")]


def test_pro_to_pro_plus_changes_the_one_subscription_once_and_stripe_s_event_moves_the_tier(
        service, subscription_webhooks, admin, new_org):
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        session = subscribe(service, customer, org, "pro")
        wait_for("the pro cap", lambda: admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 100)

        key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
        change = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro_plus", **URLS}, headers=key)
        again = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro_plus", **URLS}, headers=key)
        assert change.status_code == 200, change.text
        assert change.json() == {"updated": True, "subscription_id": session["subscription"], "tier": "pro_plus",
                                 "previous_tier": "pro", "proration_behavior": "create_prorations",
                                 "url": URLS["success_url"]}
        assert again.json() == change.json()
        # A double click without a key, both at once: one Stripe update between them (the same
        # content key), or the second finds the tier already there.
        with ThreadPoolExecutor(2) as pool:
            clicks = list(pool.map(lambda _: customer.post(f"/v1/orgs/{org}/checkout/tier",
                                                           json={"tier": "pro_plus_plus", **URLS}), range(2)))
        assert [c.status_code for c in clicks] == [200, 200], [c.text for c in clicks]
        assert {c.json()["subscription_id"] for c in clicks} == {session["subscription"]}
        assert any(c.json()["updated"] for c in clicks)
        # The tier it already has: answered, nothing sent to Stripe.
        same = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro_plus_plus", **URLS})
        assert same.json() == {"updated": False, "subscription_id": session["subscription"],
                               "tier": "pro_plus_plus", "url": URLS["success_url"]}

    updates = updates_of(service, session["subscription"])
    assert [(u["prices"], u["proration_behavior"]) for u in updates] == [
        ([PRICES["pro_plus"]], "create_prorations"), ([PRICES["pro_plus_plus"]], "create_prorations")]
    assert updates[-1]["metadata"] == {"org_id": org, "tier": "pro_plus_plus", "tier_changes": "2"}
    (live,) = live_subscriptions(service, session["customer"])
    assert live["id"] == session["subscription"]
    assert [item["price"]["id"] for item in live["items"]["data"]] == [PRICES["pro_plus_plus"]]
    assert [s["mode"] for s in fake_sessions(service, org)] == ["subscription"]  # no second Checkout
    # The tier moves when Stripe reports the change, not when the route answers.
    wait_for("the pro_plus_plus cap", lambda: admin.get(f"/v1/orgs/{org}").json()["max_concurrent"] == 1000)


def test_changing_back_and_forth_within_the_double_click_window_makes_every_change(service, admin, new_org):
    """pro → pro_plus → pro → pro_plus with no Idempotency-Key, within 10 minutes: the third
    change has the first one's content, yet it is a change of its own, not a replay."""
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        session = subscribe(service, customer, org, "pro")
        for tier in ("pro_plus", "pro", "pro_plus"):
            answer = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": tier, **URLS})
            assert answer.status_code == 200 and answer.json()["updated"] is True, answer.text
    assert [u["prices"] for u in updates_of(service, session["subscription"])] == [
        [PRICES["pro_plus"]], [PRICES["pro"]], [PRICES["pro_plus"]]]
    (live,) = live_subscriptions(service, session["customer"])
    assert [item["price"]["id"] for item in live["items"]["data"]] == [PRICES["pro_plus"]]


def test_the_operator_s_proration_setting_goes_to_stripe(service, admin, new_org):
    org = new_org()
    session = subscribe(service, admin, org, "pro")
    settings = Settings(**{**service.settings.model_dump(), "stripe_proration_behavior": "none"})
    app = build_app(Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map)))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     timeout=60) as client:
            return await client.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro_plus"},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    answer = asyncio.run(call())
    assert answer.status_code == 200, answer.text
    assert answer.json()["proration_behavior"] == "none"
    assert answer.json()["url"].endswith(f"/billing/{org}")  # no success_url given: the billing page
    assert [u["proration_behavior"] for u in updates_of(service, session["subscription"])] == ["none"]


def test_two_live_tier_subscriptions_are_refused_and_left_alone(service, admin, new_org):
    """Made before tier changes updated in place: which to keep is the customer's call, in the portal."""
    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        first = subscribe(service, customer, org, "pro")
        second = stripe_client(service).v1.subscriptions.create(params={
            "customer": first["customer"], "items": [{"plan": PRICES["pro"]}],
            "metadata": {"org_id": org, "tier": "pro"}})
        assert second.status == "active"
        refused = customer.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro_plus", **URLS})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "several_tier_subscriptions"
    assert refused.json()["error"]["subscription_ids"] == sorted([first["subscription"], second.id])
    assert updates_of(service, first["subscription"]) == updates_of(service, second.id) == []


def test_a_subscription_on_a_repriced_tier_price_is_the_org_s_tier_subscription():
    """ensure-products moved pro's lookup key to a new price; a subscription made in the portal
    (no metergate metadata) on the old pro price is still the org's pro subscription: otherwise
    a tier Checkout would open a second paid subscription next to it."""
    old_pro = {"id": "price_old_pro", "lookup_key": None, "metadata": {"metergate": "metergate_tier_pro_monthly"}}
    portal_made = {"id": "sub_1", "status": "active", "metadata": {},
                   "items": {"data": [{"id": "si_1", "price": old_pro}]}}
    assert tier_subscriptions([portal_made], "org_a", CATALOG) == [TierSubscription("sub_1", "si_1", "pro", 0)]
    # Switched in the portal to the old pro price after opening pro_plus: the price says pro.
    switched = {**portal_made, "metadata": {"org_id": "org_a", "tier": "pro_plus"}}
    assert [s.tier for s in tier_subscriptions([switched], "org_a", CATALOG)] == ["pro"]
    # Not a tier's key, or odd metadata: not a tier price.
    for odd in ({"metergate": "metergate_pack_starter_10"}, "metergate_tier_pro_monthly", ["x"]):
        odd_price = {**portal_made, "items": {"data": [{"id": "si_1", "price": {**old_pro, "metadata": odd}}]}}
        assert tier_subscriptions([odd_price], "org_a", CATALOG) == []
