"""Reports over what was committed (admin token): the ledger, usage, months."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request, Response

from actors.clock import now_us
from actors.timeutil import MAX_PLAUSIBLE_S, US_PER_S, BadTime, parse_time_us
from serve_app.calls import require_org
from serve_app.context import Context, json
from serve_app.errors import ApiError
from actors.months import summarize
from serve_app.params import OrgPath
from serve_app.views import stored_entry_view, usage_groups_view
from storage import ledger, usage

MAX_LEDGER_PAGE = 500
GROUP_BY = ("lease", "meter", "day")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["orgs"])

    @router.get("/v1/orgs/{org_id}/ledger")
    async def get_ledger(org_id: OrgPath, request: Request, cursor: str | None = None, limit: int = 50) -> Response:
        ctx.admin(request)
        if not 1 <= limit <= MAX_LEDGER_PAGE:
            raise ApiError(422, "invalid_request", f"limit must be between 1 and {MAX_LEDGER_PAGE}", field="limit")
        after = _decode_cursor(cursor)
        await require_org(ctx, org_id)
        async with (await ctx.db()).acquire() as conn:
            rows = await ledger.page(conn, org_id, after, limit)
        next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return json({"entries": [stored_entry_view(entry) for entry in rows[:limit]], "next_cursor": next_cursor,
                     "has_more": next_cursor is not None})

    @router.get("/v1/orgs/{org_id}/usage")
    async def get_usage(org_id: OrgPath, request: Request, group_by: str = "lease") -> Response:
        ctx.admin(request)
        if group_by not in GROUP_BY:
            raise ApiError(422, "invalid_request", "group_by must be lease, meter or day", field="group_by")
        from_us, to_us = (_time_param(request, name) for name in ("from", "to"))
        await require_org(ctx, org_id)
        async with (await ctx.db()).acquire() as conn:
            groups = await usage.report(conn, org_id, group_by, from_us, to_us)
        return json({"org_id": org_id, "group_by": group_by, "groups": usage_groups_view(groups, group_by)})

    @router.get("/v1/orgs/{org_id}/months")
    async def get_months(org_id: OrgPath, request: Request) -> Response:
        """Per month: spend, usage hours, free credits applied, billable; recomputed from the ledger."""
        ctx.admin(request)
        await require_org(ctx, org_id)
        async with (await ctx.db()).acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):  # one consistent view
                entries = await ledger.history(conn, org_id)
                lease_ms = await usage.lease_ms_by_month(conn, org_id)
        return json({"org_id": org_id, "months": summarize(entries, lease_ms, now_us())})

    return router


def _time_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    try:
        return None if raw is None else parse_time_us(int(raw) if raw.isdigit() else raw)
    except BadTime as exc:
        raise ApiError(422, "invalid_request", str(exc), field=name) from None


def _encode_cursor(entry: ledger.Entry) -> str:
    return base64.urlsafe_b64encode(f"{entry.created_us}|{entry.entry_id}".encode()).decode()


def _decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    try:
        at, entry_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        if not 0 <= int(at) < MAX_PLAUSIBLE_S * US_PER_S:
            raise ValueError(at)
        return int(at), entry_id
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
