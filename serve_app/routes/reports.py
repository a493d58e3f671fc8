"""Reports over what was committed (admin token): the ledger, usage, months."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from actors.timeutil import BadTime, parse_time_us
from serve_app import openapi
from serve_app.calls import ledger_page, months_of, require_org
from serve_app.context import Context, json
from serve_app.errors import ApiError
from serve_app.params import OrgPath
from serve_app.views import stored_entry_view, usage_groups_view
from storage import usage

MAX_LEDGER_PAGE = 500
GROUP_BY = ("lease", "meter", "day")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["orgs"])

    @router.get("/v1/orgs/{org_id}/ledger", openapi_extra=openapi.answers(
        {"200": ("A page of entries, newest first", openapi.LedgerPage)}, openapi.ADMIN, ("400", "404", "422", "503")))
    async def get_ledger(org_id: OrgPath, request: Request, cursor: str | None = None, limit: int = 50) -> Response:
        ctx.admin(request)
        if not 1 <= limit <= MAX_LEDGER_PAGE:
            raise ApiError(422, "invalid_request", f"limit must be between 1 and {MAX_LEDGER_PAGE}", field="limit")
        await require_org(ctx, org_id)
        rows, next_cursor = await ledger_page(ctx, org_id, cursor, limit)
        return json({"entries": [stored_entry_view(entry) for entry in rows], "next_cursor": next_cursor,
                     "has_more": next_cursor is not None})

    @router.get("/v1/orgs/{org_id}/usage", openapi_extra=openapi.answers(
        {"200": ("Usage grouped by lease, day or meter", openapi.UsageReport)}, openapi.ADMIN, ("404", "422", "503")))
    async def get_usage(org_id: OrgPath, request: Request, group_by: str = "lease") -> Response:
        ctx.admin(request)
        if group_by not in GROUP_BY:
            raise ApiError(422, "invalid_request", "group_by must be lease, meter or day", field="group_by")
        from_us, to_us = (_time_param(request, name) for name in ("from", "to"))
        await require_org(ctx, org_id)
        async with (await ctx.db()).acquire() as conn:
            groups = await usage.report(conn, org_id, group_by, from_us, to_us)
        return json({"org_id": org_id, "group_by": group_by, "groups": usage_groups_view(groups, group_by)})

    @router.get("/v1/orgs/{org_id}/months", openapi_extra=openapi.answers(
        {"200": ("One row per month, oldest first", openapi.Months)}, openapi.ADMIN, ("404", "422", "503")))
    async def get_months(org_id: OrgPath, request: Request) -> Response:
        """Per month: spend, usage hours, free credits applied, billable; recomputed from the ledger."""
        ctx.admin(request)
        await require_org(ctx, org_id)
        return json({"org_id": org_id, "months": await months_of(ctx, org_id)})

    return router


def _time_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    try:
        # ASCII digits are an epoch; "²" is a digit to isdigit() and not to int().
        return None if raw is None else parse_time_us(int(raw) if raw.isascii() and raw.isdigit() else raw)
    except BadTime as exc:
        raise ApiError(422, "invalid_request", str(exc), field=name) from None

