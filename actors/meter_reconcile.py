"""After a restore: what Stripe's meters already hold, recorded so that the roll-up does not bill
it again (docs/operations/restore.md).

A restore forgets the meter events sent after the restore point, but not the usage gateways
send again. The roll-up (storage/meter_events.roll_up) would then send that usage again; Stripe
drops a repeated identifier only within 24 hours. So for every org whose usage Stripe may
hold since the restore point, Stripe's hourly sums of the money meter are read back
(event summaries) and whatever they hold beyond the org's meter events is recorded as already
sent; the hour's unsent (pending, shadow) events are retired, since nothing tells which of them
Stripe has. The roll-up then sends only usage beyond what Stripe has, under identifiers of its
own. Reading back twice records nothing twice. Stripe's summaries lag its events by a few
minutes: read back once the service has run a few minutes after the restore.
"""

from __future__ import annotations

import asyncio
import logging

import stripe

from actors.clock import now_us
from actors.retry import US_PER_S
from storage import meter_events

log = logging.getLogger("metergate.jobs")

US_PER_HOUR = 3_600 * US_PER_S


class MeterReconcileFailed(Exception):
    """Stripe could not be read; nothing was recorded for the orgs not reached yet."""


class CustomerRefused(Exception):
    """Stripe refused to show one customer's meter (a 4xx other than 429)."""


async def reconcile_meters(client: stripe.StripeClient, pool, event_name: str, since_us: int) -> dict:
    """{"orgs", "hours", "recorded_micros", "skipped"}: the orgs read back, the hours in which
    Stripe held more than metergate's sent meter events, how much more in all, and the orgs whose
    customer Stripe refused to show (the caller keeps the hold on then)."""
    try:
        meter = await _meter_named(client, event_name)
    except CustomerRefused as exc:
        raise MeterReconcileFailed(f"Stripe refused to list its meters: {exc}") from None
    if meter is None:  # nothing was ever sent to this meter
        return {"orgs": 0, "hours": 0, "recorded_micros": 0, "meter": None}
    start_s = since_us // US_PER_HOUR * 3_600
    end_s = (now_us() // US_PER_HOUR + 1) * 3_600
    async with pool.acquire() as conn:
        orgs = await meter_events.billed_orgs_since(conn, since_us)
    hours = recorded = skipped = 0
    for org_id, customers in orgs:
        held: dict[int, int] = {}
        try:
            for customer in customers:  # what was sent to a customer the org had before counts too
                for hour, value in (await _stripe_hours(client, meter, customer, start_s, end_s)).items():
                    held[hour] = held.get(hour, 0) + value
        except CustomerRefused as exc:  # this org alone: the others go on, the hold stays (the caller)
            log.warning("meter read-back: org %s skipped: Stripe refused: %s", org_id, exc)
            skipped += 1
            continue
        async with pool.acquire() as conn:
            at_hand = await meter_events.hours_at_hand(conn, org_id, since_us)
            settle = {}
            for hour, value in held.items():
                known = at_hand.get(hour) or meter_events.HourAtHand()
                if value > known.sent:  # Stripe holds more than the sent events: some were lost
                    settle[hour] = (value - known.sent, known.unsent, known.carried)
            await meter_events.record_at_stripe(conn, org_id, settle, now_us())
        hours += len(settle)
        recorded += sum(value for value, _, _ in settle.values())
    return {"orgs": len(orgs), "hours": hours, "recorded_micros": recorded, "meter": meter, "skipped": skipped}


async def _meter_named(client: stripe.StripeClient, event_name: str) -> str | None:
    def find() -> str | None:
        for meter in client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter():
            if meter.event_name == event_name:
                return meter.id
        return None

    return await _read(find)


async def _stripe_hours(client: stripe.StripeClient, meter: str, customer: str, start_s: int,
                        end_s: int) -> dict[int, int]:
    """hour (µs) -> the customer's sum on the meter in that hour, as Stripe holds it."""
    def read() -> dict[int, int]:
        found: dict[int, int] = {}
        summaries = client.v1.billing.meters.event_summaries.list(meter, params={
            "customer": customer, "start_time": start_s, "end_time": end_s, "value_grouping_window": "hour",
            "limit": 100})
        for summary in summaries.auto_paging_iter():
            found[summary.start_time * US_PER_S] = int(round(summary.aggregated_value))
        return found

    return await _read(read)


async def _read(call):
    try:
        return await asyncio.to_thread(call)
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is not None and 400 <= status < 500 and status != 429:
            raise CustomerRefused(exc.user_message or str(exc)) from None
        raise MeterReconcileFailed(f"Stripe could not be read (retry): {exc.user_message or exc}") from None
