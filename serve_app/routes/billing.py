"""The billing page, GET /billing/{org_id}, and the handlers of its forms: for people, in a
browser, with or without JavaScript.

The page opens with the org's token (or admin's): a bearer header, or a `?token=` link. A
link is answered with a redirect to the page without the token, which goes into an HttpOnly
cookie scoped to this org's page (SameSite=Lax): so the token is in no address bar, history,
Referer, nor in the return URLs handed to Stripe, and the page still opens when Stripe sends
the customer back. An expired token is a 401 like anywhere else; a new link replaces it.

Each form posts here and does what its JSON endpoint does, through the same functions: the
same checks, the same Stripe idempotency keys, and the same Idempotency-Key rules, the key
being a hidden field made fresh for each form the page renders (so a double submit is one
request, answered once). Then it redirects: to Stripe's Checkout or portal, or back to the
page. A form also carries a proof derived from the token, which a page of another site cannot
know: a cookie alone never moves money. Refusals render as HTML for a browser, as the API's
JSON error otherwise; never a 500 for what a person can type.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

import msgspec
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from actors.clock import now_us
from actors.metering import LeaseUsage, cost_scaled, split_micros
from actors.timeutil import US_PER_S, us_to_rfc3339
from metergate_client.decision import Reason
from serve_app import openapi
from serve_app.auth import BILLING_COOKIE, Caller, presented
from serve_app.billing_page import METERS, BillingPage, error_page, render
from serve_app.bodies import NO_RESOURCES, AutoRechargeBody, TopupBody, parse_model
from serve_app.calls import (
    auto_recharge_command,
    command_state,
    forget_months,
    ledger_page,
    money_fingerprint,
    org_state,
    recent_months_of,
)
from serve_app.context import Context, json
from serve_app.errors import ApiError, raise_for_shard_error
from serve_app.outage import RETRY_AFTER_S
from serve_app.idempotency import checked_key, once, request_hash, scope_of
from serve_app.params import OrgPath
from serve_app.routes.self_serve import (
    Checkout,
    billing_url,
    open_portal,
    refuse_in_shadow,
    setup_checkout,
    start_checkout,
    tier_checkout,
    topup_checkout,
)
from serve_app.views import org_view, parse_usd, usage_groups_view
from storage import usage

LEDGER_ENTRIES = 20
CHART_DAYS = 30
TOP_LEASES = 15
DAY_US = 86_400 * US_PER_S
MAX_FORM_FIELDS = 16
# A double submit finds the first still running: wait for its answer rather than answer 409.
IN_PROGRESS_WAIT_S = 10.0
IN_PROGRESS_POLL_S = 0.2
HTML_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def page_policy(nonce: str) -> str:
    """Nothing but this page's own inline style and script; no frame may hold it."""
    return (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; img-src data:; "
            "base-uri 'none'; frame-ancestors 'none'")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["self-serve"])

    def form_proof(org_id: str, token: str) -> str:
        key = ctx.settings.org_token_secret.encode()
        return hmac.new(key, f"billing-form|{org_id}|{token}".encode(), hashlib.sha256).hexdigest()[:32]

    @router.get("/billing/{org_id}", response_class=HTMLResponse, openapi_extra=openapi.answers(
        {"303": ("A `?token=` link: to the page without it, the token now in the page's cookie", None)},
        openapi.ORG_OR_ADMIN, openapi.ORG))
    async def billing_page(org_id: OrgPath, request: Request, cursor: str | None = None,
                           notice: str | None = None) -> Response:
        """The org's billing page: open it with the org's token (a bearer header, or a `?token=`
        link, which redirects to the page and keeps the token in a cookie of the page)."""
        async def show() -> Response:
            token, source = presented(request, browser=True)
            ctx.org_or_admin(request, org_id, browser=True)
            if source == "query":
                return with_cookie(ctx, request, org_id, token)
            nonce = secrets.token_urlsafe(16)
            page = await gather(org_id, page_path(request, org_id), form_proof(org_id, token), nonce, cursor, notice)
            return HTMLResponse(render(page), headers={**HTML_HEADERS, "Content-Security-Policy": page_policy(nonce)})

        return await for_people(request, org_id, show, back=False)

    async def gather(org_id: str, path: str, proof: str, nonce: str, cursor: str | None,
                     notice: str | None) -> BillingPage:
        """Everything the page shows, each from where the JSON API gets it."""
        state = await org_state(ctx, org_id)
        org = org_view(state)
        decision = raise_for_shard_error(msgspec.to_builtins((await ctx.router.gate(org_id, "create", NO_RESOURCES))[0]))
        today_us = now_us() // DAY_US * DAY_US
        from_us, to_us = today_us - (CHART_DAYS - 1) * DAY_US, today_us + DAY_US
        async with (await ctx.db()).acquire() as conn:
            by_day = usage_groups_view(await usage.report(conn, org_id, "day", from_us, to_us), "day")
            meters = await usage.report(conn, org_id, "meter", from_us, to_us)
            leases, lease_count = await usage.lease_costs(conn, org_id, from_us, to_us, TOP_LEASES)
        entries, next_cursor = await ledger_page(ctx, org_id, cursor, LEDGER_ENTRIES)
        cost_by_day = {row["day"]: row["cost_micros"] for row in by_day}
        days = [us_day(from_us + n * DAY_US) for n in range(CHART_DAYS)]
        quantities = {column: getattr(meters[0], column) if meters else 0 for _, column, _, _ in METERS}
        plan = ctx.catalog.plan_version(state.plan_id, state.plan_version)
        return BillingPage(
            org=org, needs_card=Reason(decision["reason"]) == Reason.NO_PAYMENT_METHOD, path=path, csrf=proof,
            nonce=nonce, stripe_ready=ctx.stripe.client is not None,
            days=[(day, cost_by_day.get(day, 0)) for day in days], leases=leases, lease_count=lease_count,
            meter_quantities=quantities,
            meter_cost_micros={column: split_micros(0, cost_scaled(plan, LeaseUsage("", **{column: quantity})))[0]
                               for column, quantity in quantities.items()},
            months=await recent_months_of(ctx, org_id, money_fingerprint(state)), entries=entries, cursor=cursor, next_cursor=next_cursor,
            packs=sorted(ctx.catalog.packs.values(), key=lambda pack: pack.amount_micros),
            tiers=sorted(((tier, ctx.catalog.tiers[tier]) for tier in ctx.catalog.tiers_on_sale()), key=lambda t: t[1]),
            notice=notice, before_tax=ctx.settings.stripe_automatic_tax, shadow=state.enforcement == "shadow")

    # ----- the forms ---------------------------------------------------------------------

    async def submitted(request: Request, org_id: str) -> tuple[Caller, dict[str, str]]:
        """Who sent the form (the page's cookie, or a bearer header) and its fields, once the
        form's proof shows it came from this org's page."""
        token, _ = presented(request, browser=True)
        caller = ctx.org_or_admin(request, org_id, browser=True)
        forget_months(ctx, org_id)  # the page after a form shows what it did
        try:
            fields = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True,
                                    max_num_fields=MAX_FORM_FIELDS))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(422, "invalid_request", "the form could not be read", field="body") from None
        if not hmac.compare_digest(fields.get("csrf", "").encode(), form_proof(org_id, token).encode()):
            raise ApiError(403, "forbidden", "this form did not come from this billing page, or the page is "
                                             "older than your last sign-in link: reload the page and send it again")
        return caller, fields

    async def answered_once(request: Request, caller: Caller, fields: dict[str, str],
                            run: Callable[[], Awaitable[Response]]) -> dict:
        """The JSON answer of `run`, under the Idempotency-Key rules of the JSON endpoints, with
        the form's key; a double submit waits for the first answer and gets it again."""
        key = checked_key(fields.get("idempotency_key") or None)
        if key is None:
            return msgspec.json.decode((await run()).body)
        fingerprint = await request_hash(request)
        deadline = asyncio.get_running_loop().time() + IN_PROGRESS_WAIT_S
        while True:
            try:
                return msgspec.json.decode((await once(ctx, scope_of(caller), key, fingerprint, run)).body)
            except ApiError as exc:
                if exc.code != "idempotency_in_progress" or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(IN_PROGRESS_POLL_S)

    def to_checkout(request: Request, org_id: str, caller: Caller, fields: dict[str, str], checkout: Checkout,
                    done: str) -> Awaitable[dict]:
        back = billing_url(ctx, org_id)
        return answered_once(request, caller, fields, lambda: as_json(start_checkout(
            ctx, org_id, checkout, f"{back}?notice={done}", f"{back}?notice=checkout_cancelled",
            fields.get("idempotency_key") or None)))

    async def checkout_form(request: Request, org_id: str, checkout_of: Callable[[dict[str, str]], Checkout],
                            done: str) -> Response:
        """A form that starts a Stripe Checkout (top-up, card, tier): on to its page."""
        async def send() -> Response:
            caller, fields = await submitted(request, org_id)
            ctx.stripe.require()
            await refuse_in_shadow(ctx, org_id)
            session = await to_checkout(request, org_id, caller, fields, checkout_of(fields), done)
            return RedirectResponse(session["url"], 303)

        return await for_people(request, org_id, send)

    def topup_of(org_id: str, fields: dict[str, str]) -> Checkout:
        if fields.get("pack_id"):
            body = model(TopupBody, {"pack_id": fields["pack_id"]})
        else:
            body = model(TopupBody, {"amount_micros": usd_field(fields, "amount_usd", "the amount")})
        return topup_checkout(ctx, org_id, body)

    @router.post("/billing/{org_id}/topup", include_in_schema=False)
    async def topup_form(org_id: OrgPath, request: Request) -> Response:
        return await checkout_form(request, org_id, lambda fields: topup_of(org_id, fields), "topup_done")

    @router.post("/billing/{org_id}/setup", include_in_schema=False)
    async def setup_form(org_id: OrgPath, request: Request) -> Response:
        return await checkout_form(request, org_id, lambda _: setup_checkout(org_id), "card_done")

    @router.post("/billing/{org_id}/tier", include_in_schema=False)
    async def tier_form(org_id: OrgPath, request: Request) -> Response:
        return await checkout_form(request, org_id, lambda fields: tier_checkout(ctx, org_id, fields.get("tier", "")),
                                   "tier_done")

    @router.post("/billing/{org_id}/portal", include_in_schema=False)
    async def portal_form(org_id: OrgPath, request: Request) -> Response:
        async def send() -> Response:
            caller, fields = await submitted(request, org_id)
            ctx.stripe.require()
            await refuse_in_shadow(ctx, org_id)
            session = await answered_once(request, caller, fields, lambda: as_json(open_portal(
                ctx, org_id, billing_url(ctx, org_id), fields.get("idempotency_key") or None)))
            return RedirectResponse(session["url"], 303)

        return await for_people(request, org_id, send)

    @router.post("/billing/{org_id}/auto-recharge", include_in_schema=False)
    async def auto_recharge_form(org_id: OrgPath, request: Request) -> Response:
        """PUT /v1/orgs/{id}/auto-recharge from the page: an org may set its own (it charges
        only the org's own card, within the limits it sets here)."""
        async def send() -> Response:
            caller, fields = await submitted(request, org_id)
            settings: dict = {"enabled": fields.get("enabled") == "on"}
            if settings["enabled"]:
                settings["threshold_micros"] = usd_field(fields, "threshold_usd", "the balance threshold")
                settings["amount_micros"] = usd_field(fields, "amount_usd", "the amount to add")
                settings["max_per_day"] = whole_field(fields, "max_per_day", "charges per day")
            command = auto_recharge_command(ctx, model(AutoRechargeBody, settings), caller.role == "admin")
            await answered_once(request, caller, fields, lambda: command_state(ctx, org_id, command))
            return RedirectResponse(f"{page_path(request, org_id)}?notice=auto_recharge_saved#auto-recharge", 303)

        return await for_people(request, org_id, send)

    return router


