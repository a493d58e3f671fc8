"""Self-serve money in (org token or admin): Stripe Checkout for top-ups, cards and tiers; the portal."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path, Request, Response
from pydantic import Field

from actors.clock import now_us
from actors.ticks import ID_PATTERN
from serve_app.bodies import StrictModel, body_schema, parse_model
from serve_app.context import Context, json
from serve_app.errors import ApiError
from actors.org import MICROS_PER_CENT
from serve_app.stripe_events import PAID_TIERS
from serve_app.stripe_gateway import operation_key

OrgPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
Url = Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://")]
MIN_TOPUP_MICROS = 500_000  # Stripe's smallest USD charge is 0.50
MAX_TOPUP_MICROS = 10_000_000_000


class TopupBody(StrictModel):
    amount_micros: Annotated[int, Field(ge=MIN_TOPUP_MICROS, le=MAX_TOPUP_MICROS)] | None = None
    pack_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    success_url: Url | None = None
    cancel_url: Url | None = None


class SetupBody(StrictModel):
    success_url: Url | None = None
    cancel_url: Url | None = None


class TierCheckoutBody(SetupBody):
    tier: str


class PortalBody(StrictModel):
    return_url: Url | None = None


async def customer_for(ctx: Context, org_id: str) -> str:
    """The org's Stripe customer, created once."""
    pool = await ctx.db()
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT o.email, c.customer_id FROM orgs o LEFT JOIN stripe_customers c USING (org_id)"
            " WHERE o.org_id = $1", org_id)
    if row is None:
        raise ApiError(404, "unknown_org", f"org {org_id} does not exist")
    if row["customer_id"]:
        return row["customer_id"]
    client = ctx.stripe.require()
    customer = await ctx.stripe.create(client.v1.customers.create,
                                       {"email": row["email"], "metadata": {"org_id": org_id}},
                                       f"metergate:customer:{org_id}")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO stripe_customers (org_id, customer_id) VALUES ($1, $2)"
                           " ON CONFLICT (org_id) DO NOTHING", org_id, customer.id)
        return await conn.fetchval("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org_id)


def add_routes(app: FastAPI, ctx: Context) -> None:
    def back_to_billing(request: Request, org_id: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/billing/{org_id}"

    async def checkout(request: Request, org_id: str, operation: str, body: SetupBody | TopupBody,
                       params: dict) -> dict:
        client = ctx.stripe.require()
        customer = await customer_for(ctx, org_id)
        params = {"customer": customer, "client_reference_id": org_id, **params,
                  "success_url": body.success_url or back_to_billing(request, org_id),
                  "cancel_url": body.cancel_url or back_to_billing(request, org_id)}
        key = operation_key(org_id, operation, params, request.headers.get("idempotency-key"),
                            now_us() // 1_000_000)
        session = await ctx.stripe.create(client.v1.checkout.sessions.create, params, key)
        return {"url": session.url, "session_id": session.id}

    @app.post("/v1/orgs/{org_id}/checkout/topup", tags=["self-serve"], openapi_extra=body_schema(TopupBody))
    async def checkout_topup(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(TopupBody, await request.body())
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
        return json(await checkout(request, org_id, "topup", body, {
            "mode": "payment",
            "line_items": [{"quantity": 1, "price_data": {"currency": "usd", "unit_amount": amount // MICROS_PER_CENT,
                                                          "product_data": {"name": name}}}],
            "metadata": metadata, "payment_intent_data": {"metadata": {"org_id": org_id}}}))

    @app.post("/v1/orgs/{org_id}/checkout/setup", tags=["self-serve"], openapi_extra=body_schema(SetupBody))
    async def checkout_setup(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(SetupBody, await request.body())
        return json(await checkout(request, org_id, "setup", body, {
            "mode": "setup", "currency": "usd", "metadata": {"org_id": org_id},
            "setup_intent_data": {"metadata": {"org_id": org_id}}}))

    @app.post("/v1/orgs/{org_id}/checkout/tier", tags=["self-serve"], openapi_extra=body_schema(TierCheckoutBody))
    async def checkout_tier(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(TierCheckoutBody, await request.body())
        price = ctx.catalog.stripe_prices.get(body.tier)
        if body.tier not in PAID_TIERS or price is None:
            raise ApiError(422, "invalid_request", f"tier must be one of {sorted(ctx.catalog.stripe_prices)}",
                           field="tier")
        tagged = {"org_id": org_id, "tier": body.tier}
        return json(await checkout(request, org_id, f"tier-{body.tier}", body, {
            "mode": "subscription", "line_items": [{"price": price, "quantity": 1}],
            "metadata": tagged, "subscription_data": {"metadata": tagged}}))

    @app.post("/v1/orgs/{org_id}/portal", tags=["self-serve"], openapi_extra=body_schema(PortalBody))
    async def portal(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        client = ctx.stripe.require()
        body = parse_model(PortalBody, await request.body())
        params = {"customer": await customer_for(ctx, org_id),
                  "return_url": body.return_url or back_to_billing(request, org_id)}
        key = operation_key(org_id, "portal", params, request.headers.get("idempotency-key"), now_us() // 1_000_000)
        session = await ctx.stripe.create(client.v1.billing_portal.sessions.create, params, key)
        return json({"url": session.url})
