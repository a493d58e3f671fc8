"""Tick ids partitioned by when they were first seen, against real Postgres: a resend is found
in whichever partition its id went to, a partition is dropped only once the edge refuses every
tick whose id it held, the prune job makes partitions ahead and drops them behind, and the
migration carries the unpartitioned table's rows over.

The scheduler runs as the plain object (no Ray, no shards) on a database of its own: the
embedded Postgres, or one on METERGATE_DATABASE_URL's server.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest

from actors import jobs
from actors.jobs import JOB, SchedulerActor
from actors.shard_commit import tick_key
from actors.ticks import decode_usage, max_tick_age_us
from config.settings import Settings
from storage import tick_ids
from storage.db import create_pool, migrate
from storage.journal import claim_tick_ids
from storage.times import us_to_dt

US = 1_000_000
MINUTE_US = 60 * US
HOUR_US = 3_600 * US
WIDTH_US = tick_ids.PARTITION_S * US
RETENTION_S = 26 * 3_600  # the default
# A partition boundary far from any other test's time: these tests move only their own clock.
T0 = 1_900_000_000 // tick_ids.PARTITION_S * tick_ids.PARTITION_S * US


def database_url_named(base_url: str, name: str) -> str:
    """The URL of database `name` on the server of `base_url`, whose query may hold a socket
    folder (`?host=/tmp/...`, the embedded Postgres), slashes and all."""
    path, mark, query = base_url.partition("?")
    return f"{path.rpartition('/')[0]}/{name}{mark}{query}"


async def _on_server(base: str, statement: str) -> None:
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from storage.db import start_embedded_postgres, stop_embedded_postgres

    external = os.environ.get("METERGATE_DATABASE_URL")
    server = None
    base = external or None
    if not external:
        base, server = start_embedded_postgres(tmp_path_factory.mktemp("tick_ids"))
    yield base
    if server is not None:
        stop_embedded_postgres(server)


@pytest.fixture
def database_url(server_url):
    """A new database, migrated from empty (so every test starts with the migration's
    partitions only); dropped at the end."""
    name = f"metergate_tick_ids_{uuid.uuid4().hex[:10]}"
    asyncio.run(_on_server(server_url, f'CREATE DATABASE "{name}"'))
    url = database_url_named(server_url, name)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(_on_server(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def on(url: str, body):
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return await body(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


async def claim(conn: asyncpg.Connection, ids: list[bytes], now_us: int) -> set[bytes]:
    """One commit's claim, committed."""
    async with conn.transaction():
        return await claim_tick_ids(conn, ids, now_us)


async def where(conn: asyncpg.Connection, ids: list[bytes]) -> dict[bytes, str]:
    """The partition that holds each id."""
    rows = await conn.fetch("SELECT id, tableoid::regclass::text AS part FROM tick_ids WHERE id = ANY($1)", ids)
    return {r["id"]: r["part"] for r in rows}


async def maintain(conn: asyncpg.Connection, now_us: int) -> dict:
    async with conn.transaction():
        return await tick_ids.maintain(conn, now_us, RETENTION_S)


def keys(prefix: str, n: int) -> list[bytes]:
    return [tick_key("org_tick_ids", f"{prefix}{i}") for i in range(n)]


# ----- dedupe ---------------------------------------------------------------------------------


def test_a_resent_tick_id_is_a_duplicate_in_whichever_partition_it_was_first_seen(database_url):
    async def scenario(conn):
        await maintain(conn, T0 - MINUTE_US)  # the partition ending at T0 and the next ones
        first, second, late = keys("a", 5), keys("b", 5), keys("c", 5)
        assert await claim(conn, first, T0 - MINUTE_US) == set()
        # Across the boundary: a resend of the first ids among new ones.
        assert await claim(conn, first[:3] + second, T0 + MINUTE_US) == set(first[:3])
        placed = await where(conn, first + second)
        assert {placed[k] for k in first} == {tick_ids.partition_name(T0 - WIDTH_US)}
        assert {placed[k] for k in second} == {tick_ids.partition_name(T0)}
        # Past every partition made (the job has not run for a day): the default partition
        # takes them, and a resend finds them there, and in the partitions behind.
        beyond = T0 + 4 * WIDTH_US
        assert await claim(conn, late + first[3:], beyond) == set(first[3:])
        assert set((await where(conn, late)).values()) == {tick_ids.DEFAULT_PARTITION}
        assert await claim(conn, late + second[:1], beyond + MINUTE_US) == set(late + second[:1])
        # The job catches up: the default partition's rows move into the partition made for
        # them, and are still found.
        done = await maintain(conn, beyond + 2 * MINUTE_US)
        assert done["moved_from_default"] == len(late) and done["dropped"] == []
        assert set((await where(conn, late)).values()) == {tick_ids.partition_name(beyond)}
        assert await conn.fetchval(f"SELECT count(*) FROM {tick_ids.DEFAULT_PARTITION}") == 0
        assert await claim(conn, late, beyond + 3 * MINUTE_US) == set(late)
        assert await conn.fetchval("SELECT count(*) FROM tick_ids") == len(first + second + late)

    on(database_url, scenario)


