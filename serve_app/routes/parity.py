"""Usage parity (admin token): the platform posts its own usage per org and UTC hour, and asks
how it compares with what metergate metered (serve_app/usage_parity.py;
docs/operations/parity.md)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from actors import metrics
from actors.clock import now_us
from actors.ticks import ID_PATTERN
from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from serve_app import openapi
from serve_app.bodies import parse_model
from serve_app.context import Context, json
from serve_app.errors import ApiError
from serve_app.usage_parity import DEFAULT_TOLERANCE_PPM, PPM, UsageParityBody, compare, hour_usage
from storage import parity
from storage.parity import HOUR_US

MAX_REPORT_HOURS = 31 * 24  # per report
MAX_REPORT_ORG_HOURS = 10_000  # per side of a report: past it, a narrower window or one org
REPORT_TIMEOUT_MS = 20_000  # statement_timeout of a report's queries: well under the CLI's 60 s


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["parity"])

    @router.post("/v1/parity/usage", openapi_extra=openapi.with_body(
        UsageParityBody, {"200": ("Stored; `replaced` names the org-hours a post had given before",
                                  openapi.UsageParityStored)}, openapi.ADMIN, ("503",)))
    async def post_usage(request: Request) -> Response:
        """The platform's own usage per org and UTC hour, stored to compare with what metergate
        metered. A post of an org and hour given before replaces it (and says so)."""
        ctx.admin(request)
        rows = hour_usage(parse_model(UsageParityBody, await request.body()))
        async with (await ctx.db()).acquire() as conn:
            replaced = await parity.store_posted(conn, rows, now_us())
        return json({"stored": len(rows), "created": len(rows) - len(replaced), "replaced": len(replaced),
                     "replaced_org_hours": [{"org_id": org_id, "hour": us_to_rfc3339(hour_us)}
                                            for org_id, hour_us in replaced]})

    @router.get("/v1/parity/usage", openapi_extra=openapi.answers(
        {"200": ("Per org and hour: ours, theirs, the difference, the ratio, within the tolerance or not",
                 openapi.UsageParity)}, openapi.ADMIN, ("422", "503")))
    async def get_usage(request: Request, from_: str = Query(alias="from", max_length=64),
                        to: str = Query(max_length=64),
                        tolerance_ppm: int = Query(DEFAULT_TOLERANCE_PPM, ge=0, le=PPM),
                        org_id: str | None = Query(None, min_length=1, max_length=128, pattern=ID_PATTERN)) -> Response:
        """Each org and UTC hour from `from` to `to` (hour starts) that metergate metered or the
        platform posted, compared: a quantity is within the tolerance when |ours - theirs| x
        1,000,000 <= tolerance_ppm x max(ours, theirs)."""
        ctx.admin(request)
        from_us, to_us = _hour_param(from_, "from"), _hour_param(to, "to")
        if not from_us < to_us <= from_us + MAX_REPORT_HOURS * HOUR_US:
            raise ApiError(422, "invalid_request", f"to must be after from, by at most {MAX_REPORT_HOURS} hours",
                           field="to")
        async with (await ctx.db()).acquire() as conn:
            try:
                sides = await parity.report_sides(conn, from_us, to_us, org_id, MAX_REPORT_ORG_HOURS,
                                                  REPORT_TIMEOUT_MS)
            except parity.ReportTimedOut:
                raise ApiError(422, "invalid_request", f"the window took longer than {REPORT_TIMEOUT_MS:,} ms "
                               "to sum: narrow it, or pass org_id", field="to") from None
        if sides is None:
            raise ApiError(422, "invalid_request", f"the window holds more than {MAX_REPORT_ORG_HOURS:,} org-hours: "
                           "narrow it, or pass org_id", field="to")
        ours, theirs = sides
        report = compare(ours, theirs, tolerance_ppm)
        if org_id is None:  # the gauges describe the last report over every org, never one org's
            metrics.usage_parity_reported(len(report.org_hours), report.outside_tolerance)
        return json({"from": us_to_rfc3339(from_us), "to": us_to_rfc3339(to_us), "tolerance_ppm": tolerance_ppm,
                     "org_id": org_id, "checked": len(report.org_hours), "outside_tolerance": report.outside_tolerance,
                     "only_metergate": report.only_metergate, "only_platform": report.only_platform,
                     "org_hours": report.org_hours})

    return router


def _hour_param(raw: str, name: str) -> int:
    try:
        # ASCII digits are an epoch; "²" is a digit to isdigit() and not to int().
        at_us = parse_time_us(int(raw) if raw.isascii() and raw.isdigit() else raw)
    except BadTime as exc:
        raise ApiError(422, "invalid_request", str(exc), field=name) from None
    if at_us % HOUR_US:
        raise ApiError(422, "invalid_request", f"{name} must be the start of a UTC hour (like 2026-12-07T10:00:00Z)",
                       field=name)
    return at_us