async def as_json(answer: Awaitable[dict]) -> Response:
    return json(await answer)


def model(kind, fields: dict):
    """A form's fields through the very body model of the JSON endpoint (same limits, same errors)."""
    return parse_model(kind, msgspec.json.encode(fields))


def usd_field(fields: dict[str, str], name: str, what: str) -> int:
    micros = parse_usd(fields.get(name, ""))
    if micros is None:
        raise ApiError(422, "invalid_amount", f"{what}: enter an amount in US dollars, like 25 or 25.50", field=name)
    return micros


def whole_field(fields: dict[str, str], name: str, what: str) -> int:
    text = fields.get(name, "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        raise ApiError(422, "invalid_request", f"{what}: enter a whole number", field=name)
    return int(text)


def page_path(request: Request, org_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/billing/{org_id}"


def us_day(us: int) -> str:
    return us_to_rfc3339(us)[:10]


def with_cookie(ctx: Context, request: Request, org_id: str, token: str) -> Response:
    """A `?token=` link: to the page without the token, which the page's cookie now carries."""
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    path = page_path(request, org_id)
    response = RedirectResponse(f"{path}?{query}" if query else path, 303, headers=HTML_HEADERS)
    # Secure by the public URL: behind a TLS load balancer the replica itself sees plain http.
    response.set_cookie(BILLING_COOKIE, token, path=path, httponly=True, samesite="lax",
                        secure=ctx.settings.public_base.startswith("https://"))
    return response


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


async def for_people(request: Request, org_id: str, work: Callable[[], Awaitable[Response]],
                     back: bool = True) -> Response:
    """A refusal as an HTML page for a browser (the same status), as the API's error otherwise."""
    try:
        return await work()
    except ApiError as exc:
        if not wants_html(request):
            raise
        headers = {**HTML_HEADERS, **({"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else {})}
        path = page_path(request, org_id) if back else None
        return HTMLResponse(error_page(org_id, path, exc.status, exc.code, exc.message), exc.status, headers=headers)
