"""The test clock (only with METERGATE_TEST_CLOCK=1; without it these routes do not exist)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from actors import clock
from actors.clock import now_us
from actors.timeutil import us_to_rfc3339
from serve_app import openapi
from serve_app.bodies import ClockAdvanceBody, parse_model
from serve_app.context import Context, json
from storage import clock_offset


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["test clock"])

    @router.get("/v1/test-clock", openapi_extra=openapi.answers(
        {"200": ("The service's time now", openapi.ClockNow)}, openapi.ADMIN, ("503",)))
    async def get_test_clock(request: Request) -> Response:
        ctx.admin(request)
        async with (await ctx.db()).acquire() as conn:
            clock.set_offset_us(await clock_offset.offset_us(conn))
        return json({"now": us_to_rfc3339(now_us()), "now_us": now_us(), "offset_s": clock.offset_us() // 1_000_000})

    @router.post("/v1/test-clock/advance", openapi_extra=openapi.with_body(
        ClockAdvanceBody, {"200": ("The time after the jump, and what ran", openapi.ClockAdvanced)},
        openapi.ADMIN, ("503",)))
    async def advance_test_clock(request: Request) -> Response:
        """Move the service's clock forward and run what became due (resets, dunning, expiries)."""
        ctx.admin(request)
        body = parse_model(ClockAdvanceBody, await request.body())
        result = await ctx.jobs().advance_clock.remote(body.seconds)
        clock.set_offset_us(result["offset_us"])
        await ctx.router.caught_up()  # gate checks after this answer see what the jump changed
        return json({"now": us_to_rfc3339(now_us()), "now_us": now_us(),
                     "offset_s": result["offset_us"] // 1_000_000, "ran": result["ran"]})

    return router
