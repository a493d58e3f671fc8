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


async def fence(conn: asyncpg.Connection, shard: int, epoch: int) -> None:
    current = await conn.fetchval(
        "SELECT epoch FROM shard_owners WHERE shard = $1 FOR SHARE", shard)
    if current != epoch:
        raise Fenced(f"shard {shard} epoch {epoch} is stale (now {current})")
