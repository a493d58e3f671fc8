"""Where an org lives: a stable hash to a fixed slot space, slots mapped to shards in Postgres
with an epoch per shard, so that a stale owner can never write (fencing)."""

from __future__ import annotations

import hashlib

import asyncpg

# Fixed forever: changing it would move every org. Shards own slots, never orgs directly.
SLOT_COUNT = 1024


class Fenced(Exception):
    """This shard may not write: the database's record of its claim is not the one it holds.

    `superseded`: another incarnation claimed the shard since (a later epoch): this one must
    stop. Otherwise the database is behind (or beside) what this shard committed: a failover
    to a standby that lacks the last commits, or a restore. Memory then holds changes the
    database does not have, and must be dropped and reloaded under a new claim."""

    def __init__(self, message: str, superseded: bool = True, found: tuple[int, int] | None = None,
                 landed_late: bool = False) -> None:
        super().__init__(message)
        self.superseded = superseded
        self.found = found  # (epoch, commit count) as the database records them
        self.landed_late = landed_late  # only a commit whose outcome was unknown landed (actors/claim.py)


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


async def claim_shard(conn: asyncpg.Connection, shard: int, after_epoch: int = 0) -> tuple[int, int, set[int]]:
    """Become the owner of `shard`: (epoch, commit count, slots). The new epoch is above both
    the recorded one and `after_epoch` (the one this process held before: a restored database
    may record an older one). The claim waits for any old owner's commit to end."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE shard_owners SET epoch = GREATEST(epoch, $2) + 1 WHERE shard = $1"
            " RETURNING epoch, commit_no", shard, after_epoch)
        if row is None:
            raise Fenced(f"shard {shard} is not in the slot map")
        slots = {r["slot"] for r in await conn.fetch("SELECT slot FROM slots WHERE shard = $1", shard)}
    return row["epoch"], row["commit_no"], slots


async def fence(conn: asyncpg.Connection, shard: int, epoch: int, commit_no: int) -> int:
    """Inside a commit's transaction: count the commit, or refuse to go on unless the database
    records this shard's claim exactly as the shard holds it (epoch and commits so far).

    Returns the transaction's id. The row stays locked to the commit's end, so a new owner's
    claim waits for it."""
    xid = await conn.fetchval(
        "UPDATE shard_owners SET commit_no = commit_no + 1"
        " WHERE shard = $1 AND epoch = $2 AND commit_no = $3 RETURNING txid_current()", shard, epoch, commit_no)
    if xid is None:
        raise fenced_by(shard, epoch, commit_no, await claim_of(conn, shard))
    return xid


async def claim_of(conn: asyncpg.Connection, shard: int, timeout: float | None = None) -> tuple[int, int] | None:
    """The shard's claim as the database records it: (epoch, commit count)."""
    row = await conn.fetchrow("SELECT epoch, commit_no FROM shard_owners WHERE shard = $1", shard, timeout=timeout)
    return (row["epoch"], row["commit_no"]) if row else None


def fenced_by(shard: int, epoch: int, commit_no: int, found: tuple[int, int] | None) -> Fenced:
    """Why the recorded claim `found` fences a shard holding (epoch, commit_no)."""
    if found is None or found[0] > epoch:
        return Fenced(f"shard {shard} epoch {epoch} is stale (now {found and found[0]})", superseded=True, found=found)
    return Fenced(f"shard {shard}: the database records epoch {found[0]} after {found[1]} commits, this shard "
                  f"holds epoch {epoch} after {commit_no} (a failover or a restore?)", superseded=False, found=found)


async def backend_holding(conn: asyncpg.Connection, backend_pid: int, xid: int,
                          timeout: float | None = None) -> str | None:
    """Whether a server process still holds transaction `xid` open: None if none does, 'sync_rep'
    if it waits for a synchronous standby to confirm its COMMIT, else 'open'."""
    return await conn.fetchval(
        "SELECT CASE WHEN wait_event = 'SyncRep' THEN 'sync_rep' ELSE 'open' END FROM pg_stat_activity"
        " WHERE pid = $1 AND backend_xid::text::int8 = $2::int8 % 4294967296", backend_pid, xid, timeout=timeout)


async def end_transaction(conn: asyncpg.Connection, backend_pid: int, xid: int, timeout: float | None = None) -> bool:
    """Terminate the server process still holding transaction `xid` open, unless it waits for a
    synchronous standby (ended then, its commit would stand on the primary alone).

    A client that lost its connection cannot tell whether the server saw the link go: over a
    silent network the server can hold the transaction open for as long as its keepalives
    take. Ended, it is either committed (its COMMIT ran) or rolled back, for good."""
    return bool(await conn.fetchval(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE pid = $1 AND backend_xid::text::int8 = $2::int8 % 4294967296"
        " AND wait_event IS DISTINCT FROM 'SyncRep'", backend_pid, xid, timeout=timeout))


async def transaction_status(conn: asyncpg.Connection, xid: int, timeout: float | None = None) -> str | None:
    """'committed', 'aborted' or 'in progress'; None if Postgres no longer knows (too old)."""
    return await conn.fetchval("SELECT txid_status($1)", xid, timeout=timeout)


# What a restore's first step moves every epoch on by (`metergate restore begin`): above any
# epoch a process from before could have claimed since the backup.
RESTORE_EPOCH_STEP = 1_000


async def fence_every_shard(conn: asyncpg.Connection, by: int = RESTORE_EPOCH_STEP) -> int:
    """Move every shard's epoch on by `by` (a restore's first step): any shard process still
    running from before sees a later epoch than its own and stops instead of writing. Returns
    the number of shards."""
    return int((await conn.execute("UPDATE shard_owners SET epoch = epoch + $1", by)).split()[-1])
