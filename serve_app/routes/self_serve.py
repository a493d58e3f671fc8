"""Self-serve (the org's own token, or admin): Stripe Checkout for top-ups, cards and tiers,
and the customer portal. The billing page's forms (routes/billing.py) start the very same
sessions through the functions here."""

from __future__ import annotations

from typing import NamedTuple

from fastapi import APIRouter, Request, Response

from actors.clock import now_us
from actors.org import MICROS_PER_CENT
from config.settings import origin_of
from serve_app.bodies import PortalBody, SetupBody, TierCheckoutBody, TopupBody, body_schema, parse_model
from serve_app.context import Context, json
from serve_app.errors import ApiError, unknown_org
from serve_app.idempotency import idempotent
from serve_app.params import OrgPath
from serve_app.stripe_events import PAID_TIERS
from serve_app.stripe_gateway import operation_key
from storage import stripe_customers


class Checkout(NamedTuple):
    """A Checkout Session to create: the operation (it names the Stripe idempotency key) and
    its parameters, checked before anything reaches Stripe."""

    operation: str
    params: dict


async def customer_for(ctx: Context, org_id: str) -> str:
    """The org's Stripe customer, created once (Stripe's idempotency key makes a race create one)."""
    pool = await ctx.db()
    async with pool.acquire() as conn:
        contact = await stripe_customers.billing_contact(conn, org_id)
    if contact is None:
        raise unknown_org(org_id)
    email, customer_id = contact
    if customer_id:
        return customer_id
    client = ctx.stripe.require()
    customer = await ctx.stripe.create(client.v1.customers.create,
                                       {"email": email, "metadata": {"org_id": org_id}},
                                       f"metergate:customer:{org_id}")
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
    """A paid concurrency tier (mode=subscription, the tier's price from the catalog)."""
    price = ctx.catalog.stripe_prices.get(tier)
    if tier not in PAID_TIERS or price is None:
        raise ApiError(422, "invalid_request", f"tier must be one of {sorted(ctx.catalog.stripe_prices)}",
                       field="tier")
    tagged = {"org_id": org_id, "tier": tier}
    return Checkout(f"tier-{tier}", {"mode": "subscription", "line_items": [{"price": price, "quantity": 1}],
                                     "metadata": tagged, "subscription_data": {"metadata": tagged}})


async def start_checkout(ctx: Context, org_id: str, checkout: Checkout, success_url: str, cancel_url: str,
                         caller_key: str | None) -> dict:
    """Create the Checkout Session: `{"url", "session_id"}`. The Stripe idempotency key is the
    caller's key if given, else the content within a window (a double click, one session)."""
    client = ctx.stripe.require()
    params = {"customer": await customer_for(ctx, org_id), "client_reference_id": org_id, **checkout.params,
              "success_url": success_url, "cancel_url": cancel_url}
    key = operation_key(org_id, checkout.operation, params, caller_key, now_us() // 1_000_000)
    session = await ctx.stripe.create(client.v1.checkout.sessions.create, params, key)
    return {"url": session.url, "session_id": session.id}


async def open_portal(ctx: Context, org_id: str, return_url: str, caller_key: str | None) -> dict:
    """A customer portal session (change the card, manage the subscription): `{"url"}`."""
    client = ctx.stripe.require()
    params = {"customer": await customer_for(ctx, org_id), "return_url": return_url}
    key = operation_key(org_id, "portal", params, caller_key, now_us() // 1_000_000)
    session = await ctx.stripe.create(client.v1.billing_portal.sessions.create, params, key)
    return {"url": session.url}


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
        session = session_of(body)
        return await idempotent(ctx, request, lambda: checkout(request, org_id, session, body))

    @router.post("/v1/orgs/{org_id}/checkout/topup", openapi_extra=body_schema(TopupBody))
    async def checkout_topup(org_id: OrgPath, request: Request) -> Response:
        return await checkout_route(request, org_id, TopupBody, lambda body: topup_checkout(ctx, org_id, body))

    @router.post("/v1/orgs/{org_id}/checkout/setup", openapi_extra=body_schema(SetupBody))
    async def checkout_setup(org_id: OrgPath, request: Request) -> Response:
        return await checkout_route(request, org_id, SetupBody, lambda _: setup_checkout(org_id))

    @router.post("/v1/orgs/{org_id}/checkout/tier", openapi_extra=body_schema(TierCheckoutBody))
    async def checkout_tier(org_id: OrgPath, request: Request) -> Response:
        return await checkout_route(request, org_id, TierCheckoutBody, lambda body: tier_checkout(ctx, org_id, body.tier))

    @router.post("/v1/orgs/{org_id}/portal", openapi_extra=body_schema(PortalBody))
    async def portal(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(PortalBody, await request.body())
        back = return_url(ctx, body.return_url, "return_url", org_id)

        async def run() -> Response:
            return json(await open_portal(ctx, org_id, back, request.headers.get("idempotency-key")))

        return await idempotent(ctx, request, run)

    return router
