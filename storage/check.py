"""The reads of `metergate check`: orgs a page at a time (keyset by org_id), and the few
global tables. Read-only; the caller holds each page's reads in one repeatable-read
transaction, so an org's snapshot, journal and ledger are of one instant even while shards
commit. The comparisons are actors/check.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from storage.times import dt_to_us, us_to_dt


@dataclass(frozen=True, slots=True)
class OrgRow:
    org_id: str
    slot: int
    billing_mode: str
    snapshot_seq: int | None
    state: bytes | None


@dataclass(frozen=True, slots=True)
class LedgerSums:
    balance_micros: int
    newest_grant_no: int
    future_usage_rows: int
    newest_usage_us: int | None


async def is_migrated(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")


async def now_and_org_count(conn: asyncpg.Connection) -> tuple[int, int]:
    """The database's clock (µs) and how many orgs there are (for the progress shown)."""
    row = await conn.fetchrow("SELECT clock_timestamp() AS now, (SELECT count(*) FROM orgs) AS orgs")
    return dt_to_us(row["now"]), row["orgs"]


async def org_page(conn: asyncpg.Connection, after: str | None, limit: int) -> list[OrgRow]:
    """The next `limit` orgs after org id `after` (None: from the first), with their snapshots."""
    # Two statements, not `$1 IS NULL OR ...`: a generic plan of that reads every org before the
    # cursor, so the whole check would be quadratic in the number of orgs.
    select = ("SELECT o.org_id, o.slot, o.billing_mode, s.seq, s.state FROM orgs o"
              " LEFT JOIN org_snapshots s USING (org_id)")
    rows = await (conn.fetch(f"{select} ORDER BY o.org_id LIMIT $1", limit) if after is None else
                  conn.fetch(f"{select} WHERE o.org_id > $1 ORDER BY o.org_id LIMIT $2", after, limit))
    return [OrgRow(r["org_id"], r["slot"], r["billing_mode"], r["seq"], r["state"]) for r in rows]


async def journal_tails(conn: asyncpg.Connection, org_ids: list[str]) -> dict[str, list[tuple[int, bytes]]]:
    """org id -> (seq, entry) of the journal after its snapshot, in seq order."""
    rows = await conn.fetch(  # each org's tail by its own key range, as storage/journal.load_orgs reads it
        "SELECT j.org_id, j.seq, j.entry FROM org_snapshots s JOIN LATERAL (SELECT org_id, seq, entry"
        " FROM org_journal WHERE org_journal.org_id = s.org_id AND org_journal.seq > s.seq) AS j ON true"
        " WHERE s.org_id = ANY($1::text[]) ORDER BY j.org_id, j.seq", org_ids)
    tails: dict[str, list[tuple[int, bytes]]] = {}
    for r in rows:
        tails.setdefault(r["org_id"], []).append((r["seq"], r["entry"]))
    return tails


async def ledger_sums(conn: asyncpg.Connection, org_ids: list[str], future_after_us: int) -> dict[str, LedgerSums]:
    """Per org with ledger rows: SUM(amount_micros), the highest n of the gr_<n> its rows
    name, and its usage rows later than `future_after_us` (their count and the newest)."""
    rows = await conn.fetch(
        "SELECT org_id, sum(amount_micros)::int8 AS balance,"
        " coalesce(max(substr(grant_id, 4)::int8) FILTER (WHERE grant_id ~ '^gr_[0-9]{1,18}$'), 0) AS grant_no,"
        " count(*) FILTER (WHERE kind = 'usage' AND (usage_minute > $2 OR created_at > $2)) AS future,"
        " max(greatest(usage_minute, created_at)) FILTER (WHERE kind = 'usage') AS newest_usage"
        " FROM ledger WHERE org_id = ANY($1::text[]) GROUP BY org_id", org_ids, us_to_dt(future_after_us))
    return {r["org_id"]: LedgerSums(r["balance"], r["grant_no"], r["future"],
                                    dt_to_us(r["newest_usage"]) if r["newest_usage"] is not None else None)
            for r in rows}


async def grant_entries(conn: asyncpg.Connection,
                        grants: list[tuple[str, str]]) -> dict[str, list[tuple[str, str, int, int | None]]]:
    """The ledger rows naming the (org id, grant id) pairs given: org id -> (grant id, kind,
    amount_micros, expires µs)."""
    if not grants:
        return {}
    rows = await conn.fetch(
        "SELECT l.org_id, l.grant_id, l.kind, l.amount_micros, l.expires_at FROM ledger l"
        " WHERE l.org_id = ANY($1::text[]) AND l.grant_id IS NOT NULL"
        " AND (l.org_id, l.grant_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [g[0] for g in grants], [g[1] for g in grants])
    found: dict[str, list[tuple[str, str, int, int | None]]] = {}
    for r in rows:
        found.setdefault(r["org_id"], []).append(
            (r["grant_id"], r["kind"], r["amount_micros"], _optional_us(r["expires_at"])))
    return found


async def payments_credited_twice(conn: asyncpg.Connection, limit: int) -> list[tuple[str, list[str]]]:
    """`stripe:payment:*` idempotency keys that the ledgers of several orgs hold: (key, orgs)."""
    rows = await conn.fetch(
        "SELECT idempotency_key, array_agg(DISTINCT org_id ORDER BY org_id) AS orgs FROM ledger"
        " WHERE idempotency_key LIKE 'stripe:payment:%' GROUP BY idempotency_key"
        " HAVING count(DISTINCT org_id) > 1 ORDER BY idempotency_key LIMIT $1", limit)
    return [(r["idempotency_key"], list(r["orgs"])) for r in rows]


async def slot_map(conn: asyncpg.Connection) -> tuple[dict[int, int], set[int]]:
    """(slot -> shard, the shards with a shard_owners row)."""
    slots = {r["slot"]: r["shard"] for r in await conn.fetch("SELECT slot, shard FROM slots")}
    owned = {r["shard"] for r in await conn.fetch("SELECT shard FROM shard_owners")}
    return slots, owned


async def outbox_statuses(conn: asyncpg.Connection) -> list[tuple[str, bool, int]]:
    """(status, delivered_at set, rows) over the outbox."""
    rows = await conn.fetch("SELECT status, delivered_at IS NOT NULL AS delivered, count(*) AS n FROM outbox"
                            " GROUP BY 1, 2 ORDER BY 1, 2")
    return [(r["status"], r["delivered"], r["n"]) for r in rows]


async def journal_orphans(conn: asyncpg.Connection, limit: int) -> list[tuple[str, int]]:
    """(org id, rows) of journal rows whose org the orgs table does not hold."""
    rows = await conn.fetch(
        "SELECT j.org_id, count(*) AS n FROM org_journal j WHERE NOT EXISTS"
        " (SELECT 1 FROM orgs o WHERE o.org_id = j.org_id) GROUP BY j.org_id ORDER BY j.org_id LIMIT $1", limit)
    return [(r["org_id"], r["n"]) for r in rows]


async def applied_migrations(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    return [(r["version"], r["name"]) for r in await conn.fetch("SELECT version, name FROM schema_migrations")]


def _optional_us(moment: datetime | None) -> int | None:
    return None if moment is None else dt_to_us(moment)
