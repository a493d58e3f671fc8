"""Enforcement per org as the Stripe meter sees it (billing-rules 2.12; migration 0019).

The org's shard decides whether it is in shadow; this row tells the meter roll-up
(storage/meter_events.py) which of the org's hours may be sent to Stripe:
- `shadow`: none (its events are kept as 'shadow');
- a cutover at T: the hours before T never ('consumed'), those from T on as any org's;
- no row: every hour (an org never in shadow).
The edge writes the row around the org's command so that a crash between the two leaves
events withheld, never sent wrongly: going to shadow, the row first; a cutover, after the
command, from the state the shard answered (serve_app/routes/orgs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from storage.meter_events import METER_LOCK
from storage.times import dt_to_us, optional_dt

# How long an undo waits for a meter run under way (it may be sending to Stripe) to end.
UNDO_LOCK_TIMEOUT_S = 20


@dataclass(frozen=True, slots=True)
class Row:
    shadow: bool
    cutover_us: int | None


class Charged(Exception):
    """An undo found a meter event of an hour from the cutover on sent, or tried (it may be at
    Stripe): the org cannot go back to shadow."""


class MeterBusy(Exception):
    """The meter job held its lock past UNDO_LOCK_TIMEOUT_S."""


def row_of(enforcement: str, cutover_us: int | None) -> Row:
    """The row that matches an org's state (OrgState.enforcement, OrgState.cutover_us)."""
    if cutover_us is not None:
        return Row(False, cutover_us)
    return Row(enforcement == "shadow", None)


async def get(conn: asyncpg.Connection, org_id: str) -> Row | None:
    r = await conn.fetchrow("SELECT shadow, cutover FROM org_enforcement WHERE org_id = $1", org_id)
    return None if r is None else Row(r["shadow"], None if r["cutover"] is None else dt_to_us(r["cutover"]))


async def write(conn: asyncpg.Connection, org_id: str, row: Row | None) -> None:
    """Set the org's row (None, or enforced with no cutover: no row)."""
    if row is None or (not row.shadow and row.cutover_us is None):
        await conn.execute("DELETE FROM org_enforcement WHERE org_id = $1", org_id)
        return
    await conn.execute(
        "INSERT INTO org_enforcement (org_id, shadow, cutover) VALUES ($1, $2, $3) ON CONFLICT (org_id)"
        " DO UPDATE SET shadow = excluded.shadow, cutover = excluded.cutover, updated_at = now()"
        " WHERE (org_enforcement.shadow, org_enforcement.cutover) IS DISTINCT FROM (excluded.shadow, excluded.cutover)",
        org_id, row.shadow, optional_dt(row.cutover_us))
    if not row.shadow:
        # A cutover moved earlier (one set ahead consumed the hours before it): the org's hours
        # from the new cutover on that were consumed unsent are its to bill again, as shadow
        # events the meter job releases (billing-rules 2.12; a retired event has no value).
        await conn.execute(
            "UPDATE meter_events SET status = 'shadow' WHERE org_id = $1 AND status = 'consumed' AND value > 0"
            " AND sent_at IS NULL AND hour >= $2", org_id, optional_dt(row.cutover_us))


async def write_many(conn: asyncpg.Connection, rows: dict[str, Row | None]) -> None:
    """write() of each org's row, in two statements (an import's chunk)."""
    gone = [o for o, r in rows.items() if r is None or (not r.shadow and r.cutover_us is None)]
    kept = [(o, r) for o, r in rows.items() if not (r is None or (not r.shadow and r.cutover_us is None))]
    if gone:
        await conn.execute("DELETE FROM org_enforcement WHERE org_id = ANY($1::text[])", gone)
    if kept:
        await conn.execute(
            "INSERT INTO org_enforcement (org_id, shadow, cutover)"
            " SELECT * FROM unnest($1::text[], $2::bool[], $3::timestamptz[]) ON CONFLICT (org_id)"
            " DO UPDATE SET shadow = excluded.shadow, cutover = excluded.cutover, updated_at = now()"
            " WHERE (org_enforcement.shadow, org_enforcement.cutover) IS DISTINCT FROM (excluded.shadow, excluded.cutover)",
            [o for o, _ in kept], [r.shadow for _, r in kept], [optional_dt(r.cutover_us) for _, r in kept])


async def shadow_new_orgs(conn: asyncpg.Connection, org_ids: list[str]) -> list[str]:
    """Before creating orgs in shadow: a shadow row for each that is not an org yet and has no
    row (an org that exists keeps its own enforcement); the ids given one."""
    rows = await conn.fetch(
        "INSERT INTO org_enforcement (org_id, shadow) SELECT o, true FROM unnest($1::text[]) AS o"
        " WHERE NOT EXISTS (SELECT 1 FROM orgs WHERE orgs.org_id = o) ON CONFLICT (org_id) DO NOTHING"
        " RETURNING org_id", org_ids)
    return [r["org_id"] for r in rows]


async def begin_undo(conn: asyncpg.Connection, org_id: str, cutover_us: int) -> list[str]:
    """An undo of the cutover at `cutover_us`, before the org's command: atomically against the
    meter sender (its job's lock: while it is held, no event is being sent), refuse (Charged)
    if an event of the org for an hour from the cutover on was sent or tried, else move the
    pending ones back to 'shadow' and set the row to shadow. Returns the events moved (to put
    back if the org refuses the undo)."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{UNDO_LOCK_TIMEOUT_S}s'")
        try:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", METER_LOCK)
        except asyncpg.LockNotAvailableError:
            raise MeterBusy(f"the Stripe meter job is running (waited {UNDO_LOCK_TIMEOUT_S} s)") from None
        at = optional_dt(cutover_us)
        sent = await conn.fetchval(
            "SELECT count(*) FROM meter_events WHERE org_id = $1 AND hour >= $2"
            " AND (status IN ('sent', 'dead') OR attempts > 0)", org_id, at)
        if sent:
            raise Charged(f"{sent} Stripe meter event(s) of this org for hours from its cutover on were sent "
                          "(or tried): it cannot go back to shadow")
        moved = await conn.fetch(
            "UPDATE meter_events SET status = 'shadow' WHERE org_id = $1 AND hour >= $2 AND status = 'pending'"
            " RETURNING identifier", org_id, at)
        await write(conn, org_id, Row(True, None))
    return [r["identifier"] for r in moved]


async def revert_undo(conn: asyncpg.Connection, org_id: str, row: Row | None, moved: list[str]) -> None:
    """The org refused the undo begin_undo prepared: its row written as given (the edge passes
    the row of the org's state now, which a retried undo may not have had before it), and the
    events it moved back to pending."""
    async with conn.transaction():
        await write(conn, org_id, row)
        if moved:
            await conn.execute("UPDATE meter_events SET status = 'pending' WHERE identifier = ANY($1::text[])"
                               " AND status = 'shadow'", moved)


async def forget(conn: asyncpg.Connection, org_ids: list[str]) -> None:
    """No row for these orgs (enforced, never cut over)."""
    if org_ids:
        await conn.execute("DELETE FROM org_enforcement WHERE org_id = ANY($1::text[])", org_ids)