def test_a_claim_that_rolls_back_leaves_its_ids_unclaimed(database_url):
    async def scenario(conn):
        await maintain(conn, T0)
        ids = keys("rb", 3)
        transaction = conn.transaction()
        await transaction.start()
        assert await claim_tick_ids(conn, ids, T0) == set()
        await transaction.rollback()
        assert await claim(conn, ids, T0 + US) == set()

    on(database_url, scenario)


def test_dropping_partitions_never_lets_a_duplicate_in_the_edge_refuses_the_tick_first(database_url):
    """Every 10 minutes over two retentions, the job runs, then the resend of a tick is sent:
    either the edge refuses it as too old, or its id is still found. Two ticks at the extremes:
    one first seen 5 minutes before its start (the most a start may be ahead), one first seen
    15 minutes before the edge would refuse it; both first seen in the last microsecond of a
    partition, whose ids are the last of it to pass the retention."""
    window_us = max_tick_age_us(RETENTION_S)
    seen_at = T0 - US  # the last instant of the partition [T0 - width, T0)
    ticks = {"ahead": seen_at + 5 * MINUTE_US, "late": seen_at - window_us + 15 * MINUTE_US}

    def edge_accepts(tick_id: str, started_us: int, now: int) -> bool:
        body = msgspec.json.encode({"ticks": [{"tick_id": tick_id, "org_id": "org_tick_ids",
                                               "started_at": started_us, "duration_ms": 1_000}]})
        valid, rejected = decode_usage(body, now, 10, window_us)
        assert len(valid) + len(rejected) == 1
        assert not rejected or rejected[0][2].startswith("tick_too_old:"), rejected
        return bool(valid)

    async def scenario(conn):
        await maintain(conn, seen_at)
        ids = {name: tick_key("org_tick_ids", name) for name in ticks}
        assert await claim(conn, list(ids.values()), seen_at) == set()
        found_until = {}
        dropped_at = None
        for step in range(1, 2 * RETENTION_S // 600):
            now = seen_at + step * 10 * MINUTE_US
            done = await maintain(conn, now)
            if tick_ids.partition_name(T0 - WIDTH_US) in done["dropped"]:
                dropped_at = now
            for name, started in ticks.items():
                if not edge_accepts(name, started, now):
                    continue
                transaction = conn.transaction()  # the resend's commit, not kept
                await transaction.start()
                try:
                    assert await claim_tick_ids(conn, [ids[name]], now) == {ids[name]}, (name, step)
                finally:
                    await transaction.rollback()
                found_until[name] = now
        # The scenario did reach both sides: resends found until shortly before the drop, and
        # the partition went at the first run past the retention.
        assert dropped_at is not None and dropped_at - T0 < RETENTION_S * US + 10 * MINUTE_US
        assert dropped_at - T0 >= RETENTION_S * US
        assert set(found_until) == set(ticks)
        assert all(dropped_at - found > 50 * MINUTE_US for found in found_until.values()), found_until

    on(database_url, scenario)


# ----- the prune job --------------------------------------------------------------------------


def test_the_prune_job_makes_partitions_ahead_and_drops_those_past_the_retention(database_url, monkeypatch):
    settings = Settings(database_url=database_url, jobs_enabled=False)
    scheduler = SchedulerActor(settings.model_dump_json(), [0])  # built outside a loop: it starts nothing
    clock = {"now": T0 + HOUR_US}
    monkeypatch.setattr(jobs, "now_us", lambda: clock["now"])

    async def scenario():
        scheduler.pool = await create_pool(database_url)
        scheduler.started = asyncio.get_running_loop().create_future()
        scheduler.started.set_result(None)
        conn = await asyncpg.connect(database_url)
        try:
            first = await scheduler._run(JOB["prune_tick_ids"])
            made = [tick_ids.partition_name(T0 + k * WIDTH_US) for k in range(1 + tick_ids.PARTITIONS_AHEAD)]
            # The migration's partition holds times up to now, years behind this clock: it goes.
            assert first["created"] == made and first["dropped"] == ["tick_ids_legacy"]
            assert [p.name for p in await tick_ids.partitions(conn)] == made
            again = await scheduler._run(JOB["prune_tick_ids"])
            assert again["created"] == [] and again["dropped"] == []
            old = keys("old", 4)
            assert await claim(conn, old, clock["now"]) == set()

            # Two days later: everything above is past the retention and goes; partitions
            # from the current one on are made, and the ids claimed meanwhile (the default
            # partition took them) move into theirs.
            clock["now"] += 2 * 86_400 * US
            fresh = keys("fresh", 4)
            assert await claim(conn, fresh, clock["now"]) == set()
            later = await scheduler._run(JOB["prune_tick_ids"])
            assert later["dropped"] == made
            now_start = tick_ids.partition_start_us(clock["now"])
            assert later["created"] == [tick_ids.partition_name(now_start + k * WIDTH_US)
                                        for k in range(1 + tick_ids.PARTITIONS_AHEAD)]
            assert later["moved_from_default"] == len(fresh)
            assert set((await where(conn, fresh)).values()) == {tick_ids.partition_name(now_start)}
            assert await where(conn, old) == {}
            assert await claim(conn, old + fresh, clock["now"] + US) == set(fresh)  # old: forgotten
            bounds = [(p.from_us, p.to_us) for p in await tick_ids.partitions(conn)]
            assert bounds == [(now_start + k * WIDTH_US, now_start + (k + 1) * WIDTH_US)
                              for k in range(1 + tick_ids.PARTITIONS_AHEAD)]
            assert scheduler.runs["prune_tick_ids"] == 3
        finally:
            await conn.close()
            await scheduler.pool.close()

    asyncio.run(scenario())


def test_the_default_partition_keeps_rows_only_until_they_are_past_the_retention(database_url):
    async def scenario(conn):
        stray = keys("stray", 3)
        await maintain(conn, T0)
        # A clock jump leaves a gap behind the partitions made after it: ids claimed in it
        # stay in the default partition, are found there, and go with the retention.
        gap_at = T0 + 10 * WIDTH_US
        assert await claim(conn, stray, gap_at) == set()
        done = await maintain(conn, gap_at + 2 * WIDTH_US)
        assert done["moved_from_default"] == 0 and done["default_pruned"] == 0
        assert set((await where(conn, stray)).values()) == {tick_ids.DEFAULT_PARTITION}
        assert await claim(conn, stray, gap_at + 2 * WIDTH_US) == set(stray)
        assert (await maintain(conn, gap_at + RETENTION_S * US))["default_pruned"] == 0
        assert (await maintain(conn, gap_at + RETENTION_S * US + US))["default_pruned"] == len(stray)
        assert await where(conn, stray) == {}

    on(database_url, scenario)


# ----- the migration --------------------------------------------------------------------------


def _old_tick_ids_ddl() -> str:
    """tick_ids as migration 0001 made it (and 0013 found it)."""
    core = (Path(__file__).parent.parent / "storage" / "migrations" / "0001_core.sql").read_text()
    found = re.search(r"CREATE TABLE tick_ids \(.*?\);\nCREATE INDEX tick_ids_seen_at [^;]*;", core, re.DOTALL)
    assert found, "0001_core.sql no longer creates tick_ids as this test knows it"
    return found.group(0)


def test_the_migration_carries_the_unpartitioned_tick_ids_over(database_url):
    migration = (Path(__file__).parent.parent / "storage" / "migrations" / "0013_tick_id_partitions.sql").read_text()

    async def scenario(conn):
        # The database as it was before 0013, with rows of every age, the newest a minute ago.
        await conn.execute("DROP TABLE tick_ids")
        await conn.execute(_old_tick_ids_ddl())
        now = await conn.fetchval("SELECT now()")
        ages_h = [0.02, 1, 23, 25, 27, 400]
        old = keys("before", len(ages_h))
        await conn.executemany("INSERT INTO tick_ids (id, seen_at) VALUES ($1, $2)",
                               [(k, now - timedelta(hours=h)) for k, h in zip(old, ages_h)])
        async with conn.transaction():
            await conn.execute(migration)
        assert await conn.fetchval("SELECT count(*) FROM pg_partitioned_table"
                                   " WHERE partrelid = 'tick_ids'::regclass") == 1
        assert set((await where(conn, old)).values()) == {"tick_ids_legacy"}
        assert await conn.fetchval("SELECT to_regclass('tick_ids_unpartitioned')") is None
        rows = await conn.fetch("SELECT id, seen_at FROM tick_ids ORDER BY seen_at DESC")
        assert [r["id"] for r in rows] == old  # every row, its seen_at unchanged
        assert [r["seen_at"] for r in rows] == [now - timedelta(hours=h) for h in ages_h]
        # Found as duplicates after the migration; gone whole once all of it is past the retention.
        now_us = (await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::int8")) * US
        assert await claim(conn, old, now_us) == set(old)
        legacy_to = next(p.to_us for p in await tick_ids.partitions(conn) if p.name == "tick_ids_legacy")
        assert legacy_to > now_us - MINUTE_US
        kept = await maintain(conn, legacy_to + RETENTION_S * US - US)
        assert "tick_ids_legacy" not in kept["dropped"]
        gone = await maintain(conn, legacy_to + RETENTION_S * US)
        assert "tick_ids_legacy" in gone["dropped"]
        assert await where(conn, old) == {}

    on(database_url, scenario)


def test_a_new_database_gets_the_partitioned_table_and_takes_ticks_before_the_job_runs(database_url):
    async def scenario(conn):
        parts = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                 " WHERE i.inhparent = 'tick_ids'::regclass ORDER BY 1")
        assert [r["relname"] for r in parts] == ["tick_ids_default", "tick_ids_legacy"]
        now_us = (await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::int8")) * US + US
        ids = keys("new", 3)
        assert await claim(conn, ids, now_us) == set()
        assert set((await where(conn, ids)).values()) == {tick_ids.DEFAULT_PARTITION}
        assert await claim(conn, ids, now_us + US) == set(ids)
        assert (await maintain(conn, now_us + 2 * US))["moved_from_default"] == len(ids)

    on(database_url, scenario)
