"""Webhooks in (Svix-signed compute-plane events, Stripe events; admin: the Stripe events not
applied) and the outbox of webhooks out (admin: list by status, retry a dead letter)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from actors.meter_reconcile import MeterReconcileFailed
from serve_app import openapi
from serve_app.bodies import ReconcileBody, parse_model
from serve_app.calls import read_time_cursor, time_cursor
from serve_app.context import Context, json
from serve_app.errors import ApiError
from serve_app.params import MessagePath
from serve_app.stripe_gateway import StripeRefused
from serve_app.stripe_reconcile import reconcile_page
from serve_app.views import inbound_event_view, outbound_event_view
from serve_app.webhooks_in import stripe_webhook, svix_webhook
from storage import inbound_webhooks, outbox

STATUSES = ("pending", "delivered", "dead")
MAX_PAGE = 500
NOT_APPLIED = ("ignored", "dead_letter")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["webhooks"])

    @router.post("/webhooks/svix", openapi_extra=openapi.SVIX)
    async def svix(request: Request) -> Response:
        """Compute-plane lifecycle events, signed with the Svix / Standard Webhooks scheme."""
        status, body = await svix_webhook(ctx, await request.body(), request.headers)
        return json(body, status)

    @router.post("/webhooks/stripe", openapi_extra=openapi.STRIPE)
    async def stripe_events(request: Request) -> Response:
        """Stripe events, verified with Stripe-Signature (±5 minutes)."""
        status, body = await stripe_webhook(ctx, await request.body(), request.headers)
        return json(body, status)

    @router.get("/v1/webhooks/inbound", openapi_extra=openapi.answers(
        {"200": ("A page of events, newest first", openapi.InboundPage)}, openapi.ADMIN, ("400", "422", "503")))
    async def list_inbound(request: Request, outcome: str | None = None, cursor: str | None = None,
                           limit: int = 50) -> Response:
        """Stripe events answered but not applied, newest first, a page at a time: `outcome`
        `dead_letter` (metergate could not apply it: an unknown org, a field it cannot read, a
        shard's refusal) or `ignored` (nothing to do, or not this deployment's: another
        livemode, no org); both when left out. `next_cursor` asks for the next page."""
        ctx.admin(request)
        if outcome is not None and outcome not in NOT_APPLIED:
            raise ApiError(422, "invalid_request", "outcome must be dead_letter or ignored", field="outcome")
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(422, "invalid_request", f"limit must be 1-{MAX_PAGE}", field="limit")
        after = read_time_cursor(cursor)
        async with (await ctx.db()).acquire() as conn:
            rows = await inbound_webhooks.unapplied_page(conn, "stripe", (outcome,) if outcome else NOT_APPLIED,
                                                         after, limit)
        next_cursor = time_cursor(rows[limit - 1].received_us, rows[limit - 1].event_id) if len(rows) > limit else None
        return json({"events": [inbound_event_view(row) for row in rows[:limit]], "next_cursor": next_cursor,
                     "has_more": next_cursor is not None})

    @router.post("/v1/stripe/reconcile", openapi_extra=openapi.with_body(
        ReconcileBody, {"200": ("One page read back", openapi.Reconciled)}, openapi.ADMIN, ("404", "502", "503")))
    async def reconcile(request: Request) -> Response:
        """After a database restore: one page (newest first) of the events Stripe created at or
        after `since` (Unix seconds), each applied as its delivery would be unless the database
        records it already. Ask again with `starting_after` = `next` until `next` is null.
        `metergate inbound reconcile --since` does the paging; docs/operations/restore.md says when."""
        ctx.admin(request)
        body = parse_model(ReconcileBody, await request.body())
        try:
            if body.starting_after is not None and body.started_at is None:
                raise ApiError(422, "invalid_request", "a later page carries the first page's started_at",
                               field="started_at")
            return json(await reconcile_page(ctx, body.since, body.starting_after, body.limit, body.started_at))
        except StripeRefused as exc:
            raise ApiError(502, "stripe_error", str(exc)) from None

    @router.post("/v1/stripe/reconcile-meters", openapi_extra=openapi.with_body(
        ReconcileBody, {"200": ("What was recorded as sent", openapi.MetersReconciled)}, openapi.ADMIN, ("502", "503")))
    async def reconcile_meters(request: Request) -> Response:
        """After a database restore, once the events are read back: what Stripe's meter holds
        since `since` (Unix seconds) beyond the meter events the database has is recorded as
        sent, so usage a gateway sends again is not billed twice. `{"orgs", "hours",
        "recorded_micros"}`. Running it twice records nothing twice."""
        ctx.admin(request)
        body = parse_model(ReconcileBody, await request.body())
        try:
            return json(await ctx.jobs().reconcile_meters.remote(body.since * 1_000_000))
        except MeterReconcileFailed as exc:  # raised in the scheduler: its message only, no remote trace
            raise ApiError(502, "stripe_error", str(getattr(exc, "cause", None) or exc)) from None

    @router.get("/v1/webhooks/outbox", openapi_extra=openapi.answers(
        {"200": ("The events, newest first", openapi.OutboxList)}, openapi.ADMIN, ("422", "503")))
    async def list_outbox(request: Request, status: str = "dead", limit: int = 50) -> Response:
        """Outbound events by delivery status: `pending`, `delivered` or `dead` (the dead letters)."""
        ctx.admin(request)
        if status not in STATUSES:
            raise ApiError(422, "invalid_request", "status must be pending, delivered or dead", field="status")
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(422, "invalid_request", f"limit must be 1-{MAX_PAGE}", field="limit")
        async with (await ctx.db()).acquire() as conn:
            events = await outbox.by_status(conn, status, limit)
        return json({"events": [outbound_event_view(event) for event in events]})

    @router.post("/v1/webhooks/outbox/{message_id}/retry", openapi_extra=openapi.answers(
        {"200": ("Pending again", openapi.OutboxRetried)}, openapi.ADMIN, openapi.ANY_BODY,
        ("404", "409", "422", "503")))
    async def retry_outbox(message_id: MessagePath, request: Request) -> Response:
        """A dead letter goes back to pending, tried again now with the same message id."""
        ctx.admin(request)
        async with (await ctx.db()).acquire() as conn:
            was = await outbox.retry_dead(conn, message_id)
        if was is None:
            raise ApiError(404, "not_found", f"no outbound event {message_id}")
        if was != "dead":
            raise ApiError(409, "not_dead", f"{message_id} is {was}, not dead")
        return json({"id": message_id, "status": "pending"})

    return router
