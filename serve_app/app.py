"""The HTTP surface of API.md (issue scope: auth, errors, gate and leases, usage, orgs)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Annotated

import asyncpg
import msgspec
from fastapi import FastAPI, Path, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from actors import commands as cmd
from actors import clock
from actors.clock import now_us
from actors.org import MICROS_PER_CENT, Resources
from actors.shard import CreateOrg, GetState
from actors.ticks import ID_PATTERN
from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from serve_app.billing_page import render as render_billing_page
from serve_app.bodies import (GATE_DECODER, AutoRechargeBody, ClockAdvanceBody, CreateOrgBody, CreditBody, LimitsBody,
                              PlanBody, TierBody, TokenBody, body_schema, decode, parse_model)
from serve_app import openapi
from serve_app.errors import ApiError, install_error_handlers, raise_for_shard_error
from serve_app.limits import BodyLimit
from serve_app.months import summarize
from storage.journal import dt_to_us, us_to_dt
from serve_app.self_serve import add_routes as add_self_serve_routes
from serve_app.compute import record_usage, release_lease, take_lease
from serve_app.context import Context, json
from serve_app.webhooks_in import stripe_webhook, svix_webhook

NO_RESOURCES = Resources()
OrgPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
LeasePath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
MAX_IDEMPOTENCY_KEY = 255


def ledger_view(entry: dict) -> dict:
    view = {"entry_id": entry.get("entry_id"), "kind": entry["kind"],
            "amount_micros": entry["amount_micros"], "created_at": us_to_rfc3339(entry["at_us"])}
    if entry.get("grant_id"):
        view["grant_id"] = entry["grant_id"]
    if entry.get("expires_at_us"):
        view["expires_at"] = us_to_rfc3339(entry["expires_at_us"])
    if entry.get("note"):
        view["note"] = entry["note"]
    return view


def build_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="metergate", version="1", description="Usage billing and entitlements")
    install_error_handlers(app)
    openapi.install(app)
    app.add_middleware(BodyLimit, default_limit=ctx.settings.max_body_bytes,
                       limits={"/v1/usage": ctx.settings.max_usage_body_bytes,
                               "/webhooks/svix": ctx.settings.max_usage_body_bytes})
    router = ctx.router

    # ----- ops ----------------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {}
        try:
            async with (await ctx.db()).acquire() as conn:
                await conn.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in router.handles)), 10)
            checks["shards"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["shards"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    # ----- gate and leases (service token) ------------------------------------------------

    @app.post("/v1/gate", tags=["gate"], openapi_extra=openapi.GATE)
    async def gate(request: Request) -> Response:
        ctx.service(request)
        body = decode(GATE_DECODER, await request.body())
        resources = body.resources.to_core() if body.resources else NO_RESOURCES
        result = raise_for_shard_error(await router.gate(body.org_id, body.action, resources))
        return json(result)

    @app.post("/v1/leases", tags=["gate"], openapi_extra=openapi.LEASE)
    async def take_lease_route(request: Request) -> Response:
        ctx.service(request)
        status, body = await take_lease(ctx, await request.body())
        return json(body, status)

    @app.post("/v1/leases/{org_id}/{lease_id}/renew", tags=["gate"])
    async def renew_lease(org_id: OrgPath, lease_id: LeasePath, request: Request) -> Response:
        ctx.service(request)
        result = raise_for_shard_error(await router.command(org_id, cmd.RenewLease(lease_id)))
        return json({"org_id": org_id, **result["lease"]})

    @app.delete("/v1/leases/{org_id}/{lease_id}", tags=["gate"], status_code=204)
    async def release_lease_route(org_id: OrgPath, lease_id: LeasePath, request: Request) -> Response:
        ctx.service(request)
        await release_lease(ctx, org_id, lease_id)
        return Response(status_code=204)

    # ----- usage --------------------------------------------------------------------------

    @app.post("/v1/usage", tags=["usage"], openapi_extra=openapi.USAGE)
    async def post_usage(request: Request) -> Response:
        ctx.service(request)
        return json(await record_usage(ctx, await request.body()))

    # ----- webhooks in ----------------------------------------------------------------------

    @app.post("/webhooks/svix", tags=["webhooks"], openapi_extra=openapi.SVIX)
    async def svix(request: Request) -> Response:
        """Compute-plane lifecycle events, signed with the Svix / Standard Webhooks scheme."""
        status, body = await svix_webhook(ctx, await request.body(), request.headers)
        return json(body, status)

    @app.post("/webhooks/stripe", tags=["webhooks"], openapi_extra=openapi.STRIPE)
    async def stripe_events(request: Request) -> Response:
        """Stripe events, verified with Stripe-Signature (±5 minutes)."""
        status, body = await stripe_webhook(ctx, await request.body(), request.headers)
        return json(body, status)

    # ----- organizations (admin token) ----------------------------------------------------

    @app.post("/v1/orgs", tags=["orgs"], openapi_extra=body_schema(CreateOrgBody))
    async def create_org(request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(CreateOrgBody, await request.body())

        async def run() -> Response:
            plan_id = body.plan_id or ctx.catalog.default_plan
            if ctx.catalog.current_plan(plan_id, now_us()) is None:
                raise ApiError(422, "unknown_plan", f"plan {plan_id} is not in the catalog",
                               plans=ctx.catalog.plan_ids())
            result = raise_for_shard_error(await router.command(
                body.org_id, CreateOrg(body.email, plan_id, body.billing_mode == "prepaid")))
            return json(result["state"], 201 if result["created"] else 200)

        return await idempotent(ctx, request, run)

    @app.get("/v1/orgs/{org_id}", tags=["orgs"])
    async def get_org(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return json(raise_for_shard_error(await router.command(org_id, GetState()))["state"])

    @app.post("/v1/orgs/{org_id}/credits", tags=["orgs"], openapi_extra=body_schema(CreditBody))
    async def post_credit(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(CreditBody, await request.body())
        now = now_us()
        if body.amount_micros == 0 or (body.kind != "adjustment" and body.amount_micros < 0):
            raise ApiError(422, "invalid_amount",
                           "amount_micros must be > 0 (an adjustment may be negative, never 0)",
                           field="amount_micros")
        expires_at_us = None
        if body.expires_at is not None:
            if body.kind != "grant":
                raise ApiError(422, "invalid_request", "only a grant may expire", field="expires_at")
            try:
                expires_at_us = parse_time_us(body.expires_at)
            except BadTime as exc:
                raise ApiError(422, "invalid_request", str(exc), field="expires_at") from None
            if expires_at_us <= now:
                raise ApiError(422, "invalid_request", "expires_at is in the past", field="expires_at")
        amount = -body.amount_micros if body.kind == "refund" else body.amount_micros
        key = request.headers.get("idempotency-key")

        async def run() -> Response:
            command = cmd.Credit(body.kind, amount, expires_at_us, body.note, key)
            result = raise_for_shard_error(await router.command(org_id, command, await request_hash(request)))
            return json({**ledger_view(result["entry"]), "org_id": org_id,
                         "balance_micros": result["balance_micros"]}, 201)

        return await idempotent(ctx, request, run)

    @app.get("/v1/orgs/{org_id}/ledger", tags=["orgs"])
    async def get_ledger(org_id: OrgPath, request: Request, cursor: str | None = None, limit: int = 50) -> Response:
        ctx.admin(request)
        if not 1 <= limit <= 500:
            raise ApiError(422, "invalid_request", "limit must be between 1 and 500", field="limit")
        after = _decode_cursor(cursor)
        async with (await ctx.db()).acquire() as conn:
            await _require_org(conn, org_id)
            rows = await conn.fetch(
                "SELECT entry_id, kind, amount_micros, grant_id, expires_at, note, created_at FROM ledger"
                " WHERE org_id = $1 AND ($2::timestamptz IS NULL OR (created_at, entry_id) < ($2, $3))"
                " ORDER BY created_at DESC, entry_id DESC LIMIT $4",
                org_id, after[0] if after else None, after[1] if after else "", limit + 1)
        entries = [{
            "entry_id": r["entry_id"], "kind": r["kind"], "amount_micros": r["amount_micros"],
            "created_at": r["created_at"].isoformat().replace("+00:00", "Z"),
            **({"grant_id": r["grant_id"]} if r["grant_id"] else {}),
            **({"expires_at": r["expires_at"].isoformat().replace("+00:00", "Z")} if r["expires_at"] else {}),
            **({"note": r["note"]} if r["note"] else {}),
        } for r in rows[:limit]]
        next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return json({"entries": entries, "next_cursor": next_cursor, "has_more": next_cursor is not None})

    @app.get("/v1/orgs/{org_id}/usage", tags=["orgs"])
    async def get_usage(org_id: OrgPath, request: Request, group_by: str = "lease") -> Response:
        ctx.admin(request)
        if group_by not in ("lease", "meter", "day"):
            raise ApiError(422, "invalid_request", "group_by must be lease, meter or day", field="group_by")
        window = []
        for name in ("from", "to"):
            raw = request.query_params.get(name)
            try:
                window.append(None if raw is None else parse_time_us(int(raw) if raw.isdigit() else raw))
            except BadTime as exc:
                raise ApiError(422, "invalid_request", str(exc), field=name) from None
        from_us, to_us = window
        key = {"lease": "lease_id", "day": "date_trunc('day', minute)", "meter": "''"}[group_by]
        async with (await ctx.db()).acquire() as conn:
            await _require_org(conn, org_id)
            rows = await conn.fetch(
                f"SELECT {key} AS k, sum(memory_mb_ms)::int8 AS memory_mb_ms, sum(cpu_ms)::int8 AS cpu_ms,"
                " sum(disk_mb_ms)::int8 AS disk_mb_ms, sum(ticks)::int8 AS ticks,"
                " sum(cost_nanos)::int8 AS cost_nanos FROM usage_rollups WHERE org_id = $1"
                " AND ($2::timestamptz IS NULL OR minute >= $2) AND ($3::timestamptz IS NULL OR minute < $3)"
                " GROUP BY 1 ORDER BY 1",
                org_id, _dt(from_us), _dt(to_us))
        groups = []
        for r in rows:
            group = {"memory_mb_ms": r["memory_mb_ms"], "cpu_ms": r["cpu_ms"], "disk_mb_ms": r["disk_mb_ms"],
                     "ticks": r["ticks"], "cost_micros": r["cost_nanos"] // 1_000}
            if group_by == "lease":
                group = {"lease_id": r["k"], **group}
            elif group_by == "day":
                group = {"day": r["k"].date().isoformat(), **group}
            groups.append(group)
        if group_by == "meter":
            total = groups[0] if groups else {"memory_mb_ms": 0, "cpu_ms": 0, "disk_mb_ms": 0, "cost_micros": 0}
            groups = [{"meter": m, "quantity": total[q], "unit": u} for m, q, u in (
                ("memory", "memory_mb_ms", "MB·ms"), ("cpu", "cpu_ms", "vCPU·ms"), ("disk", "disk_mb_ms", "MB·ms"))]
        return json({"org_id": org_id, "group_by": group_by, "groups": groups})

    @app.get("/v1/orgs/{org_id}/months", tags=["orgs"])
    async def get_months(org_id: OrgPath, request: Request) -> Response:
        """Per month: spend, usage hours, free credits applied, billable; recomputed from the ledger."""
        ctx.admin(request)
        async with (await ctx.db()).acquire() as conn:
            await _require_org(conn, org_id)
            async with conn.transaction(isolation="repeatable_read", readonly=True):  # one consistent view
                ledger = await conn.fetch(
                    "SELECT kind, amount_micros, grant_id, created_at FROM ledger WHERE org_id = $1"
                    " ORDER BY created_at, entry_id", org_id)
                usage = await conn.fetch(
                    "SELECT to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM') AS month, sum(duration_ms)::int8 AS ms"
                    " FROM usage_rollups WHERE org_id = $1 GROUP BY 1", org_id)
        entries = [(r["kind"], r["amount_micros"], r["grant_id"], dt_to_us(r["created_at"])) for r in ledger]
        return json({"org_id": org_id, "months": summarize(entries, {r["month"]: r["ms"] for r in usage}, now_us())})

    @app.put("/v1/orgs/{org_id}/plan", tags=["orgs"], openapi_extra=body_schema(PlanBody))
    async def put_plan(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(PlanBody, await request.body())
        plan = ctx.catalog.current_plan(body.plan_id, now_us())
        if plan is None:
            raise ApiError(422, "unknown_plan", f"plan {body.plan_id} is not in the catalog",
                           plans=ctx.catalog.plan_ids())
        return await state_command(ctx, request, org_id, cmd.SetPlan(plan.id, plan.version))

    @app.put("/v1/orgs/{org_id}/tier", tags=["orgs"], openapi_extra=body_schema(TierBody))
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

    @app.put("/v1/orgs/{org_id}/limits", tags=["orgs"], openapi_extra=body_schema(LimitsBody))
    async def put_limits(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(LimitsBody, await request.body())
        return await state_command(ctx, request, org_id, cmd.SetLimits(body.max_disk_mb, body.machine_quotas))

    @app.put("/v1/orgs/{org_id}/auto-recharge", tags=["orgs"], openapi_extra=body_schema(AutoRechargeBody))
    async def put_auto_recharge(org_id: OrgPath, request: Request) -> Response:
        """Opt in or out. With the balance under the threshold and a card on file, turning it on
        charges at once (the arming charge); later a debit that takes the balance under the
        threshold charges, at most once per cooldown and `max_per_day` times a UTC day."""
        ctx.org_or_admin(request, org_id)
        body = parse_model(AutoRechargeBody, await request.body())
        if not body.enabled:
            return await state_command(ctx, request, org_id, cmd.SetAutoRecharge(False))
        for name in ("threshold_micros", "amount_micros"):
            if getattr(body, name) is None:
                raise ApiError(422, "invalid_request", f"{name} is required to enable auto-recharge", field=name)
        if body.amount_micros % MICROS_PER_CENT:
            raise ApiError(422, "invalid_amount", "amount_micros must be a whole number of cents",
                           field="amount_micros")
        return await state_command(ctx, request, org_id, cmd.SetAutoRecharge(
            True, body.threshold_micros, body.amount_micros, body.max_per_day,
            ctx.settings.auto_recharge_cooldown_s))

    @app.post("/v1/orgs/{org_id}/halt", tags=["orgs"])
    async def halt(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return await state_command(ctx, request, org_id, cmd.Halt())

    @app.post("/v1/orgs/{org_id}/resume", tags=["orgs"])
    async def resume(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        return await state_command(ctx, request, org_id, cmd.Resume())

    add_self_serve_routes(app, ctx)

    # ----- outbound webhooks (admin) ------------------------------------------------------

    @app.get("/v1/webhooks/outbox", tags=["webhooks"])
    async def list_outbox(request: Request, status: str = "dead", limit: int = 50) -> Response:
        """Outbound events by delivery status: `pending`, `delivered` or `dead` (the dead letters)."""
        ctx.admin(request)
        if status not in ("pending", "delivered", "dead"):
            raise ApiError(422, "invalid_request", "status must be pending, delivered or dead", field="status")
        if not 1 <= limit <= 500:
            raise ApiError(422, "invalid_request", "limit must be 1-500", field="limit")
        async with (await ctx.db()).acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, org_id, type, payload, created_at, status, attempts, last_error, delivered_at"
                " FROM outbox WHERE status = $1 ORDER BY id DESC LIMIT $2", status, limit)
        return json({"events": [{
            "id": f"msg_{r['id']}", "org_id": r["org_id"], "type": r["type"], "status": r["status"],
            "attempts": r["attempts"], "last_error": r["last_error"],
            "created_at": r["created_at"].isoformat(), "data": msgspec.json.decode(r["payload"]),
            "delivered_at": r["delivered_at"].isoformat() if r["delivered_at"] else None} for r in rows]})

    @app.post("/v1/webhooks/outbox/{message_id}/retry", tags=["webhooks"])
    async def retry_outbox(message_id: Annotated[str, Path(pattern=r"^msg_[0-9]{1,18}$")], request: Request) -> Response:
        """A dead letter goes back to pending, tried again now with the same message id."""
        ctx.admin(request)
        async with (await ctx.db()).acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = '-infinity'"
                " WHERE id = $1 AND status = 'dead' RETURNING id", int(message_id[4:]))
            if row is None:
                exists = await conn.fetchval("SELECT status FROM outbox WHERE id = $1", int(message_id[4:]))
                if exists is None:
                    raise ApiError(404, "not_found", f"no outbound event {message_id}")
                raise ApiError(409, "not_dead", f"{message_id} is {exists}, not dead")
        return json({"id": message_id, "status": "pending"})

    # ----- test clock -------------------------------------------------------------------

    if ctx.settings.test_clock:
        @app.get("/v1/test-clock", tags=["test clock"])
        async def get_test_clock(request: Request) -> Response:
            ctx.admin(request)
            async with (await ctx.db()).acquire() as conn:
                clock.set_offset_us(await clock.load_offset_us(conn))
            return json({"now": us_to_rfc3339(now_us()), "now_us": now_us(), "offset_s": clock.offset_us() // 1_000_000})

        @app.post("/v1/test-clock/advance", tags=["test clock"], openapi_extra=body_schema(ClockAdvanceBody))
        async def advance_test_clock(request: Request) -> Response:
            """Move the service's clock forward and run what became due (resets, dunning, expiries)."""
            ctx.admin(request)
            body = parse_model(ClockAdvanceBody, await request.body())
            result = await ctx.jobs().advance_clock.remote(body.seconds)
            clock.set_offset_us(result["offset_us"])
            return json({"now": us_to_rfc3339(now_us()), "now_us": now_us(),
                         "offset_s": result["offset_us"] // 1_000_000, "ran": result["ran"]})

    @app.post("/v1/orgs/{org_id}/tokens", tags=["orgs"], openapi_extra=body_schema(TokenBody))
    async def mint_org_token(org_id: OrgPath, request: Request) -> Response:
        ctx.admin(request)
        body = parse_model(TokenBody, await request.body())
        async with (await ctx.db()).acquire() as conn:
            await _require_org(conn, org_id)
        token, expires_s = ctx.org_tokens.mint(org_id, now_us() // 1_000_000, body.ttl_s)
        return json({"org_id": org_id, "token": token, "expires_at": us_to_rfc3339(expires_s * 1_000_000)}, 201)

    @app.get("/billing/{org_id}", tags=["self-serve"], response_class=HTMLResponse)
    async def billing_page(org_id: OrgPath, request: Request) -> Response:
        """The org's billing page; open it with the org's token (`?token=` or a bearer header)."""
        ctx.org_or_admin(request, org_id, allow_query=True)
        state = raise_for_shard_error(await router.command(org_id, GetState()))["state"]
        async with (await ctx.db()).acquire() as conn:
            rows = await conn.fetch(
                "SELECT kind, amount_micros, note, created_at FROM ledger WHERE org_id = $1"
                " ORDER BY created_at DESC, entry_id DESC LIMIT 20", org_id)
        ledger = [{"kind": r["kind"], "amount_micros": r["amount_micros"], "note": r["note"],
                   "created_at": r["created_at"].strftime("%Y-%m-%d %H:%M UTC")} for r in rows]
        page = render_billing_page(state, ledger, payments_configured=bool(ctx.settings.stripe_secret_key))
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    return app


async def state_command(ctx: Context, request: Request, org_id: str, command) -> Response:
    async def run() -> Response:
        return json(raise_for_shard_error(await ctx.router.command(org_id, command))["state"])

    return await idempotent(ctx, request, run)


async def request_hash(request: Request) -> str:
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    digest.update(await request.body())
    return digest.hexdigest()


async def idempotent(ctx: Context, request: Request, run) -> Response:
    """Idempotency-Key: the first response again for the same request, 409 for another."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await run()
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key",
                       f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    fingerprint = await request_hash(request)
    async with (await ctx.db()).acquire() as conn:
        row = await conn.fetchrow(
            "SELECT request_hash, status, body FROM http_idempotency WHERE scope = 'admin' AND key = $1", key)
    if row is not None:
        if row["request_hash"] != fingerprint:
            raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request")
        return Response(row["body"], status_code=row["status"], media_type="application/json")
    response = await run()
    if response.status_code < 500:
        async with (await ctx.db()).acquire() as conn:
            await conn.execute(
                "INSERT INTO http_idempotency (scope, key, request_hash, status, body)"
                " VALUES ('admin', $1, $2, $3, $4) ON CONFLICT DO NOTHING",
                key, fingerprint, response.status_code, bytes(response.body))
    return response


async def _require_org(conn: asyncpg.Connection, org_id: str) -> None:
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM orgs WHERE org_id = $1)", org_id):
        raise ApiError(404, "unknown_org", f"org {org_id} does not exist")


def _dt(us: int | None):
    return None if us is None else us_to_dt(us)


def _encode_cursor(row) -> str:
    raw = f"{int(row['created_at'].timestamp() * 1_000_000)}|{row['entry_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str | None):
    if not cursor:
        return None
    try:
        at, entry_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return _dt(int(at)), entry_id
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
