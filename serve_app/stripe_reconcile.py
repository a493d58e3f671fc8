"""Stripe's record read back after a database restore: every event Stripe sent since a moment,
oldest page last, through the same handler as the webhook (serve_app.webhooks_in.stripe_event).

A restore loses what the database learnt from Stripe after the backup: credits of payments,
refunds, disputes, subscription and invoice changes. Stripe keeps its events for 30 days, so the
runbook (docs/operations/restore.md) reads them back from the restore point on. Events the
restored database recorded already are skipped; the others apply exactly as a delivery would,
and every effect is idempotent (a payment credits once, by its `stripe:payment:<id>` key), so
reading back more than needed, or twice, changes nothing. The last page takes off the hold on
new auto-recharge charges (storage/holds.py) that a restore puts on.
"""

from __future__ import annotations

from datetime import datetime, timezone

from serve_app.context import Context
from serve_app.errors import ApiError
from serve_app.webhooks_in import seen_answer, stripe_event
from storage import holds

MAX_PAGE = 100
OUTCOMES = ("applied", "ignored", "dead_letter", "seen")


async def reconcile_page(ctx: Context, since_s: int, starting_after: str | None, limit: int,
                         started_at: float | None) -> dict:
    """One page of Stripe's events created at or after `since_s`, applied oldest first unless
    recorded already; pages come newest first. `next` names where the next page starts (None:
    done); `started_at` is when the read-back's first page began (this page's, for the first),
    handed back with every later page, so that a hold put on meanwhile is not taken off."""
    if started_at is None:
        async with (await ctx.db()).acquire() as conn:
            started_at = (await holds.now(conn)).timestamp()
    client = ctx.stripe.require()
    params: dict = {"created": {"gte": since_s}, "limit": limit}
    if starting_after:
        params["starting_after"] = starting_after
    page = await ctx.stripe.look_up("reconcile", "its events", client.v1.events.list, params=params)
    if page is None:
        raise ApiError(404, "not_found", f"Stripe has no event {starting_after}")
    counts = dict.fromkeys(OUTCOMES, 0)
    events = [event.to_dict() for event in page.data]
    for event in reversed(events):  # within a page, refunds after the credits they take back
        if await seen_answer(ctx, "stripe", event["id"]) is not None:
            counts["seen"] += 1
            continue
        _, result = await stripe_event(ctx, event)
        counts[result["outcome"]] += 1
    following = events[-1]["id"] if events and page.has_more else None
    answer = {"events": len(events), "outcomes": counts, "next": following, "started_at": started_at}
    if following is None:  # read back to `since`: charges the restore forgot are credited
        async with (await ctx.db()).acquire() as conn:
            released, needed = await holds.release(conn, holds.CHARGES, datetime.fromtimestamp(since_s, timezone.utc),
                                                   datetime.fromtimestamp(started_at, timezone.utc))
            answer["charges_held"] = await holds.held(conn, holds.CHARGES) is not None
        answer["charges_released"] = released
        answer["read_back_from"] = None if needed is None else int(needed.timestamp())
    return answer
