"""Organizations (admin token; auto-recharge also with the org's own token): create, list,
read, credit, plan, tier, limits, auto-recharge, halt and resume, org tokens."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from actors import commands as cmd
from actors.clock import now_us
from actors.imports import IMPORT_KEY_PREFIX
from actors.ticks import ID_PATTERN
from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from serve_app.bodies import (AlertsBody, AutoRechargeBody, CreateOrgBody, CreditBody, EnforcementBody, LimitsBody,
                              PlanBody, TierBody, TokenBody, parse_model)
from serve_app import openapi
from serve_app.calls import auto_recharge_command, org_state, require_org, state_command
from serve_app.context import Context, json
from serve_app.errors import ApiError, raise_for_shard_error, unknown_org
from serve_app.idempotency import idempotent, request_hash
from serve_app.params import OrgPath
from serve_app.views import entry_view, org_row_view, org_view
from storage import enforcement, orgs

MAX_ORG_PAGE = 500
MAX_ID_CHARS = 128
# A command whose answer is the org's state after it: its answer and errors.
ORG_STATE = ({"200": ("The org after the change", openapi.Org)}, openapi.ADMIN, openapi.IDEMPOTENT, openapi.ORG)


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["orgs"])

    def unknown_plan(plan_id: str) -> ApiError:
        return ApiError(422, "unknown_plan", f"plan {plan_id} is not in the catalog", plans=ctx.catalog.plan_ids())

    @router.post("/v1/orgs", openapi_extra=openapi.with_body(
        CreateOrgBody, {"201": ("Created", openapi.Org), "200": ("It existed already: as it is", openapi.Org)},
        openapi.ADMIN, openapi.IDEMPOTENT, ("500", "503")))
    async def create_org(request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(CreateOrgBody, await request.body())

        async def run() -> Response:
            plan_id = body.plan_id or ctx.catalog.default_plan
            if ctx.catalog.current_plan(plan_id, now_us()) is None:
                raise unknown_plan(plan_id)
            shadow = ctx.settings.enforcement == "shadow"  # (billing-rules 2.12)
            if shadow:  # the meter's row first: a crash before the org is made withholds, never sends
                async with (await ctx.db()).acquire() as conn:
                    await enforcement.shadow_new_orgs(conn, [body.org_id])
            result = raise_for_shard_error(await ctx.router.command(
                body.org_id, cmd.CreateOrg(body.email, plan_id, body.billing_mode == "prepaid", shadow)))
            state = result["state"]  # the row of the org's state, always: an org that existed keeps its own
            # enforcement, and one created enforced loses a shadow row a create that crashed left
            await _write_enforcement(ctx, body.org_id, enforcement.row_of(state.enforcement, state.cutover_us))
            return json(org_view(state), 201 if result["created"] else 200)

        return await idempotent(ctx, request, run)

    @router.get("/v1/orgs", openapi_extra=openapi.answers(
        {"200": ("A page of orgs", openapi.OrgPage)}, openapi.ADMIN, ("400", "422", "503")))
    async def list_orgs(request: Request, cursor: str | None = None, limit: int = 100) -> Response:
        """Every org, in org_id order, a page at a time: `next_cursor` (the last org_id of the
        page) asks for the next. Rows from Postgres; balances are in `GET /v1/orgs/{org_id}`."""
        ctx.admin(request)
        if not 1 <= limit <= MAX_ORG_PAGE:
            raise ApiError(422, "invalid_request", f"limit must be between 1 and {MAX_ORG_PAGE}", field="limit")
        if cursor and not (len(cursor) <= MAX_ID_CHARS and re.fullmatch(ID_PATTERN, cursor)):
            raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
        async with (await ctx.db()).acquire() as conn:
            rows = await orgs.page(conn, cursor or None, limit + 1)
        next_cursor = rows[limit - 1].org_id if len(rows) > limit else None
        return json({"orgs": [org_row_view(row, ctx.router.shard_of(row.org_id)) for row in rows[:limit]],
                     "next_cursor": next_cursor, "has_more": next_cursor is not None})

    @router.get("/v1/orgs/{org_id}", openapi_extra=openapi.answers(
        {"200": ("The org as its shard holds it now", openapi.Org)}, openapi.ADMIN, openapi.ORG))
    async def get_org(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return json(org_view(await org_state(ctx, org_id)))

    @router.post("/v1/orgs/{org_id}/credits", status_code=201, openapi_extra=openapi.with_body(
        CreditBody, {"201": ("The entry booked and the balance after it", openapi.Credited)},
        openapi.ADMIN, openapi.IDEMPOTENT, openapi.ORG))
    async def post_credit(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(CreditBody, await request.body())
        if body.amount_micros == 0 or (body.kind != "adjustment" and body.amount_micros < 0):
            raise ApiError(422, "invalid_amount",
                           "amount_micros must be > 0 (an adjustment may be negative, never 0)",
                           field="amount_micros")
        expires_at_us = _expiry(body)
        amount = -body.amount_micros if body.kind == "refund" else body.amount_micros
        key = request.headers.get("idempotency-key")
        if key is not None and key.startswith(("stripe:", IMPORT_KEY_PREFIX)):  # the ledger's keys for Stripe's objects
            raise ApiError(400, "invalid_idempotency_key",  # and for imported amounts (billing-rules 2.11)
                           "an Idempotency-Key may not start with `stripe:` or `import:`", field="Idempotency-Key")

        async def run() -> Response:
            command = cmd.Credit(body.kind, amount, expires_at_us, body.note, key)
            result = raise_for_shard_error(await ctx.router.command(org_id, command, await request_hash(request)))
            return json({**entry_view(result["entry"]), "org_id": org_id,
                         "balance_micros": result["balance_micros"]}, 201)

        return await idempotent(ctx, request, run)

    @router.put("/v1/orgs/{org_id}/plan", openapi_extra=openapi.with_body(PlanBody, *ORG_STATE))
    async def put_plan(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(PlanBody, await request.body())
        plan = ctx.catalog.current_plan(body.plan_id, now_us())
        if plan is None:
            raise unknown_plan(body.plan_id)
        return await state_command(ctx, request, org_id, cmd.SetPlan(plan.id, plan.version))

    @router.put("/v1/orgs/{org_id}/tier", openapi_extra=openapi.with_body(TierBody, *ORG_STATE))
    async def put_tier(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(TierBody, await request.body())
        if body.tier == "custom":
            if body.max_concurrent is None:
                raise ApiError(422, "invalid_request", "a custom tier needs max_concurrent",
                               field="max_concurrent")
            cap = body.max_concurrent
        else:
            if body.max_concurrent is not None:
                raise ApiError(422, "invalid_request", "max_concurrent is set by the tier; use tier custom",
                               field="max_concurrent")
            cap = ctx.catalog.tiers[body.tier]
        return await state_command(ctx, request, org_id, cmd.SetTier(body.tier, cap))

    @router.put("/v1/orgs/{org_id}/limits", openapi_extra=openapi.with_body(LimitsBody, *ORG_STATE))
    async def put_limits(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(LimitsBody, await request.body())
        return await state_command(ctx, request, org_id, cmd.SetLimits(body.max_disk_mb, body.machine_quotas))

    @router.put("/v1/orgs/{org_id}/alerts", openapi_extra=openapi.with_body(AlertsBody, *ORG_STATE))
    async def put_alerts(org_id: OrgPath, request: Request) -> Response:
        """`balance.threshold_crossed` is sent once each time the balance falls under
        `low_balance_micros`, `balance.runway_low` once each time the runway falls under
        `runway_alert_s` (each again only after it was back at or above it); 0 turns one off, an
        absent one stays as it is."""
        ctx.admin(request)
        body = parse_model(AlertsBody, await request.body())
        if body.low_balance_micros is None and body.runway_alert_s is None:
            raise ApiError(422, "invalid_request", "name low_balance_micros, runway_alert_s or both",
                           field="low_balance_micros")
        low = -1 if body.low_balance_micros is None else body.low_balance_micros
        return await state_command(ctx, request, org_id, cmd.SetAlerts(low, body.runway_alert_s))

    @router.put("/v1/orgs/{org_id}/auto-recharge", openapi_extra=openapi.with_body(
        AutoRechargeBody, ORG_STATE[0], openapi.ORG_OR_ADMIN, *ORG_STATE[2:]))
    async def put_auto_recharge(org_id: OrgPath, request: Request) -> Response:
        """Opt in or out. With the balance under the threshold and a card on file, turning it on
        charges at once (the arming charge); later a debit that takes the balance under the
        threshold charges, at most once per cooldown and `max_per_day` times a UTC day."""
        caller = ctx.org_or_admin(request, org_id)
        body = parse_model(AutoRechargeBody, await request.body())
        return await state_command(ctx, request, org_id, auto_recharge_command(ctx, body, caller.role == "admin"))

    @router.put("/v1/orgs/{org_id}/enforcement", openapi_extra=openapi.with_body(EnforcementBody, *ORG_STATE))
    async def put_enforcement(org_id: OrgPath, request: Request) -> Response:
        """Billing-rules 2.12. `shadow`: the org is billed beside the biller you run today (every
        gate and lease answer allows, no charge, no Stripe meter event, halts go out as
        `*.shadow`); with `undo`, back from a cutover, refused 409 `cutover_charged` once a
        charge was asked or a meter event of an hour from the cutover on was sent. `enforce`: a
        cutover at `at`, a whole UTC hour (absent: the next one); usage before it stays shadow,
        from it on it is billed, the Stripe meter included."""
        ctx.admin(request)
        body = parse_model(EnforcementBody, await request.body())
        at_us = _cutover_us(body, now_us())
        return await idempotent(ctx, request, lambda: _set_enforcement(ctx, org_id, body, at_us))

    @router.post("/v1/orgs/{org_id}/halt", openapi_extra=openapi.answers(*ORG_STATE, openapi.ANY_BODY))
    async def halt(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return await state_command(ctx, request, org_id, cmd.Halt())

    @router.post("/v1/orgs/{org_id}/resume", openapi_extra=openapi.answers(*ORG_STATE, openapi.ANY_BODY))
    async def resume(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return await state_command(ctx, request, org_id, cmd.Resume())

    @router.post("/v1/orgs/{org_id}/tokens", status_code=201, openapi_extra=openapi.with_body(
        TokenBody, {"201": ("The token and when it expires", openapi.OrgToken)}, openapi.ADMIN, ("404", "503")))
    async def mint_org_token(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(TokenBody, await request.body())
        await require_org(ctx, org_id)
        token, expires_s = ctx.org_tokens.mint(org_id, now_us(), body.ttl_s)
        return json({"org_id": org_id, "token": token, "expires_at": us_to_rfc3339(expires_s * 1_000_000)}, 201)

    @router.post("/v1/orgs/{org_id}/tokens/revoke", openapi_extra=openapi.answers(
        {"200": ("Tokens issued before tokens_valid_after are void", openapi.TokensRevoked)},
        openapi.ADMIN, openapi.ANY_BODY, ("404", "422", "503")))
    async def revoke_org_tokens(org_id: OrgPath, request: Request) -> Response:
        """Void every token of the org issued until now (a new one may be minted at once);
        every replica refuses them within a second."""
        ctx.admin(request)
        at = now_us()
        async with (await ctx.db()).acquire() as conn:
            if not await orgs.revoke_tokens(conn, org_id, at):
                raise unknown_org(org_id)
        return json({"org_id": org_id, "tokens_valid_after": us_to_rfc3339(at)})

    return router


HOUR_US = 3_600 * 1_000_000


def _cutover_us(body: EnforcementBody, now: int) -> int | None:
    """A cutover's instant: `at`, a whole UTC hour, or the next whole hour (enforce only)."""
    if body.mode == "shadow":
        if body.at is not None:
            raise ApiError(422, "invalid_request", "at is the instant of a cutover: only with mode enforce",
                           field="at")
        return None
    if body.undo:
        raise ApiError(422, "invalid_request", "undo goes back to shadow: only with mode shadow", field="undo")
    if body.at is None:
        return (now // HOUR_US + 1) * HOUR_US
    try:
        at_us = parse_time_us(body.at)
    except BadTime as exc:
        raise ApiError(422, "invalid_request", str(exc), field="at") from None
    if at_us % HOUR_US:
        raise ApiError(422, "invalid_request", "at must be a whole UTC hour (like 2026-12-08T10:00:00Z): the Stripe "
                       "meter bills whole hours", field="at")
    return at_us


async def _write_enforcement(ctx: Context, org_id: str, row: enforcement.Row | None) -> None:
    async with (await ctx.db()).acquire() as conn:
        await enforcement.write(conn, org_id, row)


async def _set_enforcement(ctx: Context, org_id: str, body: EnforcementBody, at_us: int | None) -> Response:
    """The org's command with the meter's row around it (storage/enforcement.py): a crash
    between the two leaves the org's meter events withheld, never sent; the same request again
    repairs the row. Going to shadow, the row first; a cutover, the row after, from the state."""
    if body.mode == "enforce":
        state = raise_for_shard_error(await ctx.router.command(org_id, cmd.SetEnforcement("enforce", at_us)))["state"]
        await _write_enforcement(ctx, org_id, enforcement.row_of(state.enforcement, state.cutover_us))
        return json(org_view(state))
    await require_org(ctx, org_id)
    async with (await ctx.db()).acquire() as conn:
        before = await enforcement.get(conn, org_id)
    cutover = before.cutover_us if before is not None else None
    if body.undo and cutover is None:
        cutover = (await org_state(ctx, org_id)).cutover_us
    moved: list[str] = []
    async with (await ctx.db()).acquire() as conn:
        if body.undo and cutover is not None:
            try:
                moved = await enforcement.begin_undo(conn, org_id, cutover)
            except enforcement.Charged as exc:
                raise ApiError(409, "cutover_charged", str(exc)) from None
            except enforcement.MeterBusy as exc:
                raise ApiError(503, "shard_busy", f"{exc}; retry shortly") from None
        else:
            await enforcement.write(conn, org_id, enforcement.Row(True, None))
    try:
        result = raise_for_shard_error(await ctx.router.command(
            org_id, cmd.SetEnforcement("shadow", None, body.undo)))
    except ApiError as exc:
        if exc.status < 500:  # refused, nothing changed: the events moved back, the row the org's
            async with (await ctx.db()).acquire() as conn:
                await enforcement.revert_undo(conn, org_id, await _row_now(ctx, org_id, before), moved)
        raise  # else the outcome is unknown: withheld until the same request again repairs the row
    state = result["state"]
    await _write_enforcement(ctx, org_id, enforcement.row_of(state.enforcement, state.cutover_us))
    return json(org_view(state))


async def _row_now(ctx: Context, org_id: str, before: enforcement.Row | None) -> enforcement.Row | None:
    """The meter's row of the org's state as its shard holds it now. Not `before`: on a retry
    of a request whose first attempt's outcome was unknown, that is the attempt's own shadow
    row, and an enforced org would keep its meter withheld for ever (the meter job releases
    the events held since its cutover once the row says so). `before` only if the state
    cannot be read (withheld, the safe side)."""
    try:
        state = await org_state(ctx, org_id)
    except ApiError:
        return before
    return enforcement.row_of(state.enforcement, state.cutover_us)


def _expiry(body: CreditBody) -> int | None:
    """A grant's expiry in µs (only a grant may expire, and not in the past)."""
    if body.expires_at is None:
        return None
    if body.kind != "grant":
        raise ApiError(422, "invalid_request", "only a grant may expire", field="expires_at")
    try:
        expires_at_us = parse_time_us(body.expires_at)
    except BadTime as exc:
        raise ApiError(422, "invalid_request", str(exc), field="expires_at") from None
    if expires_at_us <= now_us():
        raise ApiError(422, "invalid_request", "expires_at is in the past", field="expires_at")
    return expires_at_us
