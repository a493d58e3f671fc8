"""Stripe meter events: postpaid usage per org, meter and closed hour, and their delivery state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from storage.times import dt_to_us, us_to_dt

# The one meter: a postpaid org's usage that neither its quota nor its credit covered, in µUSD
# (billing-rules 6.5). Quantities are never sent: Stripe would bill again what credit paid.
MONEY_METER = "usage_micros"
# The meter job's advisory lock (actors/jobs.py): held while it rolls up and sends. An undo of
# a cutover takes it too (storage/enforcement.py), so no event is sent while it checks.
METER_LOCK = 7_310_103
# An org's hour as the meter may bill it (billing-rules 2.12, storage/enforcement.py): an org in
# shadow keeps its events 'shadow'; one cut over has its hours before the cutover consumed.
_ORG_SHADOW = "EXISTS (SELECT 1 FROM org_enforcement e WHERE e.org_id = {o} AND e.shadow)"
_BEFORE_CUTOVER = "{h} < (SELECT e.cutover FROM org_enforcement e WHERE e.org_id = {o})"


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    org_id: str
    meter: str
    hour_us: int
    value: int
    attempts: int
    customer_id: str | None


async def roll_up(conn: asyncpg.Connection, closed_before_us: int, since_us: int, bill_from: datetime | None,
                  status: str) -> int:
    """New events for closed hours since `since_us`; returns how many.

    Each (org, hour) bucket of invoiced usage (the ledger's usage rows) is compared with what
    meter events already carry: usage that lands late becomes one more event with the
    difference, numbered after the ones before it, so its identifier is fixed too. Hours before
    `bill_from` are 'consumed' (never billed), and so are an org's hours before its cutover; an
    org in shadow's are 'shadow' (storage/enforcement.py); the others get `status`.
    """
    return await conn.fetchval(
        "WITH hours AS (SELECT l.org_id AS o, date_trunc('hour', l.usage_minute) AS h,"
        " sum(l.invoiced_micros)::int8 AS v FROM ledger l"
        " WHERE l.invoiced_micros > 0 AND l.usage_minute < date_trunc('hour', $1::timestamptz)"
        " AND l.usage_minute >= greatest($4::timestamptz, (SELECT hour FROM meter_money_from)) GROUP BY 1, 2),"
        " known AS (SELECT org_id AS o, hour AS h, sum(value)::int8 AS v, count(*) AS n"
        " FROM meter_events WHERE meter = $5 AND hour >= date_trunc('hour', $4::timestamptz) GROUP BY 1, 2),"
        " ins AS (INSERT INTO meter_events (identifier, org_id, meter, hour, value, status)"
        " SELECT 'mg_' || md5(b.o || '|' || $5 || '|' || extract(epoch FROM b.h)::bigint"
        " || '|' || coalesce(k.n, 0)), b.o, $5, b.h, b.v - coalesce(k.v, 0),"
        " CASE WHEN $2::timestamptz IS NOT NULL AND b.h < $2 THEN 'consumed'"
        f" WHEN {_ORG_SHADOW.format(o='b.o')} THEN 'shadow' WHEN {_BEFORE_CUTOVER.format(h='b.h', o='b.o')}"
        " THEN 'consumed' ELSE $3 END"
        " FROM hours b LEFT JOIN known k ON k.o = b.o AND k.h = b.h"
        " WHERE b.v > coalesce(k.v, 0) ON CONFLICT (identifier) DO NOTHING RETURNING 1)"
        " SELECT count(*) FROM ins", us_to_dt(closed_before_us), bill_from, status, us_to_dt(since_us), MONEY_METER)


async def release_shadow(conn: asyncpg.Connection, bill_from: datetime | None) -> int:
    """Shadow turned off: what shadow mode computed is billed from `bill_from` on, and from its
    cutover on for an org cut over; an org in shadow keeps its events (billing-rules 2.12)."""
    status = await conn.execute(
        "UPDATE meter_events m SET status = CASE WHEN $1::timestamptz IS NOT NULL AND m.hour < $1 THEN 'consumed'"
        f" WHEN {_BEFORE_CUTOVER.format(h='m.hour', o='m.org_id')} THEN 'consumed' ELSE 'pending' END"
        f" WHERE m.status = 'shadow' AND NOT {_ORG_SHADOW.format(o='m.org_id')}", bill_from)
    return int(status.split()[-1])


async def due(conn: asyncpg.Connection, now_us: int, limit: int) -> list[MeterEvent]:
    rows = await conn.fetch(
        "SELECT m.identifier, m.org_id, m.meter, m.hour, m.value, m.attempts, c.customer_id FROM meter_events m"
        " LEFT JOIN stripe_customers c USING (org_id) WHERE m.status = 'pending' AND m.next_attempt_at <= $1"
        " ORDER BY m.hour LIMIT $2", us_to_dt(now_us), limit)
    return [MeterEvent(r["identifier"], r["org_id"], r["meter"], dt_to_us(r["hour"]), r["value"], r["attempts"],
                       r["customer_id"]) for r in rows]


async def mark_sent(conn: asyncpg.Connection, identifier: str, now_us: int) -> None:
    await conn.execute("UPDATE meter_events SET status = 'sent', attempts = attempts + 1, sent_at = $2,"
                       " last_error = NULL WHERE identifier = $1", identifier, us_to_dt(now_us))


async def mark_failed(conn: asyncpg.Connection, identifier: str, error: str, status: str, retry_at_us: int) -> None:
    await conn.execute("UPDATE meter_events SET status = $4, attempts = attempts + 1, last_error = $2,"
                       " next_attempt_at = $3 WHERE identifier = $1", identifier, error, us_to_dt(retry_at_us),
                       status)


# ----- after a restore: what Stripe already has -----------------------------------------------

async def billed_orgs_since(conn: asyncpg.Connection, since_us: int) -> list[tuple[str, list[str]]]:
    """(org, every Stripe customer it has had) of each org whose usage Stripe's meter may hold
    from the hour of `since_us` on: every postpaid org with a customer (its usage after the
    restore point may be at Stripe alone), and any other with invoiced usage or meter events
    since. A customer replaced since still holds what was sent to it."""
    rows = await conn.fetch(
        "WITH u AS (SELECT org_id FROM orgs WHERE billing_mode = 'postpaid'"
        " UNION SELECT org_id FROM ledger WHERE invoiced_micros > 0 AND usage_minute >= date_trunc('hour', $1::timestamptz)"
        " UNION SELECT org_id FROM meter_events WHERE hour >= date_trunc('hour', $1::timestamptz)),"
        " c AS (SELECT org_id, customer_id FROM stripe_customers"
        " UNION SELECT org_id, customer_id FROM stripe_customers_forgotten)"
        " SELECT u.org_id, array_agg(DISTINCT c.customer_id ORDER BY c.customer_id) AS customers"
        " FROM u JOIN c USING (org_id) GROUP BY u.org_id ORDER BY u.org_id", us_to_dt(since_us))
    return [(r["org_id"], list(r["customers"])) for r in rows]


@dataclass(slots=True)
class HourAtHand:
    """An hour of an org's money meter as the database has it."""
    sent: int = 0  # what its sent events carry: at Stripe
    carried: int = 0  # what all its events carry (the roll-up's count)
    unsent: list[str] = field(default_factory=list)  # pending and shadow events: may go to Stripe yet


async def hours_at_hand(conn: asyncpg.Connection, org_id: str, since_us: int) -> dict[int, HourAtHand]:
    """hour (µs) -> the org's money-meter events of that hour, from the hour of `since_us` on."""
    rows = await conn.fetch(
        "SELECT hour, identifier, value, status FROM meter_events WHERE org_id = $1 AND meter = $2"
        " AND hour >= date_trunc('hour', $3::timestamptz)", org_id, MONEY_METER, us_to_dt(since_us))
    found: dict[int, HourAtHand] = {}
    for r in rows:
        hour = found.setdefault(dt_to_us(r["hour"]), HourAtHand())
        hour.carried += r["value"]
        if r["status"] == "sent":
            hour.sent += r["value"]
        elif r["status"] in ("pending", "shadow"):
            hour.unsent.append(r["identifier"])
    return found


async def oldest_shadow_hour(conn: asyncpg.Connection) -> datetime | None:
    """The oldest hour with a shadow event that turning shadow off sends (not an org's in shadow)."""
    return await conn.fetchval(f"SELECT min(m.hour) FROM meter_events m WHERE m.status = 'shadow'"
                               f" AND NOT {_ORG_SHADOW.format(o='m.org_id')}")


async def record_at_stripe(conn: asyncpg.Connection, org_id: str, hours: dict[int, tuple[int, list[str], int]],
                           now_us: int) -> int:
    """Per hour (µs -> (what Stripe holds beyond the sent events, the hour's unsent events, what
    the hour's events carry)): its unsent events are retired (value 0, `consumed`: never sent, since
    nothing tells which of them Stripe has), and what Stripe holds beyond the sent events is one
    event already sent. The roll-up then sends only usage beyond what Stripe holds, under
    identifiers of its own. The identifier names the hour's events before it, so a rerun that
    finds still more at Stripe records that too, and one that finds nothing new records nothing."""
    retired = [identifier for _, unsent, _ in hours.values() for identifier in unsent]
    if retired:
        await conn.execute(
            "UPDATE meter_events SET status = 'consumed', value = 0, next_attempt_at = '-infinity',"
            " last_error = 'retired by the read-back of Stripe after a restore' WHERE identifier = ANY($1::text[])"
            " AND status IN ('pending', 'shadow')", retired)
    beyond = {hour: (value, carried) for hour, (value, _, carried) in hours.items() if value > 0}
    if not beyond:
        return 0
    status = await conn.execute(
        "INSERT INTO meter_events (identifier, org_id, meter, hour, value, status, sent_at)"
        " SELECT 'mg_at_stripe_' || md5($1 || '|' || $2 || '|' || extract(epoch FROM h)::bigint || '|' || c"
        " || '|' || v), $1, $2, h, v, 'sent', $6"
        " FROM unnest($3::timestamptz[], $4::int8[], $5::int8[]) AS x(h, v, c) ON CONFLICT (identifier) DO NOTHING",
        org_id, MONEY_METER, [us_to_dt(h) for h in beyond], [v for v, _ in beyond.values()],
        [c for _, c in beyond.values()], us_to_dt(now_us))
    return int(status.split()[-1])
