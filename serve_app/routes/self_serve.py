"""Self-serve (the org's own token, or admin): Stripe Checkout for top-ups, cards and tiers,
and the customer portal. The billing page's forms (routes/billing.py) start the very same
sessions through the functions here.

A tier for an org whose Stripe customer already has a live metergate tier subscription is not
a second Checkout: Stripe lets a customer hold many subscriptions, and Pro then Pro+ would
bill both. That subscription's item moves to the new tier's price instead, prorated as
METERGATE_STRIPE_PRORATION_BEHAVIOR says. The org's tier itself changes only when Stripe's
`customer.subscription.updated` arrives, as for any other subscription change."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from fastapi import APIRouter, Request, Response

from actors.clock import now_us
from actors.stripe_products import tier_of_price
from actors.org import MICROS_PER_CENT
from config.catalog import Catalog
from config.settings import origin_of
from serve_app import openapi
from serve_app.bodies import PortalBody, SetupBody, TierCheckoutBody, TopupBody, parse_model
from serve_app.calls import org_state
from serve_app.context import Context, json
from serve_app.errors import ApiError, unknown_org
from serve_app.idempotency import idempotent
from serve_app.params import OrgPath
from serve_app.stripe_events import PAID_TIERS
from serve_app.stripe_gateway import operation_key
from storage import stripe_customers


# The subscription states that hold a tier (past_due too: it still bills): a tier change of an
# org with one of these updates it rather than opening another.
LIVE_SUBSCRIPTION = frozenset({"active", "trialing", "past_due"})
SUBSCRIPTIONS_PAGE = 100  # Stripe's largest page
SUBSCRIPTION_PAGES_MAX = 10
# In the subscription's metadata: how many tier changes metergate made to it. It is part of the
# change's idempotency key, so that pro → pro_plus → pro → pro_plus within the double-click
# window is three updates, not a replay of the first.
TIER_CHANGES = "tier_changes"


class Checkout(NamedTuple):
    """A Checkout Session to create: the operation (it names the Stripe idempotency key) and
    its parameters, checked before anything reaches Stripe."""

    operation: str
    params: dict
    tier: str | None = None  # a paid tier: an org already subscribed has its subscription changed instead


class TierSubscription(NamedTuple):
    """A live metergate tier subscription of the org's customer, as Stripe lists it."""

    subscription_id: str
    item_id: str | None  # the item carrying the tier's price; None: no single such item
    tier: str  # from that item's price, else from metadata.tier
    tier_changes: int  # metadata.tier_changes: the tier changes metergate made to it


def tier_subscriptions(subscriptions: list[dict], org_id: str, catalog: Catalog) -> list[TierSubscription]:
    """The live subscriptions among a customer's that are the org's metergate tier: an item with
    a tier's price (`tier_of_price`: as the webhook reads it), or `metadata.tier` naming a paid
    tier. One tagged for another org is not this org's."""
    found = []
    for subscription in subscriptions:
        metadata = subscription.get("metadata") or {}
        if subscription.get("status") not in LIVE_SUBSCRIPTION or metadata.get("org_id", org_id) != org_id:
            continue
        items = (subscription.get("items") or {}).get("data") or []
        priced = [(item["id"], tier) for item in items
                  if (tier := tier_of_price(item.get("price"), catalog)) is not None]
        if len(priced) == 1:
            item_id, tier = priced[0]
        elif not priced and metadata.get("tier") in PAID_TIERS:
            item_id, tier = (items[0]["id"] if len(items) == 1 else None), metadata["tier"]
        elif priced:
            item_id, tier = None, priced[0][1]
        else:
            continue
        changes = str(metadata.get(TIER_CHANGES, ""))
        found.append(TierSubscription(subscription["id"], item_id, tier,
                                      int(changes) if changes.isascii() and changes.isdigit() else 0))
    return found


