"""Fencing that a failover or a restore cannot fool (issue 25, item 1).

Each shard's row in shard_owners carries its epoch and the count of its commits, advanced by
every commit in the statement that fences it. A database that lacks commits a running shard
made (restored from a backup taken while it ran) is found by the shard, which drops its memory
and claims again: nothing acknowledged after the restore point stays in memory, every balance
equals its ledger. A lost COMMIT is decided by the count; a COMMIT that waits for a synchronous
standby is never ended (it would stand on the primary alone).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pgserver
import pytest

from actors.commands import CreateOrg, Credit, fingerprint
from actors.shard import ShardActor
from config.settings import Settings
from storage.db import migrate
from storage.slots import Fenced, claim_of, claim_shard, ensure_slots, fence
from tests.differential import CATALOG_PATH
from tests.helpers import database_url_named

BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"


def _shard(url: str) -> ShardActor:
    settings = Settings(database_url=url, shards=1, catalog=CATALOG_PATH, service_token="s" * 20,
                        admin_token="a" * 20, org_token_secret="o" * 32)
    return ShardActor(0, settings.model_dump_json())


async def _submit(shard: ShardActor, org_id: str, command) -> dict:
    (answer,) = await shard.submit([(org_id, command, fingerprint(command))])
    return answer


async def _balance(shard: ShardActor, org_id: str) -> int | None:
    (answer,) = await shard.state([org_id])
    return answer["state"].balance_micros if "state" in answer else None


async def _ledger_sums(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT org_id, sum(amount_micros)::int8 AS s FROM ledger GROUP BY org_id")
        return {r["org_id"]: r["s"] for r in rows}
    finally:
        await conn.close()


async def _on(url: str, statement: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


def test_the_fence_counts_commits_and_tells_a_restored_database_from_a_new_owner(shard_database):
    async def scenario() -> None:
        conn = await asyncpg.connect(shard_database)
        try:
            epoch, commits, slots = await claim_shard(conn, 0)
            assert len(slots) > 0
            for _ in range(3):
                async with conn.transaction():
                    await fence(conn, 0, epoch, commits)
                commits += 1
            assert await claim_of(conn, 0) == (epoch, commits)
            # A fenced transaction that rolls back counts nothing.
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await fence(conn, 0, epoch, commits)
                    raise RuntimeError("rolled back")
            assert await claim_of(conn, 0) == (epoch, commits)
            # The database lacks the last commit (a restore): not a new owner, a divergence.
            await conn.execute("UPDATE shard_owners SET commit_no = commit_no - 1 WHERE shard = 0")
            with pytest.raises(Fenced) as behind:
                async with conn.transaction():
                    await fence(conn, 0, epoch, commits)
            assert behind.value.superseded is False
            # An older epoch (a backup from before this process claimed): a divergence too.
            await conn.execute("UPDATE shard_owners SET epoch = epoch - 1, commit_no = $1 WHERE shard = 0", commits)
            with pytest.raises(Fenced) as older:
                async with conn.transaction():
                    await fence(conn, 0, epoch, commits)
            assert older.value.superseded is False
            # A later epoch: another incarnation claimed the shard.
            await conn.execute("UPDATE shard_owners SET epoch = $1 + 1 WHERE shard = 0", epoch)
            with pytest.raises(Fenced) as newer:
                async with conn.transaction():
                    await fence(conn, 0, epoch, commits)
            assert newer.value.superseded is True
            # A claim goes above the epoch this process held, whatever the database records.
            await conn.execute("UPDATE shard_owners SET epoch = 1 WHERE shard = 0")
            again, _, _ = await claim_shard(conn, 0, after_epoch=epoch + 5)
            assert again == epoch + 6
        finally:
            await conn.close()

    asyncio.run(scenario())


def _pg(tool: str, *args: str) -> None:
    done = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_database_restored_under_a_running_shard_is_found_and_memory_reloads_from_it(service, tmp_path):
    """A real restore (pg_dump while the shard commits, then the database dropped and restored
    from it) under a running shard: the shard finds it with no request (its periodic check),
    drops memory and claims again. Credits acknowledged after the backup are not kept in memory:
    each balance equals its ledger, and a retry of such a credit with its key lands again."""
    name = f"metergate_restore_{uuid.uuid4().hex[:8]}"
    server_url = service.settings.database_url
    url = database_url_named(server_url, name)
    dump = tmp_path / "backup.dump"

    async def scenario() -> None:
        await _on(server_url, f'CREATE DATABASE "{name}"')
        await migrate(url)
        conn = await asyncpg.connect(url)
        await ensure_slots(conn, 1)
        await conn.close()
        shard = _shard(url)
        await shard.ready()
        orgs = [f"org_restore_{n}" for n in range(4)]
        for org_id in orgs:
            assert (await _submit(shard, org_id, CreateOrg(f"{org_id}@example.test", "payg", True))).get("created")
            assert "error" not in await _submit(shard, org_id, Credit("grant", 1_000, idempotency_key="before"))
        # The backup, taken while the shard runs.
        await asyncio.to_thread(_pg, "pg_dump", "-Fc", "-f", str(dump), "-d", url)
        for org_id in orgs:
            assert "error" not in await _submit(shard, org_id, Credit("grant", 500, idempotency_key="after"))
        late = "org_restore_late"
        assert (await _submit(shard, late, CreateOrg(f"{late}@example.test", "payg", True))).get("created")
        start = await _balance(shard, late)  # what a new org starts with (its plan's grant)
        assert [await _balance(shard, o) for o in orgs] == [start + 1_500] * 4
        claims, epoch = shard.claim.claims, shard.epoch

        # The restore: the database is dropped (the shard's connections with it) and restored.
        await _on(server_url, f'DROP DATABASE "{name}" WITH (FORCE)')
        await _on(server_url, f'CREATE DATABASE "{name}"')
        await asyncio.to_thread(_pg, "pg_restore", "--single-transaction", "-d", url, str(dump))

        deadline = time.monotonic() + 20
        while shard.claim.claims == claims and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # no request: the shard's own check finds it
        assert shard.claim.claims == claims + 1, "the shard did not notice the restore"
        assert shard.epoch > epoch and not shard.orgs
        sums = await _ledger_sums(url)
        assert [await _balance(shard, o) for o in orgs] == [sums[o] for o in orgs] == [start + 1_000] * 4
        assert await _balance(shard, late) is None  # created after the backup: gone with it
        # A credit the restore lost is applied again by its retry, once.
        for _ in range(2):
            assert "error" not in await _submit(shard, orgs[0], Credit("grant", 500, idempotency_key="after"))
        drained = await shard.drain()
        assert drained["snapshots"] >= 1
        sums = await _ledger_sums(url)
        assert await _balance(shard, orgs[0]) == sums[orgs[0]] == start + 1_500
        # Snapshots written after the reload agree with the ledger (a fresh shard reads them).
        shard.loop_task.cancel()  # this process's shard stops before the next one claims
        await shard.pool.close()
        fresh = _shard(url)
        await fresh.ready()
        assert [await _balance(fresh, o) for o in orgs] == [sums[o] for o in orgs]

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(_on(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _raised(check) -> Fenced:
    with pytest.raises(Fenced) as raised:
        await check
    return raised.value


def test_a_commit_whose_outcome_was_not_known_landing_late_drops_memory_and_is_not_taken_for_a_restore(shard_database):
    """A fenced transaction whose COMMIT's answer was lost and could not be looked up leaves the
    count at ours or one more. One more is that commit landing late: the count takes it in and
    the shard drops its memory (orgs of that batch may have loaded before it landed), but it is
    no divergence of the database (no new claim, no holds); anything else still is."""
    from actors.claim import Claim

    async def scenario() -> None:
        conn = await asyncpg.connect(shard_database)
        try:
            claim = Claim(0)
            await claim.take(conn)
            async with conn.transaction():  # it lands, but its answer never reached the shard
                await fence(conn, 0, claim.epoch, claim.commit_no)
            assert not (await _raised(claim.check(conn))).landed_late
            claim.unsure()
            late = await _raised(claim.check(conn))
            assert (late.landed_late, late.superseded) == (True, False)
            assert (claim.epoch, claim.commit_no, claim.uncertain) == (*await claim_of(conn, 0), False)
            await claim.check(conn)  # taken in: all is well again
            claim.unsure()  # the next one did not land: the count is ours, all is well
            async with conn.transaction():
                await claim.fence(conn)
            claim.committed()
            assert await claim_of(conn, 0) == (claim.epoch, claim.commit_no)
            claim.unsure()  # two ahead is not one uncertain commit
            await conn.execute("UPDATE shard_owners SET commit_no = commit_no + 2 WHERE shard = 0")
            with pytest.raises(Fenced) as ahead:
                async with conn.transaction():
                    await claim.fence(conn)
            assert (ahead.value.superseded, ahead.value.landed_late) == (False, False)
        finally:
            await conn.close()

    asyncio.run(scenario())
