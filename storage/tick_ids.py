"""Tick-id retention: partitions by the time an id was first seen, dropped whole, never
deleted row by row. The claim itself is part of the group commit (storage/journal.py).

`tick_ids` (migration 0013) is partitioned by range of `seen_at`, the service's clock when the
commit claimed the id. Partitions are PARTITION_S wide and aligned to it (UTC); the scheduler's
prune job (`maintain`) creates the next ones ahead of time and drops each one wholly older than
the retention. Rows that find no partition (the job has not run since the clock passed the
last one, or the test clock jumped) land in `tick_ids_default`, which the job empties into the
partition it creates for them, or deletes once they are past the retention. `tick_ids_legacy`
holds what the unpartitioned table had at the migration; it is dropped like any other once
all of it is past the retention.

Why not partition by the tick's start: `tick_key` hashes only the org and the tick id, so a
client may send the same tick id again with another `started_at`, and it must still be found.
A lookup by id therefore reads every partition (one index probe each, PARTITION_S trades their
number against how much past the retention the table holds), and the same lookup is exact
whichever partition the first sighting went to. Postgres cannot make a unique index over a
partitioned table without the partition key, so there is none: exactness rests on there being
one committer per org at a time (one commit loop per shard, the epoch fence between a shard
and its successor), as every write of an org's state already does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg

from storage.times import dt_to_us, us_to_dt

US_PER_S = 1_000_000
PARTITION_S = 6 * 3_600  # 26 h of retention reads about 6 partitions; the table holds up to 6 h past it
PARTITIONS_AHEAD = 2  # made this many ahead of the current one: the job may miss 12 h before any row goes to default
LOCK_TIMEOUT_MS = 2_000  # DDL on tick_ids waits at most this for the commits holding it; then the job tries again
DEFAULT_PARTITION = "tick_ids_default"
_NAME = re.compile(r"^tick_ids_[0-9a-z_]+$")


@dataclass(frozen=True)
class Partition:
    name: str
    from_us: int | None  # None: from MINVALUE (the legacy partition)
    to_us: int


async def partitions(conn: asyncpg.Connection) -> list[Partition]:
    """The range partitions of tick_ids, oldest first (the default partition is not one)."""
    rows = await conn.fetch(
        "SELECT c.relname AS name,"
        " substring(b FROM 'FROM \\(''([^'']*)''\\)')::timestamptz AS from_at,"
        " substring(b FROM 'TO \\(''([^'']*)''\\)')::timestamptz AS to_at"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,"
        " LATERAL pg_get_expr(c.relpartbound, c.oid) AS b"
        " WHERE i.inhparent = 'tick_ids'::regclass AND b <> 'DEFAULT'")
    found = [Partition(r["name"], None if r["from_at"] is None else dt_to_us(r["from_at"]), dt_to_us(r["to_at"]))
             for r in rows]
    return sorted(found, key=lambda p: p.to_us)


def partition_start_us(at_us: int, width_s: int = PARTITION_S) -> int:
    width_us = width_s * US_PER_S
    return at_us // width_us * width_us


def partition_name(from_us: int) -> str:
    return "tick_ids_" + datetime.fromtimestamp(from_us // US_PER_S, timezone.utc).strftime("%Y%m%d_%H%M%S")


def _literal(at_us: int) -> str:
    """A timestamptz literal for DDL (bounds cannot be parameters); from an integer, never from input."""
    return "'" + us_to_dt(at_us).isoformat() + "'"


async def maintain(conn: asyncpg.Connection, now_us: int, retention_s: int, width_s: int = PARTITION_S,
                   ahead: int = PARTITIONS_AHEAD) -> dict:
    """Inside the job's transaction: drop every partition wholly older than `retention_s`,
    delete the default partition's rows past it, and make sure partitions exist from the
    current one to `ahead` after it. Returns what it did.

    Dropping is exact: a partition goes only when its every id was first seen more than the
    retention ago, and a tick whose id was first seen then started at most 5 minutes later,
    so the edge refuses it (`tick_too_old`, an hour inside the retention).
    """
    assert retention_s > 0 and width_s > 0 and ahead >= 0, (retention_s, width_s, ahead)
    cutoff_us = now_us - retention_s * US_PER_S
    existing = await partitions(conn)
    dropped = [p.name for p in existing if p.to_us <= cutoff_us]
    kept = [p for p in existing if p.to_us > cutoff_us]
    # From where the partitions end (never over one of them) or the current period, whichever
    # is later: a gap behind it (the clock jumped) is never written again but for the few rows
    # the default partition took meanwhile, which stay there until past the retention.
    start_us = max([partition_start_us(now_us, width_s)] + [p.to_us for p in kept])
    end_us = partition_start_us(now_us, width_s) + (ahead + 1) * width_s * US_PER_S
    bounds = []
    while start_us < end_us:
        bounds.append((start_us, partition_start_us(start_us, width_s) + width_s * US_PER_S))
        start_us = bounds[-1][1]
    if dropped or bounds:
        # DDL on a partition locks the whole table: take it all at once, parent first as every
        # claim does, so that no claim holding the parent waits on a partition this holds
        # (a deadlock would fail a commit). Claims wait at most for this transaction; this
        # waits at most LOCK_TIMEOUT_MS for the commits in flight, else fails and runs again.
        await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
        await conn.execute("LOCK TABLE tick_ids IN ACCESS EXCLUSIVE MODE")
    for name in dropped:
        assert _NAME.match(name), name
        await conn.execute(f"DROP TABLE {name}")
    status = await conn.execute(f"DELETE FROM {DEFAULT_PARTITION} WHERE seen_at < $1", us_to_dt(cutoff_us))
    default_pruned = int(status.split()[-1])
    moved = 0
    for from_us, to_us in bounds:
        moved += await _create(conn, from_us, to_us)
    after = await partitions(conn)
    for at_us in (now_us, end_us - 1):  # the postcondition: now and the last period ahead have one
        assert any((p.from_us is None or p.from_us <= at_us) and at_us < p.to_us for p in after), (at_us, after)
    return {"created": [partition_name(f) for f, _ in bounds], "dropped": dropped,
            "moved_from_default": moved, "default_pruned": default_pruned}


async def _create(conn: asyncpg.Connection, from_us: int, to_us: int) -> int:
    """Create the partition [from_us, to_us); rows the default partition holds for it move into
    it. Returns how many moved.

    Postgres refuses a partition whose range has rows in the default partition, so they leave
    it first; the caller holds the table locked, so no claim looks for them meanwhile.
    """
    name = partition_name(from_us)
    assert _NAME.match(name), name
    lo, hi = us_to_dt(from_us), us_to_dt(to_us)
    waiting = await conn.fetchval(
        f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE seen_at >= $1 AND seen_at < $2", lo, hi)
    if waiting:
        await conn.execute("CREATE TEMPORARY TABLE tick_ids_moving (id bytea, seen_at timestamptz) ON COMMIT DROP")
        await conn.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE seen_at >= $1 AND seen_at < $2"
            " RETURNING id, seen_at) INSERT INTO tick_ids_moving SELECT id, seen_at FROM moved", lo, hi)
    await conn.execute(
        f"CREATE TABLE {name} PARTITION OF tick_ids FOR VALUES FROM ({_literal(from_us)}) TO ({_literal(to_us)})")
    if waiting:
        await conn.execute("INSERT INTO tick_ids (id, seen_at) SELECT id, seen_at FROM tick_ids_moving")
        await conn.execute("DROP TABLE tick_ids_moving")
    return waiting
