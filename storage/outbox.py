"""The outbox of outbound webhook events (the group commit appends; the scheduler delivers)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import msgspec

from storage.times import dt_to_us, us_to_dt


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    id: int
    org_id: str
    type: str
    data: dict
    created_us: int
    attempts: int
    status: str = "pending"
    last_error: str | None = None
    delivered_us: int | None = None
    message_id: str = ""  # what receivers dedupe on: random, so that no restore repeats it


def _event(row: asyncpg.Record) -> OutboundEvent:
    payload = row["payload"]
    return OutboundEvent(row["id"], row["org_id"], row["type"],
                         msgspec.json.decode(payload) if isinstance(payload, (str, bytes)) else payload,
                         dt_to_us(row["created_at"]), row["attempts"], row.get("status", "pending"),
                         row.get("last_error"),
                         dt_to_us(row["delivered_at"]) if row.get("delivered_at") is not None else None,
                         row.get("message_id") or f"msg_{row['id']}")  # events from before 0015: by id


async def by_status(conn: asyncpg.Connection, status: str, limit: int) -> list[OutboundEvent]:
    rows = await conn.fetch(
        "SELECT id, org_id, type, payload, created_at, status, attempts, last_error, delivered_at, message_id"
        " FROM outbox WHERE status = $1 ORDER BY id DESC LIMIT $2", status, limit)
    return [_event(r) for r in rows]


async def retry_dead(conn: asyncpg.Connection, message_id: str) -> str | None:
    """A dead event back to pending, due now. Returns its status before: 'dead' when it moved,
    another status when it did not, None when there is no such event."""
    moved = await conn.fetchval(
        "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = '-infinity'"
        " WHERE COALESCE(message_id, 'msg_' || id) = $1 AND status = 'dead' RETURNING id", message_id)
    if moved is not None:
        return "dead"
    return await conn.fetchval("SELECT status FROM outbox WHERE COALESCE(message_id, 'msg_' || id) = $1", message_id)


async def due(conn: asyncpg.Connection, now_us: int, limit: int) -> list[OutboundEvent]:
    rows = await conn.fetch(
        "SELECT id, org_id, type, payload, created_at, attempts, message_id FROM outbox"
        " WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2", us_to_dt(now_us), limit)
    return [_event(r) for r in rows]


async def mark(conn: asyncpg.Connection, marks: list[tuple[int, str, int, str | None, int]]) -> None:
    """One statement for a run: (id, status, attempts, last error, next attempt or delivery µs)."""
    if not marks:
        return
    ids, statuses, attempts, errors, times = (list(column) for column in zip(*marks))
    await conn.execute(
        "UPDATE outbox o SET status = m.status, attempts = m.attempts, last_error = m.error,"
        " next_attempt_at = m.retry_at,"
        " delivered_at = CASE WHEN m.status = 'delivered' THEN m.retry_at ELSE o.delivered_at END"
        " FROM unnest($1::int8[], $2::text[], $3::int[], $4::text[], $5::timestamptz[])"
        " AS m(id, status, attempts, error, retry_at) WHERE o.id = m.id",
        ids, statuses, attempts, errors, [us_to_dt(t) for t in times])


async def waiting_and_dead(conn: asyncpg.Connection) -> tuple[int, int]:
    """(events waiting to be delivered, dead letters): the outbox's gauges, each counted
    through its own partial index (outbox_due, outbox_finished), never the delivered rows."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending') AS pending,"
        " (SELECT count(*) FROM outbox WHERE status = 'dead') AS dead")
    return row["pending"], row["dead"]
