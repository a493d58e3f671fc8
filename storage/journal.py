"""The shard's batched Postgres work: loading, tick dedupe and the group commit.

Every function takes an open connection; the shard owns the transaction. Each write is one
statement over arrays (unnest), so a commit costs a handful of round trips whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from storage.times import us_to_dt


def _minutes_to_dt(minutes_us: list[int]) -> list[datetime]:
    """us_to_dt over many values that repeat (rows of one commit share a few minutes)."""
    seen: dict[int, datetime] = {}
    return [seen.get(m) or seen.setdefault(m, us_to_dt(m)) for m in minutes_us]


@dataclass
class CommitBatch:
    new_orgs: list[tuple] = field(default_factory=list)      # org_id, email, billing_mode, slot, created_at
    snapshots: list[tuple] = field(default_factory=list)     # org_id, seq, state
    journal: list[tuple] = field(default_factory=list)       # org_id, seq, entry
    compact: list[tuple] = field(default_factory=list)       # org_id, up-to seq (inclusive)
    ledger: list[tuple] = field(default_factory=list)        # entry_id, org_id, kind, amount, grant_id,
                                                             # expires_at, note, key, hash, created_at, paid
    usage_debits: dict = field(default_factory=dict)         # (org_id, minute_us) -> [amount (<= 0), first at_us, invoiced]
    rollups: dict = field(default_factory=dict)              # (org_id, minute_us, lease_id) -> (mem, cpu, disk, ticks,
                                                             # cost_scaled, units, duration_ms)
    unclaimed_ticks: list[bytes] = field(default_factory=list)  # tick ids claimed in this commit, then rejected
    events: list[tuple] = field(default_factory=list)        # org_id, type, payload json, created_at
    due: list[tuple] = field(default_factory=list)           # org_id, due_at
    periods: list[tuple] = field(default_factory=list)       # org_id, key, started, ended, usage, quota used,
                                                             # plan_id, plan_version


async def load_orgs(conn: asyncpg.Connection, org_ids: list[str]) -> dict[str, tuple[int, bytes, list[bytes]]]:
    """org_id -> (snapshot seq, snapshot state, journal entries after it, in order)."""
    snaps = await conn.fetch(
        "SELECT org_id, seq, state FROM org_snapshots WHERE org_id = ANY($1::text[])", org_ids)
    found = {r["org_id"]: (r["seq"], r["state"], []) for r in snaps}
    if found:
        # Each wanted org's tail by its own key range (a join over the whole tables would let
        # the planner scan both, at any size).
        tail = await conn.fetch(
            "SELECT j.org_id, j.entry FROM unnest($1::text[], $2::int8[]) AS s(org_id, seq)"
            " JOIN LATERAL (SELECT org_id, seq, entry FROM org_journal"
            " WHERE org_journal.org_id = s.org_id AND org_journal.seq > s.seq) AS j ON true"
            " ORDER BY j.org_id, j.seq",
            list(found), [found[o][0] for o in found])
        for row in tail:
            found[row["org_id"]][2].append(row["entry"])
    return found


# The lookup is a LATERAL ... LIMIT 1 rather than NOT EXISTS so that its plan is always an index
# probe per id and partition: for NOT EXISTS the planner picks a hash anti-join over a
# sequential scan of every partition once a commit brings a thousand ids (bench/tick_ids.py).
CLAIM_TICK_IDS = (
    "WITH input AS (SELECT unnest($1::bytea[]) AS id),"
    " fresh AS (INSERT INTO tick_ids (id, seen_at) SELECT i.id, $2 FROM input i"
    " LEFT JOIN LATERAL (SELECT true AS hit FROM tick_ids t WHERE t.id = i.id LIMIT 1) seen ON true"
    " WHERE seen.hit IS NULL RETURNING id)"
    " SELECT id FROM input EXCEPT ALL SELECT id FROM fresh")


async def claim_tick_ids(conn: asyncpg.Connection, ids: list[bytes], now_us: int) -> set[bytes]:
    """Record tick ids (16-byte keys, distinct) as seen at `now_us`, the service's clock that
    their retention (storage/tick_ids.py) and the tick age window also read; returns those
    seen before (not to bill).

    tick_ids is partitioned by seen_at and has no unique key, so an id is looked up in every
    partition (its index on id) and inserted only if absent: a resend seen in an earlier
    partition, with whatever started_at, is found. This is exact because an org has one
    committer at a time (the shard's commit loop, fenced by its epoch). Only the duplicates
    come back, since they are few: no row per fresh tick to decode.
    """
    if not ids:
        return set()
    rows = await conn.fetch(CLAIM_TICK_IDS, ids, us_to_dt(now_us))
    return {r[0] for r in rows}


async def keyed_entries(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], asyncpg.Record]:
    """Ledger entries already written under (org_id, idempotency_key)."""
    if not pairs:
        return {}
    rows = await conn.fetch(
        "SELECT l.* FROM ledger l JOIN unnest($1::text[], $2::text[]) AS k(org_id, key)"
        " ON l.org_id = k.org_id AND l.idempotency_key = k.key",
        [p[0] for p in pairs], [p[1] for p in pairs])
    return {(r["org_id"], r["idempotency_key"]): r for r in rows}


async def write_batch(conn: asyncpg.Connection, batch: CommitBatch) -> list[int]:
    """All writes of one group commit; returns the outbox ids of its events, in order."""
    if batch.new_orgs:
        await conn.execute(
            "INSERT INTO orgs (org_id, email, billing_mode, slot, created_at)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[])",
            *_columns(batch.new_orgs, 5))
    if batch.snapshots:
        await conn.execute(
            "INSERT INTO org_snapshots (org_id, seq, state)"
            " SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])"
            " ON CONFLICT (org_id) DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state, updated_at = now()"
            " WHERE org_snapshots.seq < EXCLUDED.seq",
            *_columns(batch.snapshots, 3))
    if batch.journal:
        await conn.execute(
            "INSERT INTO org_journal (org_id, seq, entry)"
            " SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])",
            *_columns(batch.journal, 3))
    if batch.compact:
        await conn.execute(
            "DELETE FROM org_journal j USING unnest($1::text[], $2::int8[]) AS c(org_id, seq)"
            " WHERE j.org_id = c.org_id AND j.seq <= c.seq",
            *_columns(batch.compact, 2))
    if batch.ledger:
        await conn.execute(
            "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, grant_id, expires_at, note,"
            " idempotency_key, request_hash, created_at, paid_micros)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],"
            " $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::int8[])",
            *_columns(batch.ledger, 11))
    if batch.usage_debits:
        keys = list(batch.usage_debits)
        await conn.execute(
            "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at, invoiced_micros)"
            " SELECT 'lu_' || o || '_' || extract(epoch FROM m)::bigint, o, 'usage', a, m, t, i"
            " FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::timestamptz[], $5::int8[]) AS u(o, m, a, t, i)"
            " ON CONFLICT (org_id, usage_minute) WHERE usage_minute IS NOT NULL"
            " DO UPDATE SET amount_micros = ledger.amount_micros + EXCLUDED.amount_micros,"
            " invoiced_micros = ledger.invoiced_micros + EXCLUDED.invoiced_micros",
            [k[0] for k in keys], _minutes_to_dt([k[1] for k in keys]),
            [v[0] for v in batch.usage_debits.values()], [us_to_dt(v[1]) for v in batch.usage_debits.values()],
            [v[2] for v in batch.usage_debits.values()])
    if batch.rollups:
        keys = list(batch.rollups)
        values = list(batch.rollups.values())
        await conn.execute(
            "INSERT INTO usage_rollups (org_id, minute, lease_id, memory_mb_ms, cpu_ms, disk_mb_ms,"
            " ticks, cost_scaled, units, duration_ms)"
            " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::int8[], $5::int8[],"
            " $6::int8[], $7::int8[], $8::numeric[], $9::jsonb[], $10::int8[])"
            " ON CONFLICT (org_id, minute, lease_id) DO UPDATE SET"
            " memory_mb_ms = usage_rollups.memory_mb_ms + EXCLUDED.memory_mb_ms,"
            " cpu_ms = usage_rollups.cpu_ms + EXCLUDED.cpu_ms,"
            " disk_mb_ms = usage_rollups.disk_mb_ms + EXCLUDED.disk_mb_ms,"
            " ticks = usage_rollups.ticks + EXCLUDED.ticks,"
            " cost_scaled = usage_rollups.cost_scaled + EXCLUDED.cost_scaled,"
            " units = mg_units_add(usage_rollups.units, EXCLUDED.units),"
            " duration_ms = usage_rollups.duration_ms + EXCLUDED.duration_ms",
            [k[0] for k in keys], _minutes_to_dt([k[1] for k in keys]), [k[2] for k in keys],
            *_columns(values, 7))
    if batch.unclaimed_ticks:
        await conn.execute("DELETE FROM tick_ids WHERE id = ANY($1::bytea[])", batch.unclaimed_ticks)
    if batch.due:
        await conn.execute(
            "INSERT INTO org_due (org_id, due_at) SELECT * FROM unnest($1::text[], $2::timestamptz[])"
            " ON CONFLICT (org_id) DO UPDATE SET due_at = EXCLUDED.due_at", *_columns(batch.due, 2))
    if batch.periods:
        await conn.execute(
            "INSERT INTO period_usage (org_id, period_key, started_at, ended_at, usage_micros,"
            " quota_used_micros, plan_id, plan_version)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int8[],"
            " $6::int8[], $7::text[], $8::int[]) ON CONFLICT DO NOTHING", *_columns(batch.periods, 8))
    if batch.events:
        rows = await conn.fetch(
            "INSERT INTO outbox (org_id, type, payload, created_at)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::timestamptz[])"
            " RETURNING id",
            *_columns(batch.events, 4))
        return [r["id"] for r in rows]
    return []


def _columns(rows: list[tuple], width: int) -> list[list]:
    columns: list[list] = [[] for _ in range(width)]
    for row in rows:
        assert len(row) == width, (row, width)
        for i, value in enumerate(row):
            columns[i].append(value)
    return columns
