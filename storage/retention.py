"""Retention: what the scheduler deletes once nothing reads it any more, and the ledger's
usage rows folded per hour (docs/operations/retention.md says why each limit is safe).

Every delete takes at most `limit` rows (of each kind) in one statement (a short transaction of its own),
found through an index by age, so a run costs the same however large the backlog.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import asyncpg

HOUR = timedelta(hours=1)


def _count(status: str) -> int:
    return int(status.split()[-1])


async def delete_finished_outbox(conn: asyncpg.Connection, delivered_before: datetime, dead_before: datetime,
                                 limit: int) -> int:
    """Delivered events finished before `delivered_before`, dead letters given up before
    `dead_before` (next_attempt_at holds the time of an event's last outcome). A pending event
    is never deleted, however old: it has not reached its receivers."""
    return _count(await conn.execute(
        "DELETE FROM outbox WHERE id = ANY(ARRAY("
        " (SELECT id FROM outbox WHERE status = 'delivered' AND next_attempt_at < $1 LIMIT $3)"
        " UNION ALL (SELECT id FROM outbox WHERE status = 'dead' AND next_attempt_at < $2 LIMIT $3)))"
        " AND status IN ('delivered', 'dead')", delivered_before, dead_before, limit))


async def delete_idempotency_answers(conn: asyncpg.Connection, before: datetime, limit: int) -> int:
    """Idempotency-Key records (claims and first answers) made before `before`. A claim taken
    over as abandoned moves its created_at to then, so a live one is never old."""
    return _count(await conn.execute(
        "DELETE FROM http_idempotency WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM http_idempotency WHERE created_at < $1 LIMIT $2)) AND created_at < $1", before, limit))


async def delete_inbound_webhooks(conn: asyncpg.Connection, before: datetime, limit: int) -> int:
    """Inbound webhook ids (and their first answers and outcomes) received before `before`."""
    return _count(await conn.execute(
        "DELETE FROM inbound_webhooks WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM inbound_webhooks WHERE received_at < $1 LIMIT $2)) AND received_at < $1",
        before, limit))


# Meter events whose fate is settled: sent to Stripe, consumed (before BILL_FROM), or computed
# in shadow mode. Pending ones are still to be sent; dead ones wait for an operator.
SETTLED_METER_STATUSES = ("sent", "consumed", "shadow")


async def delete_settled_meter_events(conn: asyncpg.Connection, hour_before: datetime, limit: int) -> int:
    """Settled meter events of hours before `hour_before`. The caller keeps every hour the
    meter roll-up still compares with (it would make a deleted hour's events again)."""
    return _count(await conn.execute(
        "DELETE FROM meter_events WHERE identifier = ANY(ARRAY("
        " SELECT identifier FROM meter_events WHERE hour < $1 AND status = ANY($2::text[]) LIMIT $3))"
        " AND status = ANY($2::text[])", hour_before, list(SETTLED_METER_STATUSES), limit))


async def fold_next_hour(conn: asyncpg.Connection, before: datetime) -> tuple[datetime, int, int] | None:
    """Fold the usage rows of the oldest hour not folded yet, if it ends by `before`: returns
    (that hour, rows deleted, rows that now hold a sum), or None when no such hour is left.

    An org's usage rows of one hour become one row per run of them that no other entry of the
    org interrupts (ordered as the ledger's readers order it: created_at, entry_id): the first
    row of the run keeps its entry id, minute and created_at, and takes the sums of
    amount_micros and invoiced_micros; the others are deleted, in the same statement. So each
    org's SUM(amount_micros) is unchanged, the meter roll-up's per-hour sums are unchanged (the
    row stays in its hour), and the monthly accounting, which applies a run of usage entries
    as one, gives the same months.

    The watermark row (locked FOR UPDATE in this short transaction) records the hour reached,
    so no run reads an hour twice, and two folders never fold the same hour at once. Only the
    shard writes usage rows, and only for the minute of its own clock: an hour that ended days
    ago is never written again.
    """
    return await _fold_next(conn, before, "ledger_fold", "ledger", "usage_minute", _FOLD_HOUR)


# $1, $2: the hour's bounds. A run (org, run) is numbered by how many other entries of the org
# come before the row within the hour; usage rows of an hour are created within it (created_at
# is the first debit of the row's minute, and usage_minute that minute).
_FOLD_HOUR = """
WITH usage_rows AS (
    SELECT entry_id, org_id, amount_micros, invoiced_micros, created_at, true AS is_usage
    FROM ledger WHERE usage_minute >= $1 AND usage_minute < $2
), others AS (
    SELECT e.entry_id, e.org_id, 0::int8, 0::int8, e.created_at, false
    FROM (SELECT DISTINCT org_id FROM usage_rows) o
    JOIN ledger e ON e.org_id = o.org_id AND e.created_at >= $1 AND e.created_at < $2 AND e.usage_minute IS NULL
), numbered AS (
    SELECT *, count(*) FILTER (WHERE NOT is_usage) OVER (PARTITION BY org_id ORDER BY created_at, entry_id) AS run
    FROM (SELECT * FROM usage_rows UNION ALL SELECT * FROM others) AS entries
), runs AS (
    SELECT entry_id,
           row_number() OVER (PARTITION BY org_id, run ORDER BY created_at, entry_id) AS n,
           count(*) OVER (PARTITION BY org_id, run) AS rows_in_run,
           sum(amount_micros) OVER (PARTITION BY org_id, run)::int8 AS amount_micros,
           sum(invoiced_micros) OVER (PARTITION BY org_id, run)::int8 AS invoiced_micros
    FROM numbered WHERE is_usage
), deleted AS (
    DELETE FROM ledger l USING runs r WHERE l.entry_id = r.entry_id AND r.n > 1 RETURNING 1
), folded AS (
    UPDATE ledger l SET amount_micros = r.amount_micros, invoiced_micros = r.invoiced_micros
    FROM runs r WHERE l.entry_id = r.entry_id AND r.n = 1 AND r.rows_in_run > 1 RETURNING 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM folded) AS folded
"""


# ----- usage detail: usage_rollups per minute become one row per (org, lease, hour) -------------


def hour_of(at: datetime) -> datetime:
    """The UTC hour `at` falls in (in Python: date_trunc would follow the session's time zone)."""
    return at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


async def fold_next_rollup_hour(conn: asyncpg.Connection, before: datetime) -> tuple[datetime, int, int] | None:
    """Fold the usage_rollups rows of the oldest hour not folded yet, if it ends by `before`:
    returns (that hour, rows deleted, rows made or added to at the hour's start), or None when no
    such hour is left.

    The rows past the hour's first minute are deleted and, per (org, lease), their sums
    (memory_mb_ms, cpu_ms, disk_mb_ms, ticks, cost_scaled, duration_ms; units merged with
    mg_units_add) added to the row at the hour's start (made if absent), in one statement, as
    the shard's upsert adds a commit's usage. A row already at the hour's start stays. So
    every sum over a window that starts and ends on whole hours (per org, lease, day, month,
    the billing page's 30 days, the months' lease time) is unchanged; a window bound inside a
    folded hour counts the whole hour at its start.

    The watermark row (locked FOR UPDATE in this short transaction) records the hour reached,
    so no run reads an hour twice and two folders never fold the same hour at once. The shard
    writes rollups only for minutes within the tick age window (a day or so, and the setting is
    kept well behind it); should one land in an hour being folded anyway, the fold adds to its
    row (ON CONFLICT), and a row the statement did not see stays as minute detail: no sum is
    lost either way.
    """
    return await _fold_next(conn, before, "usage_rollup_fold", "usage_rollups", "minute", _FOLD_ROLLUP_HOUR)


async def _fold_next(conn: asyncpg.Connection, before: datetime, watermark: str, table: str, column: str,
                     statement: str) -> tuple[datetime, int, int] | None:
    """One fold of the hour the watermark table names (the oldest hour of `table`'s `column` on
    the first run), if it ends by `before`: `statement` ($1, $2: the hour's bounds) returns
    (deleted, folded). The watermark row, locked FOR UPDATE in this short transaction, then names
    the next hour with rows. Hours are UTC hours, whatever the session's time zone."""
    async with conn.transaction():
        hour = await conn.fetchval(f"SELECT next_hour FROM {watermark} FOR UPDATE")
        if hour is None:  # first run: start at the oldest row
            oldest = await conn.fetchval(f"SELECT min({column}) FROM {table}")
            if oldest is None:
                return None
            hour = hour_of(oldest)
        if hour + HOUR > before:
            return None
        row = await conn.fetchrow(statement, hour, hour + HOUR)
        following = await conn.fetchval(f"SELECT min({column}) FROM {table} WHERE {column} >= $1", hour + HOUR)
        await conn.execute(f"UPDATE {watermark} SET next_hour = $1",
                           hour_of(following) if following is not None else hour + HOUR)
        return hour, row["deleted"], row["folded"]


# $1, $2: the hour's bounds. The rows past the hour's first minute are deleted and their sums
# per (org, lease) added to the row at the hour's start (made if absent): the insert reads the
# deleted rows whole (through the aggregate) before it writes.
_FOLD_ROLLUP_HOUR = """
WITH later AS (
    DELETE FROM usage_rollups WHERE minute > $1 AND minute < $2 RETURNING *
), written AS (
    INSERT INTO usage_rollups (org_id, minute, lease_id, memory_mb_ms, cpu_ms, disk_mb_ms, ticks, cost_scaled,
                               units, duration_ms)
    SELECT org_id, $1, lease_id, sum(memory_mb_ms), sum(cpu_ms), sum(disk_mb_ms), sum(ticks), sum(cost_scaled),
           mg_units_sum(units ORDER BY minute), sum(duration_ms)
    FROM later GROUP BY org_id, lease_id
    ON CONFLICT (org_id, minute, lease_id) DO UPDATE SET
        memory_mb_ms = usage_rollups.memory_mb_ms + EXCLUDED.memory_mb_ms,
        cpu_ms = usage_rollups.cpu_ms + EXCLUDED.cpu_ms,
        disk_mb_ms = usage_rollups.disk_mb_ms + EXCLUDED.disk_mb_ms,
        ticks = usage_rollups.ticks + EXCLUDED.ticks,
        cost_scaled = usage_rollups.cost_scaled + EXCLUDED.cost_scaled,
        units = mg_units_add(usage_rollups.units, EXCLUDED.units),
        duration_ms = usage_rollups.duration_ms + EXCLUDED.duration_ms
    RETURNING 1
)
SELECT (SELECT count(*) FROM later) AS deleted, (SELECT count(*) FROM written) AS folded
"""