async def customer_for(ctx: Context, org_id: str) -> str:
    """The org's Stripe customer, created once (Stripe's idempotency key makes a race create one)."""
    pool = await ctx.db()
    async with pool.acquire() as conn:
        contact = await stripe_customers.billing_contact(conn, org_id)
        forgotten = await stripe_customers.forgotten_count(conn, org_id)
    if contact is None:
        raise unknown_org(org_id)
    email, customer_id = contact
    if customer_id:
        return customer_id
    client = ctx.stripe.require()
    # After Stripe deleted the org's customer, the same key would give that deleted customer
    # back for 24 hours: each new customer of the org has its own key.
    key = f"metergate:customer:{org_id}" + (f":{forgotten}" if forgotten else "")
    customer = await ctx.stripe.create(client.v1.customers.create,
                                       {"email": email, "metadata": {"org_id": org_id}}, key)
    async with pool.acquire() as conn:
        return await stripe_customers.remember(conn, org_id, customer.id)


def billing_url(ctx: Context, org_id: str) -> str:
    """Where Stripe sends the customer back by default: the org's billing page at the public
    URL (never the request's Host, which a caller chooses), with no token in it: the page's
    cookie carries the session."""
    return f"{ctx.settings.public_base}/billing/{org_id}"


def return_url(ctx: Context, url: str | None, field: str, org_id: str) -> str:
    """A Checkout or portal return URL the caller gave, if it leads to an allowed origin (the
    public URL's, or one in METERGATE_ALLOWED_RETURN_ORIGINS); else the org's billing page. Any
    other: a holder of an org token could mail operator-branded Checkout links that land the
    payer on a page of theirs."""
    if url is None:
        return billing_url(ctx, org_id)
    try:
        origin = origin_of(url)[0]
    except ValueError:
        raise ApiError(422, "invalid_request", f"{field} is not an http(s) URL with a host", field=field) from None
    if origin not in ctx.settings.return_origins():
        raise ApiError(422, "invalid_request", f"{field} must lead to {ctx.settings.public_base} or an origin in "
                       "METERGATE_ALLOWED_RETURN_ORIGINS (https)", field=field)
    return url


