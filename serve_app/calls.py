"""What several routes ask of the shards and of storage: an org's state, a command answered
with the org's view, the check that an org exists, the ledger a page at a time, the months,
the auto-recharge settings as a command (the JSON API and the billing page share these)."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import Request, Response

from actors import commands as cmd
from actors.clock import now_us
from actors.months import Carry, month_start_us, next_month, summarize_months
from actors.org import MICROS_PER_CENT
from actors.timeutil import MAX_PLAUSIBLE_S, US_PER_S
from serve_app.bodies import AutoRechargeBody
from serve_app.context import Context, json
from serve_app.errors import ApiError, raise_for_shard_error, unknown_org
from serve_app.idempotency import idempotent
from serve_app.views import org_view
from storage import ledger, orgs, usage
from storage import months as months_store


async def org_state(ctx: Context, org_id: str):
    """The org's state, read from its shard's memory like the gate (once the org's commands in
    flight are answered, so a read never shows what a failed commit would take back)."""
    return raise_for_shard_error(await ctx.router.state(org_id))["state"]


async def command_state(ctx: Context, org_id: str, command) -> Response:
    """Run a command whose answer is the org's state after it."""
    return json(org_view(raise_for_shard_error(await ctx.router.command(org_id, command))["state"]))


async def state_command(ctx: Context, request: Request, org_id: str, command) -> Response:
    """A command whose answer is the org's state after it (idempotent by key)."""
    return await idempotent(ctx, request, lambda: command_state(ctx, org_id, command))


async def require_org(ctx: Context, org_id: str) -> None:
    async with (await ctx.db()).acquire() as conn:
        if not await orgs.exists(conn, org_id):
            raise unknown_org(org_id)


async def months_of(ctx: Context, org_id: str) -> list[dict]:
    """GET /v1/orgs/{id}/months and the billing page: the months kept once they were over,
    then the ones after them recomputed from the ledger and the rollups, all read in one
    consistent view. A read costs the months since the last one kept (the current one, as a
    rule), never the org's whole history; the months it finds over are kept for the next."""
    now = now_us()
    async with (await ctx.db()).acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            kept = await months_store.closed(conn, org_id)
            since = month_start_us(next_month(kept[-1][0])) if kept else None
            entries = await ledger.history(conn, org_id, since)
            lease_ms = await usage.lease_ms_by_month(conn, org_id, since)
    rows, ends = summarize_months(entries, lease_ms, now, Carry.from_json(kept[-1][2]) if kept else None)
    over, carry = [], Carry.from_json(kept[-1][2]) if kept else Carry()
    for row in rows:
        carry = ends.get(row["month"], carry)
        settled_us = (ctx.settings.tick_id_retention_s + MONTH_SETTLED_S) * US_PER_S
        if month_start_us(next_month(row["month"])) + settled_us > now:
            break  # still open, or just over: a late tick (accepted within the tick age window) may land in it
        over.append((row["month"], row, carry.to_json()))
    if over:
        async with (await ctx.db()).acquire() as conn:
            await months_store.keep(conn, org_id, over)
    return [summary for _, summary, _ in kept] + rows


# The billing page's months are reused this long: one computation per org and replica at a
# time, whatever the number of tabs (or loops) loading the page.
MONTHS_FRESH_S = 5.0
MONTHS_REMEMBERED = 1_000


async def recent_months_of(ctx: Context, org_id: str, fingerprint: tuple) -> list[dict]:
    """`months_of` for the billing page: loads of one org's page at the same time share one
    computation, and its answer serves later loads for MONTHS_FRESH_S while the org's money
    is as it was (`fingerprint`: what the page read of the org's state; every ledger entry
    moves it), so a page never shows a balance beside months from before it. The page's own
    forms forget it (`forget_months`). The JSON API (`GET /v1/orgs/{id}/months`) computes."""
    now = time.monotonic()
    held = ctx.recent_months.get(org_id)
    if held is None or held[1] != fingerprint or (held[2].done() and now - held[0] > MONTHS_FRESH_S):
        future = asyncio.ensure_future(months_of(ctx, org_id))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read: never "never retrieved"
        held = ctx.recent_months[org_id] = (now, fingerprint, future)
        if len(ctx.recent_months) > MONTHS_REMEMBERED:
            for stale in [org for org, (at, _, f) in ctx.recent_months.items()
                          if f.done() and now - at > MONTHS_FRESH_S]:
                del ctx.recent_months[stale]
    try:
        return await asyncio.shield(held[2])  # a load that goes away leaves the computation to the others
    except Exception:
        if ctx.recent_months.get(org_id) is held:
            del ctx.recent_months[org_id]  # a failure is not kept
        raise


def money_fingerprint(state) -> tuple:
    """What of an org's state (actors.org.OrgState) every ledger entry changes."""
    return (state.balance_micros, state.debt_micros, state.period_key, state.period_usage_micros,
            state.quota_used_micros, tuple((g.grant_id, g.remaining_micros) for g in state.grants))


def forget_months(ctx: Context, org_id: str) -> None:
    ctx.recent_months.pop(org_id, None)


# A month is kept this long after the tick age window past its end: shards and replicas stamp
# entries with clocks that may differ by a little.
MONTH_SETTLED_S = 3_600


async def ledger_page(ctx: Context, org_id: str, cursor: str | None,
                      limit: int) -> tuple[list[ledger.Entry], str | None]:
    """One page of the ledger, newest first, after an opaque cursor this API returned; and the
    cursor of the next page, if there is one."""
    after = read_time_cursor(cursor)
    async with (await ctx.db()).acquire() as conn:
        rows = await ledger.page(conn, org_id, after, limit)
    return rows[:limit], time_cursor(rows[limit - 1].created_us, rows[limit - 1].entry_id) if len(rows) > limit else None


def auto_recharge_command(ctx: Context, body: AutoRechargeBody, by_admin: bool = False) -> cmd.SetAutoRecharge:
    """PUT /v1/orgs/{id}/auto-recharge and the billing page's form: the settings as a command.
    Only an admin's settings lift a pause a dispute set (billing-rules 3.6)."""
    if not body.enabled:
        return cmd.SetAutoRecharge(False)
    for name in ("threshold_micros", "amount_micros"):
        if getattr(body, name) is None:
            raise ApiError(422, "invalid_request", f"{name} is required to enable auto-recharge", field=name)
    if body.amount_micros % MICROS_PER_CENT:
        raise ApiError(422, "invalid_amount", "amount_micros must be a whole number of cents", field="amount_micros")
    return cmd.SetAutoRecharge(True, body.threshold_micros, body.amount_micros, body.max_per_day,
                               ctx.settings.auto_recharge_cooldown_s, by_admin, body.threshold_runway_s)


def time_cursor(at_us: int, row_id: str) -> str:
    """A page cursor of a listing newest first: the last row's time and id."""
    return base64.urlsafe_b64encode(f"{at_us}|{row_id}".encode()).decode()


def read_time_cursor(cursor: str | None) -> tuple[int, str] | None:
    """A cursor time_cursor made (None: the first page); anything else is 400 invalid_cursor."""
    if not cursor:
        return None
    try:
        at, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        if not (at.isascii() and at.isdigit() and int(at) < MAX_PLAUSIBLE_S * US_PER_S):
            raise ValueError(at)
        if not row_id.isprintable():  # Postgres text holds no NUL: a forged cursor is not a 500
            raise ValueError(row_id)
        return int(at), row_id
    except (ValueError, UnicodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
