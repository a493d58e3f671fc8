"""Where an org lives: a stable hash to a fixed slot space, slots mapped to shards in Postgres
with an epoch per shard, so that a stale owner can never write (fencing)."""

from __future__ import annotations

import hashlib

import asyncpg

# Fixed forever: changing it would move every org. Shards own slots, never orgs directly.
SLOT_COUNT = 1024


class Fenced(Exception):
    """Another incarnation of this shard claimed its slots: this one must not write."""


def slot_of(org_id: str) -> int:
    digest = hashlib.blake2b(org_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOT_COUNT


async def ensure_slots(conn: asyncpg.Connection, shard_count: int) -> int:
    """Create the slot map for shard_count shards; reassign slots if the count changed.

    Returns how many slots moved. Moving bumps the epoch of every shard, so an owner that
    still runs with the old map is fenced out at its next commit.
    """
    async with conn.transaction():
        await conn.execute("LOCK TABLE slots IN EXCLUSIVE MODE")
        await conn.execute(
            "INSERT INTO slots (slot, shard) SELECT s, s % $1 FROM generate_series(0, $2 - 1) AS s"
            " ON CONFLICT (slot) DO NOTHING", shard_count, SLOT_COUNT)
        moved = await conn.fetchval(
            "WITH m AS (UPDATE slots SET shard = slot % $1 WHERE shard <> slot % $1 RETURNING 1)"
            " SELECT count(*) FROM m", shard_count)
        await conn.execute(
            "INSERT INTO shard_owners (shard, epoch) SELECT k, 0 FROM generate_series(0, $1 - 1) AS k"
            " ON CONFLICT (shard) DO NOTHING", shard_count)
        if moved:
            await conn.execute("UPDATE shard_owners SET epoch = epoch + 1")
    return moved


async def slot_map(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT slot, shard FROM slots ORDER BY slot")
    assert len(rows) == SLOT_COUNT, f"slot map has {len(rows)} slots, expected {SLOT_COUNT}"
    return [r["shard"] for r in rows]


async def claim_shard(conn: asyncpg.Connection, shard: int) -> tuple[int, set[int]]:
    """Become the owner of `shard`: a new epoch, waiting for any old owner's commit to end."""
    async with conn.transaction():
        epoch = await conn.fetchval(
            "UPDATE shard_owners SET epoch = epoch + 1 WHERE shard = $1 RETURNING epoch", shard)
        if epoch is None:
            raise Fenced(f"shard {shard} is not in the slot map")
        slots = {r["slot"] for r in await conn.fetch("SELECT slot FROM slots WHERE shard = $1", shard)}
    return epoch, slots


async def fence(conn: asyncpg.Connection, shard: int, epoch: int) -> int:
    """Inside a commit's transaction: refuse to go on unless this is still the shard's epoch.

    Returns the transaction's id, so that a commit whose answer is lost can be looked up
    (transaction_status)."""
    row = await conn.fetchrow(
        "SELECT epoch, txid_current() AS xid FROM shard_owners WHERE shard = $1 FOR SHARE", shard)
    current = row["epoch"] if row else None
    if current != epoch:
        raise Fenced(f"shard {shard} epoch {epoch} is stale (now {current})")
    return row["xid"]


async def end_transaction(conn: asyncpg.Connection, backend_pid: int, xid: int, timeout: float | None = None) -> bool:
    """Terminate the server process still holding transaction `xid` open, if one does.

    A client that lost its connection cannot tell whether the server saw the link go: over a
    silent network the server can hold the transaction open for as long as its keepalives
    take. Ended, it is either committed (its COMMIT ran) or rolled back, for good."""
    return bool(await conn.fetchval(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE pid = $1 AND backend_xid::text::int8 = $2::int8 % 4294967296", backend_pid, xid, timeout=timeout))


async def transaction_status(conn: asyncpg.Connection, xid: int, timeout: float | None = None) -> str | None:
    """'committed', 'aborted' or 'in progress'; None if Postgres no longer knows (too old)."""
    return await conn.fetchval("SELECT txid_status($1)", xid, timeout=timeout)
