"""Self-serve (the org's own token, or admin): Stripe Checkout for top-ups, cards and tiers,
the customer portal, and the billing page."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from actors.clock import now_us
from actors.org import MICROS_PER_CENT
from serve_app.billing_page import render as render_billing_page
from serve_app.bodies import PortalBody, SetupBody, TierCheckoutBody, TopupBody, body_schema, parse_model
from serve_app.calls import org_state
from serve_app.context import Context, json
from serve_app.errors import ApiError, unknown_org
from serve_app.idempotency import idempotent
from serve_app.params import OrgPath
from serve_app.stripe_events import PAID_TIERS
from serve_app.stripe_gateway import operation_key
from serve_app.views import org_view
from storage import ledger, stripe_customers
from storage.times import us_to_dt

BILLING_PAGE_ENTRIES = 20

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


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["self-serve"])

    def back_to_billing(request: Request, org_id: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/billing/{org_id}"

    async def checkout(request: Request, org_id: str, operation: str, body: SetupBody | TopupBody,
                       params: dict) -> Response:
        client = ctx.stripe.require()
        customer = await customer_for(ctx, org_id)
        params = {"customer": customer, "client_reference_id": org_id, **params,
                  "success_url": body.success_url or back_to_billing(request, org_id),
                  "cancel_url": body.cancel_url or back_to_billing(request, org_id)}
        key = operation_key(org_id, operation, params, request.headers.get("idempotency-key"),
                            now_us() // 1_000_000)
        session = await ctx.stripe.create(client.v1.checkout.sessions.create, params, key)
        return json({"url": session.url, "session_id": session.id})

    @router.post("/v1/orgs/{org_id}/checkout/topup", openapi_extra=body_schema(TopupBody))
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
        return await idempotent(ctx, request, lambda: checkout(request, org_id, "topup", body, {
            "mode": "payment",
            "line_items": [{"quantity": 1, "price_data": {"currency": "usd", "unit_amount": amount // MICROS_PER_CENT,
                                                          "product_data": {"name": name}}}],
            "metadata": metadata, "payment_intent_data": {"metadata": {"org_id": org_id}}}))

    @router.post("/v1/orgs/{org_id}/checkout/setup", openapi_extra=body_schema(SetupBody))
    async def checkout_setup(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(SetupBody, await request.body())
        return await idempotent(ctx, request, lambda: checkout(request, org_id, "setup", body, {
            "mode": "setup", "currency": "usd", "metadata": {"org_id": org_id},
            "setup_intent_data": {"metadata": {"org_id": org_id}}}))

    @router.post("/v1/orgs/{org_id}/checkout/tier", openapi_extra=body_schema(TierCheckoutBody))
    async def checkout_tier(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        ctx.stripe.require()
        body = parse_model(TierCheckoutBody, await request.body())
        price = ctx.catalog.stripe_prices.get(body.tier)
        if body.tier not in PAID_TIERS or price is None:
            raise ApiError(422, "invalid_request", f"tier must be one of {sorted(ctx.catalog.stripe_prices)}",
                           field="tier")
        tagged = {"org_id": org_id, "tier": body.tier}
        return await idempotent(ctx, request, lambda: checkout(request, org_id, f"tier-{body.tier}", body, {
            "mode": "subscription", "line_items": [{"price": price, "quantity": 1}],
            "metadata": tagged, "subscription_data": {"metadata": tagged}}))

    @router.post("/v1/orgs/{org_id}/portal", openapi_extra=body_schema(PortalBody))
    async def portal(org_id: OrgPath, request: Request) -> Response:
        ctx.org_or_admin(request, org_id)
        client = ctx.stripe.require()
        body = parse_model(PortalBody, await request.body())

        async def open_portal() -> Response:
            params = {"customer": await customer_for(ctx, org_id),
                      "return_url": body.return_url or back_to_billing(request, org_id)}
            key = operation_key(org_id, "portal", params, request.headers.get("idempotency-key"),
                                now_us() // 1_000_000)
            session = await ctx.stripe.create(client.v1.billing_portal.sessions.create, params, key)
            return json({"url": session.url})

        return await idempotent(ctx, request, open_portal)

    @router.get("/billing/{org_id}", response_class=HTMLResponse)
    async def billing_page(org_id: OrgPath, request: Request) -> Response:
        """The org's billing page; open it with the org's token (`?token=` or a bearer header)."""
        ctx.org_or_admin(request, org_id, allow_query=True)
        state = org_view(await org_state(ctx, org_id))
        async with (await ctx.db()).acquire() as conn:
            recent = await ledger.page(conn, org_id, None, BILLING_PAGE_ENTRIES)
        entries = [{"kind": e.kind, "amount_micros": e.amount_micros, "note": e.note,
                    "created_at": us_to_dt(e.created_us).strftime("%Y-%m-%d %H:%M UTC")}
                   for e in recent[:BILLING_PAGE_ENTRIES]]
        page = render_billing_page(state, entries, payments_configured=bool(ctx.settings.stripe_secret_key))
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    return router
