"""A shard's view log past its bound, on a real shard run in this process with its own
Postgres database: records of orgs out of memory are dropped oldest first, a reader behind
what was dropped is told to load the shard again (and a reader past it is not), and the
shard's snapshot serves the dropped orgs from Postgres stamped with the snapshot's position,
so that they win over any older record a reader kept (issue 18, review)."""

from __future__ import annotations

import asyncio
import time

from actors.commands import CreateOrg, Credit, Halt, fingerprint
from actors.shard import ShardActor
from config.settings import Settings
from metergate_client.projection import RECORD_DECODER, Projection
from tests.differential import CATALOG_PATH


async def _scenario(url: str) -> None:
    settings = Settings(database_url=url, shards=1, catalog=CATALOG_PATH, passivate_after_s=1,
                        view_log_max_records=2, service_token="s" * 20, admin_token="a" * 20,
                        org_token_secret="o" * 32)
    shard = ShardActor(0, settings.model_dump_json())
    await shard.ready()
    try:
        ids = [f"org_vl{n}" for n in range(6)]
        for org_id in ids:
            (answer,) = await shard.submit([(org_id, CreateOrg(f"{org_id}@example.test", "payg", True),
                                             fingerprint(CreateOrg(f"{org_id}@example.test", "payg", True)))])
            assert answer.get("created") is True, answer
        reader = Projection()
        first = await shard.changes(shard.epoch, 0, 0)
        reader.advance(0, first["epoch"], first["seq"], [RECORD_DECODER.decode(line) for line in first["views"]])
        assert first["floor"] == 0 and len(reader) == 6
        caught_up = first["seq"]
        (halted,) = await shard.submit([(ids[0], Halt(), fingerprint(Halt()))])  # org 0 changes, then others
        assert "error" not in halted, halted
        for org_id in ids[1:5]:
            (credited,) = await shard.submit([(org_id, Credit("grant", 1), fingerprint(Credit("grant", 1)))])
            assert "error" not in credited, credited
        time.sleep(2.1)  # every org is idle past passivate_after_s
        await shard._housekeeping_safely()  # passivates them and drops all but 2 of their records
        assert not shard.orgs and len(shard.views.records) == 2 and shard.views.floor > caught_up
        behind = await shard.changes(shard.epoch, caught_up, 0)
        assert behind["resync"] and behind["floor"] == shard.views.floor  # org 0's halt is not in the log
        at_floor = await shard.changes(shard.epoch, shard.views.floor, 0)
        assert not at_floor["resync"]
        # The snapshot: org 0 from Postgres, stamped with the snapshot's position.
        position = (shard.epoch, shard.views.seq)
        page = await shard.views_page(None, 100, "", position)
        records = {r.org_id: r for r in map(RECORD_DECODER.decode, page["views"])}
        assert set(records) == set(ids)
        assert records[ids[0]].view.halted == "admin" and records[ids[0]].seq == position[1]
        assert not shard.orgs  # nothing was loaded for it
        reader.reset(0, shard.epoch, 0, every=True)
        reader.apply_all(list(records.values()))
        assert reader.get(ids[0]).view.halted == "admin"
        # A later change of org 0 still wins over the stamped record.
        (credited,) = await shard.submit([(ids[0], Credit("grant", 1_000), fingerprint(Credit("grant", 1_000)))])
        assert "error" not in credited, credited
        later = await shard.changes(shard.epoch, position[1], 0)
        reader.advance(0, later["epoch"], later["seq"], [RECORD_DECODER.decode(line) for line in later["views"]])
        assert reader.get(ids[0]).seq > position[1] and reader.get(ids[0]).view.balance_micros > 0
    finally:
        shard.loop_task.cancel()
        await asyncio.gather(shard.loop_task, return_exceptions=True)
        await shard.pool.close()


def test_a_bounded_view_log_makes_readers_behind_it_reload_and_serves_dropped_orgs_from_postgres(shard_database):
    asyncio.run(_scenario(shard_database))


async def _committing_scenario(url: str) -> None:
    import asyncpg

    settings = Settings(database_url=url, shards=1, catalog=CATALOG_PATH, service_token="s" * 20,
                        admin_token="a" * 20, org_token_secret="o" * 32)
    org_id = "org_vl_committing"
    create = CreateOrg(f"{org_id}@example.test", "payg", True)
    shard = ShardActor(0, settings.model_dump_json())
    await shard.ready()
    blocker = await asyncpg.connect(url)
    try:
        # The commit waits behind this lock (its INSERT INTO orgs): memory holds the new org, Postgres not yet.
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("LOCK TABLE orgs IN SHARE MODE")
        cursor = shard.views.seq
        created = asyncio.ensure_future(shard.submit([(org_id, create, fingerprint(create))]))
        for _ in range(200):
            if org_id in shard.committing and org_id in shard.orgs:
                break
            await asyncio.sleep(0.02)
        assert org_id in shard.committing and org_id in shard.orgs, "the org is not being committed"
        created.cancel()  # the caller gave up (a timeout, a dropped request): its future is done
        await asyncio.gather(created, return_exceptions=True)
        assert org_id not in shard.unanswered  # only `committing` says the commit is not over
        # Readers while the creation is uncommitted: the ingress's view read and the snapshot page.
        (read,) = await shard.gate_views([org_id])
        page = await shard.views_page(None, 100)
        assert RECORD_DECODER.decode(read["view"]).seq == 0  # memory, for that answer only
        assert shard.views.line(org_id) is None, "an uncommitted org was published to the view log"
        assert shard.views.seq == cursor and (await shard.changes(shard.epoch, cursor, 0))["views"] == []
        assert all(RECORD_DECODER.decode(line).org_id != org_id for line in page["views"])
        await hold.rollback()
        later = await shard.changes(shard.epoch, cursor, 5)
        (record,) = [r for r in map(RECORD_DECODER.decode, later["views"]) if r.org_id == org_id]
        assert record.seq > cursor  # published at its commit
    finally:
        await blocker.close()
        shard.loop_task.cancel()
        await asyncio.gather(shard.loop_task, return_exceptions=True)
        await shard.pool.close()


def test_no_read_publishes_the_state_of_a_command_being_committed(shard_database):
    """A read during a commit (the snapshot page, the ingress's view read) publishes nothing of
    the orgs in the batch, also when the caller gave up waiting: their memory is ahead of
    Postgres until the commit ends, and a record in the log is what every gateway follows
    (actors/shard.py `committing`)."""
    asyncio.run(_committing_scenario(shard_database))
