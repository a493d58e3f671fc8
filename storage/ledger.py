"""Reads of the ledger (the shard's group commit writes it, in storage/journal.py)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from storage.times import dt_to_us, optional_dt


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    kind: str
    amount_micros: int
    created_us: int
    grant_id: str | None = None
    expires_us: int | None = None
    note: str | None = None
    invoiced_micros: int = 0


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(row["entry_id"], row["kind"], row["amount_micros"], dt_to_us(row["created_at"]), row["grant_id"],
                 dt_to_us(row["expires_at"]) if row["expires_at"] is not None else None, row["note"],
                 row["invoiced_micros"])


async def page(conn: asyncpg.Connection, org_id: str, after: tuple[int, str] | None, limit: int) -> list[Entry]:
    """Entries newest first, after the (created_us, entry_id) position given; limit + 1 of them
    at most, so the caller knows whether there are more."""
    # Two statements, not one with "$2 IS NULL OR ...": a prepared statement's generic plan
    # (Postgres' choice after five runs) cannot start the index scan at the cursor through an
    # OR, and walked every newer entry of the org (~9 ms a page 200 days back, bench/year.py).
    if after is None:
        rows = await conn.fetch(
            "SELECT entry_id, kind, amount_micros, grant_id, expires_at, note, created_at, invoiced_micros FROM ledger"
            " WHERE org_id = $1 ORDER BY created_at DESC, entry_id DESC LIMIT $2", org_id, limit + 1)
    else:
        rows = await conn.fetch(
            "SELECT entry_id, kind, amount_micros, grant_id, expires_at, note, created_at, invoiced_micros FROM ledger"
            " WHERE org_id = $1 AND (created_at, entry_id) < ($2, $3)"
            " ORDER BY created_at DESC, entry_id DESC LIMIT $4", org_id, optional_dt(after[0]), after[1], limit + 1)
    return [_entry(r) for r in rows]


async def history(conn: asyncpg.Connection, org_id: str,
                  since_us: int | None = None) -> list[tuple[str, int, str | None, int, int, int | None]]:
    """Every entry from since_us on (None: all), oldest first, as (kind, amount_micros,
    grant_id, created_us, invoiced_micros, expires_us): for accounting."""
    # Two statements, for the reason in `page`: the months read one month of a ledger.
    columns = "SELECT kind, amount_micros, grant_id, created_at, invoiced_micros, expires_at FROM ledger"
    if since_us is None:
        rows = await conn.fetch(columns + " WHERE org_id = $1 ORDER BY created_at, entry_id", org_id)
    else:
        rows = await conn.fetch(columns + " WHERE org_id = $1 AND created_at >= $2 ORDER BY created_at, entry_id",
                                org_id, optional_dt(since_us))
    return [(r["kind"], r["amount_micros"], r["grant_id"], dt_to_us(r["created_at"]), r["invoiced_micros"],
             dt_to_us(r["expires_at"]) if r["expires_at"] is not None else None) for r in rows]


async def credits_of_payments(conn: asyncpg.Connection,
                              payment_ids: list[str]) -> dict[str, tuple[str, str | None, int, int, int | None]]:
    """What each Stripe payment bought: payment id -> (org id, the grant its credit made, the
    credit's amount, what of that grant lapsed unused, what the payment was or None), for the
    payments metergate credited (billing-rules 3)."""
    rows = await conn.fetch(
        "SELECT c.idempotency_key, c.org_id, c.grant_id, c.amount_micros, c.paid_micros,"
        " COALESCE((SELECT -sum(e.amount_micros) FROM ledger e WHERE e.org_id = c.org_id"
        "           AND e.grant_id = c.grant_id AND e.kind = 'expiration'), 0)::bigint AS lapsed"
        " FROM ledger c WHERE c.idempotency_key = ANY($1::text[]) AND c.idempotency_key LIKE 'stripe:payment:%'",
        [f"stripe:payment:{p}" for p in payment_ids])
    return {r["idempotency_key"].removeprefix("stripe:payment:"): (r["org_id"], r["grant_id"], r["amount_micros"],
                                                                  r["lapsed"], r["paid_micros"])
            for r in rows}


async def write_usage_history(conn: asyncpg.Connection, org_id: str, end_us: int, minutes: int,
                              micros_per_minute: int = 1) -> None:
    """Usage rows straight into the ledger, one a minute for `minutes` minutes ending at
    `end_us`: a long history for benchmarks of what reads it (bench/billing_page.py). The
    shard holds none of it; never use it on an org that is billed."""
    minute_us = 60_000_000
    await conn.execute(
        "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at)"
        " SELECT 'bench_' || n, $1, 'usage', -$5::bigint, to_timestamp(($2::bigint - n * $3::bigint) / 1e6),"
        " to_timestamp(($2::bigint - n * $3::bigint) / 1e6) FROM generate_series(1, $4::int) AS n",
        org_id, end_us - end_us % minute_us, minute_us, minutes, micros_per_minute)