def topup_checkout(ctx: Context, org_id: str, body: TopupBody) -> Checkout:
    """A top-up by amount or by pack (mode=payment); the credit and any expiry ride in metadata."""
    if (body.amount_micros is None) == (body.pack_id is None):
        raise ApiError(422, "invalid_request", "give amount_micros or pack_id, not both", field="amount_micros")
    metadata = {"org_id": org_id}
    if body.pack_id is not None:
        pack = ctx.catalog.packs.get(body.pack_id)
        if pack is None:
            raise ApiError(422, "unknown_pack", f"pack {body.pack_id} is not in the catalog",
                           packs=sorted(ctx.catalog.packs))
        amount, name = pack.amount_micros, f"metergate pack {pack.id}"
        if pack.expires_after_days:
            metadata["credit_expires_at"] = str(now_us() // 1_000_000 + pack.expires_after_days * 86_400)
    else:
        amount, name = body.amount_micros, "metergate credit"
    if amount % MICROS_PER_CENT:
        raise ApiError(422, "invalid_amount", "amount_micros must be a whole number of cents", field="amount_micros")
    metadata["credit_micros"] = str(amount)
    return Checkout("topup", {
        "mode": "payment",
        "line_items": [{"quantity": 1, "price_data": {"currency": "usd", "unit_amount": amount // MICROS_PER_CENT,
                                                      "product_data": {"name": name}}}],
        "metadata": metadata, "payment_intent_data": {"metadata": {"org_id": org_id}}})


def setup_checkout(org_id: str) -> Checkout:
    """Save a card (mode=setup)."""
    return Checkout("setup", {"mode": "setup", "currency": "usd", "metadata": {"org_id": org_id},
                              "setup_intent_data": {"metadata": {"org_id": org_id}}})


def tier_checkout(ctx: Context, org_id: str, tier: str) -> Checkout:
    """A paid concurrency tier (mode=subscription); its price, the catalog's explicit id or the
    one published under the tier's lookup key, is filled in by start_checkout."""
    if tier not in ctx.catalog.tiers_on_sale():
        raise ApiError(422, "invalid_request", f"tier must be one of {sorted(ctx.catalog.tiers_on_sale())}",
                       field="tier")
    tagged = {"org_id": org_id, "tier": tier}
    return Checkout(f"tier-{tier}", {"mode": "subscription", "metadata": tagged,
                                     "subscription_data": {"metadata": tagged}}, tier)


def tax_params(checkout: Checkout) -> dict:
    """What Stripe Tax needs on a Checkout (METERGATE_STRIPE_AUTOMATIC_TAX): the customer's
    address, collected and saved on the customer metergate passes, and its name; a setup
    Checkout charges nothing, so nothing to tax."""
    if checkout.params["mode"] == "setup":
        return {}
    return {"automatic_tax": {"enabled": True}, "billing_address_collection": "required",
            "customer_update": {"address": "auto", "name": "auto"}}


async def live_tier_subscription(ctx: Context, org_id: str, customer_id: str) -> TierSubscription | None:
    """The org's live tier subscription in Stripe, if any. Two or more (made before tier changes
    updated in place) are refused: which one to change, and whether to keep paying for the
    other, is the customer's choice in the portal."""
    client = ctx.stripe.require()
    subscriptions: list[dict] = []
    params: dict = {"customer": customer_id, "limit": SUBSCRIPTIONS_PAGE}  # Stripe lists all but canceled
    for _ in range(SUBSCRIPTION_PAGES_MAX):
        page = (await ctx.stripe.call(client.v1.subscriptions.list, params)).to_dict()
        subscriptions += page["data"]
        if not page.get("has_more") or not page["data"]:
            break
        params = {**params, "starting_after": page["data"][-1]["id"]}
    else:
        raise ApiError(409, "too_many_subscriptions", "the org's Stripe customer has more than "
                       f"{SUBSCRIPTIONS_PAGE * SUBSCRIPTION_PAGES_MAX} subscriptions; change the tier in the "
                       "billing portal")
    found = tier_subscriptions(subscriptions, org_id, ctx.catalog)
    if len(found) > 1:
        raise ApiError(409, "several_tier_subscriptions", "the org has several live tier subscriptions; cancel all "
                       "but one in the billing portal, then change the tier",
                       subscription_ids=sorted(s.subscription_id for s in found))
    return found[0] if found else None


async def change_subscription_tier(ctx: Context, org_id: str, live: TierSubscription, tier: str, next_url: str,
                                   caller_key: str | None) -> dict:
    """Move the live subscription's tier item to the tier's price: `{"updated": true,
    "subscription_id", "tier", "previous_tier", "proration_behavior", "url"}`, the url being
    where the customer goes next (the success URL: no payment page to visit). The subscription
    already on that tier: `{"updated": false, ...}` and no Stripe write."""
    answer = {"updated": False, "subscription_id": live.subscription_id, "tier": tier, "url": next_url}
    if live.tier == tier:
        return answer
    if live.item_id is None:
        raise ApiError(409, "unrecognised_subscription", f"subscription {live.subscription_id} has no single item "
                       "with a tier's price; change the tier in the billing portal",
                       subscription_id=live.subscription_id)
    client = ctx.stripe.require()
    behavior = ctx.settings.stripe_proration_behavior

    async def update(price_id: str) -> None:
        params = {"items": [{"id": live.item_id, "price": price_id}], "proration_behavior": behavior,
                  "metadata": {"org_id": org_id, "tier": tier, TIER_CHANGES: str(live.tier_changes + 1)}}
        # The price is in the key: a write retried on a repriced tier's new price (with_tier_price) is
        # another request to Stripe, which refuses a key used before with other parameters.
        key = operation_key(org_id, f"tier-change-{live.subscription_id}-{price_id}", params, caller_key,
                            now_us() // 1_000_000)
        await ctx.stripe.create(partial(client.v1.subscriptions.update, live.subscription_id), params, key)

    await ctx.stripe.with_tier_price(ctx.catalog, tier, update)
    return {**answer, "updated": True, "previous_tier": live.tier, "proration_behavior": behavior}


async def start_checkout(ctx: Context, org_id: str, checkout: Checkout, success_url: str, cancel_url: str,
                         caller_key: str | None) -> dict:
    """Create the Checkout Session: `{"url", "session_id"}`. The Stripe idempotency key is the
    caller's key if given, else the content within a window (a double click, one session).
    A tier for an org already subscribed changes that subscription (change_subscription_tier)."""
    client = ctx.stripe.require()
    customer_id = await customer_for(ctx, org_id)
    if checkout.tier is not None:
        live = await live_tier_subscription(ctx, org_id, customer_id)
        if live is not None:
            return await change_subscription_tier(ctx, org_id, live, checkout.tier, success_url, caller_key)
    params = {"customer": customer_id, "client_reference_id": org_id, **checkout.params,
              "success_url": success_url, "cancel_url": cancel_url}
    if ctx.settings.stripe_automatic_tax:
        params.update(tax_params(checkout))

    async def create(params: dict, price_id: str | None = None):
        operation = checkout.operation if price_id is None else f"{checkout.operation}-{price_id}"  # (as above)
        key = operation_key(org_id, operation, params, caller_key, now_us() // 1_000_000)
        return await ctx.stripe.create(client.v1.checkout.sessions.create, params, key)

    if checkout.tier is None:
        session = await create(params)
    else:
        session = await ctx.stripe.with_tier_price(ctx.catalog, checkout.tier, lambda price_id: create(
            {**params, "line_items": [{"price": price_id, "quantity": 1}]}, price_id))
    return {"url": session.url, "session_id": session.id}


async def open_portal(ctx: Context, org_id: str, return_url: str, caller_key: str | None) -> dict:
    """A customer portal session (change the card, manage the subscription): `{"url"}`."""
    client = ctx.stripe.require()
    params = {"customer": await customer_for(ctx, org_id), "return_url": return_url}
    key = operation_key(org_id, "portal", params, caller_key, now_us() // 1_000_000)
    session = await ctx.stripe.create(client.v1.billing_portal.sessions.create, params, key)
    return {"url": session.url}


_TIER_CHANGE = {"type": "object", "required": ["updated", "subscription_id", "tier", "url"], "properties": {
    "updated": {"type": "boolean"}, "subscription_id": {"type": "string"}, "tier": {"type": "string"},
    "previous_tier": {"type": "string"}, "proration_behavior": {"type": "string"}, "url": {"type": "string"}}}
_CHECKOUT = {"type": "object", "required": ["url", "session_id"],
             "properties": {"url": {"type": "string"}, "session_id": {"type": "string"}}}
# A Checkout session (or portal session) of the org: its answer and errors. Stripe refusing is 502,
# Stripe unset or unreachable 503; 409 also for the tier's subscriptions (several, or unrecognised).
STRIPE_ERRORS = (openapi.ORG_OR_ADMIN, openapi.IDEMPOTENT, ("404", "502", "503"))
TIER_ANSWER = ("A Checkout to open (not yet subscribed), or the subscription changed in place",
               {"oneOf": [_CHECKOUT, _TIER_CHANGE]})


async def refuse_in_shadow(ctx: Context, org_id: str) -> None:
    """A shadow org (billing-rules 2.12) is billed by the platform's own biller until its
    cutover: metergate starts no Checkout (top-up, card, tier) that would charge it or take
    its card, nor a billing portal session (cards, invoices, subscriptions of its customer).
    409 `org_in_shadow`, before anything reaches Stripe."""
    if (await org_state(ctx, org_id)).enforcement == "shadow":
        raise ApiError(409, "org_in_shadow", "billing of this org is not live yet (shadow mode, a preview): "
                                             "top-ups, cards and tiers are not taken here until its cutover")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["self-serve"])

    async def checkout(request: Request, org_id: str, session: Checkout, body: SetupBody) -> Response:
        return json(await start_checkout(ctx, org_id, session, return_url(ctx, body.success_url, "success_url", org_id),
                                         return_url(ctx, body.cancel_url, "cancel_url", org_id),
                                         request.headers.get("idempotency-key")))

    async def checkout_route(request: Request, org_id: str, body_type, session_of) -> Response:
        """A Checkout for the org: top-up, card or tier, by `session_of(body)`."""
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(body_type, await request.body())
        return_url(ctx, body.success_url, "success_url", org_id)  # refused before anything reaches Stripe
        return_url(ctx, body.cancel_url, "cancel_url", org_id)
        await refuse_in_shadow(ctx, org_id)
        session = session_of(body)
        return await idempotent(ctx, request, lambda: checkout(request, org_id, session, body))

    @router.post("/v1/orgs/{org_id}/checkout/topup", openapi_extra=openapi.with_body(
        TopupBody, {"200": ("The Checkout to send the customer to", openapi.CheckoutSession)}, *STRIPE_ERRORS))
    async def checkout_topup(org_id: OrgPath, request: Request) -> Response:
        return await checkout_route(request, org_id, TopupBody, lambda body: topup_checkout(ctx, org_id, body))

    @router.post("/v1/orgs/{org_id}/checkout/setup", openapi_extra=openapi.with_body(
        SetupBody, {"200": ("The Checkout to send the customer to", openapi.CheckoutSession)}, *STRIPE_ERRORS))
    async def checkout_setup(org_id: OrgPath, request: Request) -> Response:
        return await checkout_route(request, org_id, SetupBody, lambda _: setup_checkout(org_id))

    @router.post("/v1/orgs/{org_id}/checkout/tier", openapi_extra=openapi.with_body(
        TierCheckoutBody, {"200": TIER_ANSWER}, *STRIPE_ERRORS))
    async def checkout_tier(org_id: OrgPath, request: Request) -> Response:
        """Subscribe to a paid tier, or change it. Not yet subscribed: a Checkout in subscription
        mode, `{"url", "session_id"}`. Already subscribed (a live metergate tier subscription of
        the org's Stripe customer: active, trialing or past due): that subscription's price is
        changed in place, prorated as METERGATE_STRIPE_PRORATION_BEHAVIOR says, and the answer is
        `{"updated": true, "subscription_id", "tier", "previous_tier", "proration_behavior",
        "url"}` (url: the success URL, where to send the customer; no Checkout); the tier it
        already has: `{"updated": false, "subscription_id", "tier", "url"}`, nothing sent to
        Stripe. The org's tier follows when Stripe reports the change (its webhook). Going back
        to base is cancelling the subscription, in the portal. Several live tier subscriptions:
        409 `several_tier_subscriptions`."""
        return await checkout_route(request, org_id, TierCheckoutBody, lambda body: tier_checkout(ctx, org_id, body.tier))

    @router.post("/v1/orgs/{org_id}/portal", openapi_extra=openapi.with_body(
        PortalBody, {"200": ("The portal session to send the customer to", openapi.PortalSession)}, *STRIPE_ERRORS))
    async def portal(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(PortalBody, await request.body())
        back = return_url(ctx, body.return_url, "return_url", org_id)
        await refuse_in_shadow(ctx, org_id)

        async def run() -> Response:
            return json(await open_portal(ctx, org_id, back, request.headers.get("idempotency-key")))

        return await idempotent(ctx, request, run)

    return router
