"""Organizations as rows: existence and contact details (their state lives in the journal)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from storage.times import dt_to_us, us_to_dt


async def exists(conn: asyncpg.Connection, org_id: str) -> bool:
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM orgs WHERE org_id = $1)", org_id)


@dataclass(frozen=True, slots=True)
class OrgRow:
    org_id: str
    email: str
    billing_mode: str
    slot: int
    created_us: int


async def page(conn: asyncpg.Connection, after: str | None, limit: int) -> list[OrgRow]:
    """Orgs in org_id order, those after `after` (None: from the first); up to `limit` of them.
    Every org id is at least one character long, so '' stands for "from the first" and the
    primary key's index serves the range."""
    rows = await conn.fetch(
        "SELECT org_id, email, billing_mode, slot, created_at FROM orgs"
        " WHERE org_id > $1 ORDER BY org_id LIMIT $2", after or "", limit)
    return [OrgRow(r["org_id"], r["email"], r["billing_mode"], r["slot"], dt_to_us(r["created_at"])) for r in rows]


async def ids_in_slots(conn: asyncpg.Connection, slots: list[int], after: str | None, limit: int,
                       prefix: str = "") -> list[str]:
    """The ids of the orgs in these slots (one shard's), in org_id order, after `after`, that
    begin with `prefix`."""
    rows = await conn.fetch("SELECT org_id FROM orgs WHERE slot = ANY($1::int[]) AND org_id > $2"
                            " AND org_id >= $4 AND starts_with(org_id, $4)"
                            " ORDER BY org_id LIMIT $3", slots, after or "", limit, prefix)
    return [r["org_id"] for r in rows]


async def tokens_valid_after(conn: asyncpg.Connection, org_id: str) -> int | None:
    """µs: org tokens issued before it are revoked (None: none was ever revoked)."""
    at = await conn.fetchval("SELECT tokens_valid_after FROM orgs WHERE org_id = $1", org_id)
    return dt_to_us(at) if at is not None else None


async def revoke_tokens(conn: asyncpg.Connection, org_id: str, at_us: int) -> bool:
    """Void every token of the org issued before at_us (whole seconds: tokens carry seconds);
    False if there is no such org. Never moves back: a later revoke from a replica whose clock
    is behind does not bring back tokens an earlier one voided."""
    status = await conn.execute(
        "UPDATE orgs SET tokens_valid_after = GREATEST(tokens_valid_after, $2) WHERE org_id = $1",
        org_id, us_to_dt(at_us))
    return status.endswith(" 1")
