"""Retention and folding against real Postgres: each job deletes only what nothing reads any
more, folding keeps every reader's answer, and no job holds a transaction while it calls out.

The scheduler runs as the plain object (no Ray, no shards: these jobs need neither) on a
database of its own: the embedded Postgres, or one on METERGATE_DATABASE_URL's server.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from actors import jobs
from actors.clock import now_us
from actors.jobs import JOB, METER_GRACE_S, METER_LOOKBACK_S, SchedulerActor
from actors.months import summarize_months
from actors.retry import US_PER_S
from config.settings import Settings
from storage import http_idempotency, inbound_webhooks, ledger, meter_events, outbox, usage
from storage.db import create_pool
from storage.journal import CommitBatch, write_batch
from storage.times import dt_to_us, us_to_dt
from tests.helpers import OUTBOUND_SECRET, migrated_database

DAY_US = 86_400 * US_PER_S
HOUR_US = 3_600 * US_PER_S
MINUTE_US = 60 * US_PER_S


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    """A new, migrated database; dropped (or its server stopped) at the end."""
    yield from migrated_database(tmp_path_factory.mktemp("retention"), "retention")


def scheduler_on(url: str, webhook_urls: str = "", **update) -> SchedulerActor:
    settings = Settings(database_url=url, jobs_enabled=False, webhook_urls=webhook_urls,
                        webhook_secret=OUTBOUND_SECRET, **update)
    return SchedulerActor(settings.model_dump_json(), [0])  # built outside a loop: it starts nothing


async def started(scheduler: SchedulerActor) -> SchedulerActor:
    """The plain scheduler with its pool and no router (the jobs tested here use no shard)."""
    scheduler.pool = await create_pool(scheduler.settings.database_url)
    scheduler.started = asyncio.get_running_loop().create_future()
    scheduler.started.set_result(None)
    return scheduler


def run(url: str, body, **settings):
    """Run `body(scheduler, conn)` with a started scheduler and a connection of the test's."""
    built = scheduler_on(url, **settings)

    async def go():
        scheduler = await started(built)
        conn = await asyncpg.connect(url)
        try:
            return await body(scheduler, conn)
        finally:
            await conn.close()
            await scheduler.pool.close()

    return asyncio.run(go())


def ago(days: float) -> object:
    return us_to_dt(now_us() - int(days * DAY_US))


# ----- retention ----------------------------------------------------------------------------


def test_outbox_retention_deletes_old_delivered_and_dead_events_and_never_a_pending_one(database_url):
    org = f"org_{uuid.uuid4().hex[:8]}"

    async def body(scheduler, conn):
        ids = {}
        for name, status, finished_days in (("pending_old", "pending", 400), ("delivered_old", "delivered", 8),
                                            ("delivered_new", "delivered", 6), ("dead_old", "dead", 31),
                                            ("dead_new", "dead", 8)):
            ids[name] = await conn.fetchval(
                "INSERT INTO outbox (org_id, type, payload, created_at, status, next_attempt_at, delivered_at)"
                " VALUES ($1, $2, '{}', $3, $4, $3, CASE WHEN $4::text = 'delivered' THEN $3::timestamptz END)"
                " RETURNING id",
                org, name, ago(finished_days), status)
        result = await scheduler.retention()
        left = {r["type"] for r in await conn.fetch("SELECT type FROM outbox WHERE org_id = $1", org)}
        listed = {e.type for status in ("delivered", "dead") for e in await outbox.by_status(conn, status, 100)}
        due = {e.type for e in await outbox.due(conn, now_us(), 100)}
        await conn.execute("DELETE FROM outbox WHERE org_id = $1", org)  # not for the delivery test below
        return result, left, listed, due

    result, left, listed, due = run(database_url, body)
    assert result["outbox"] == 2
    assert left == {"pending_old", "delivered_new", "dead_new"}
    assert listed == {"delivered_new", "dead_new"}  # `metergate outbox list` still shows what is kept
    assert due == {"pending_old"}  # a pending event, however old, is still delivered


def test_idempotency_answers_are_kept_for_their_retention_and_then_a_key_runs_again(database_url):
    scope = f"org:{uuid.uuid4().hex[:8]}"

    async def body(scheduler, conn):
        for key, days in (("old", 8), ("new", 6)):
            await conn.execute("INSERT INTO http_idempotency (scope, key, request_hash, status, body, created_at)"
                               " VALUES ($1, $2, 'h', 200, 'first', $3)", scope, key, ago(days))
        result = await scheduler.retention()
        new = await http_idempotency.claim(conn, scope, "new", "h", 120)
        old = await http_idempotency.claim(conn, scope, "old", "h", 120)
        return result, new, old

    result, new, old = run(database_url, body)
    assert result["idempotency"] == 1
    assert new is not None and new.body == b"first"  # a retry within 7 days gets the first answer
    assert old is None  # past it, the key is new again: claimed for this request


def test_inbound_webhook_ids_are_kept_past_stripes_retries_then_deleted(database_url):
    prefix = f"evt_{uuid.uuid4().hex[:8]}"

    async def body(scheduler, conn):
        for name, days, outcome in (("old", 31, "dead_letter"), ("retried", 3.9, "dead_letter"), ("new", 1, "applied")):
            await inbound_webhooks.remember(conn, "stripe", f"{prefix}_{name}", "charge.refunded", 200, {"ok": 1},
                                            outcome, "unknown_org" if outcome == "dead_letter" else None)
            await conn.execute("UPDATE inbound_webhooks SET received_at = $2 WHERE event_id = $1",
                               f"{prefix}_{name}", ago(days))
        result = await scheduler.retention()
        answers = {name: await inbound_webhooks.first_answer(conn, "stripe", f"{prefix}_{name}")
                   for name in ("old", "retried", "new")}
        listed = {e.event_id for e in await inbound_webhooks.unapplied_page(conn, "stripe", ("dead_letter",), None, 50)}
        return result, answers, listed

    # At the shortest retention allowed: 4 days, one more than Stripe retries a delivery.
    result, answers, listed = run(database_url, body, inbound_webhook_retention_s=4 * 86_400)
    assert result["inbound_webhooks"] == 1
    assert answers["old"] is None
    assert answers["retried"] == (200, {"ok": 1}) and answers["new"] == (200, {"ok": 1})  # still a duplicate
    assert f"{prefix}_retried" in listed and f"{prefix}_old" not in listed


def test_settled_meter_events_go_after_the_roll_up_window_and_are_never_made_again(database_url):
    """At the shortest retention allowed (36 days): the roll-up looks back 35, so the hour of a
    deleted event is never rolled up again (it would be billed twice)."""
    org = f"org_{uuid.uuid4().hex[:8]}"
    hour_us = (now_us() - int(36.5 * DAY_US)) // HOUR_US * HOUR_US
    fresh_us = (now_us() - 3 * DAY_US) // HOUR_US * HOUR_US

    async def body(scheduler, conn):
        for n, (at_us, status) in enumerate(((hour_us, "sent"), (hour_us, "dead"), (hour_us, "pending"),
                                             (fresh_us, "sent"))):
            await conn.execute("INSERT INTO meter_events (identifier, org_id, meter, hour, value, status)"
                               " VALUES ($1, $2, 'usage_micros', $3, 5, $4)", f"{org}_{n}", org, us_to_dt(at_us),
                               status)
            await conn.execute(
                "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at,"
                " invoiced_micros) VALUES ($1, $2, 'usage', 0, $3, $3, 5) ON CONFLICT DO NOTHING",
                f"lu_{org}_{at_us}", org, us_to_dt(at_us))
        result = await scheduler.retention()
        now = now_us()
        await meter_events.roll_up(conn, now - METER_GRACE_S * US_PER_S, now - METER_LOOKBACK_S * US_PER_S,
                                   None, "pending")
        left = sorted((r["status"], dt_to_us(r["hour"]) == hour_us)
                      for r in await conn.fetch("SELECT status, hour FROM meter_events WHERE org_id = $1", org))
        return result, left

    result, left = run(database_url, body, meter_event_retention_s=36 * 86_400)
    assert result["meter_events"] == 1
    # Nothing made again, old or new: the old hour is past the roll-up's window, and the fresh
    # hour's sent event is kept and counted.
    assert left == [("dead", True), ("pending", True), ("sent", False)]


def test_a_retention_run_deletes_a_bounded_batch_and_later_runs_take_the_rest(database_url, monkeypatch):
    scope = f"bulk:{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(jobs, "RETENTION_BATCH", 7)

    async def body(scheduler, conn):
        await conn.execute("INSERT INTO http_idempotency (scope, key, request_hash, status, body, created_at)"
                           " SELECT $1, n::text, 'h', 200, '', $2 FROM generate_series(1, 20) n", scope, ago(30))
        counts = [(await scheduler.retention())["idempotency"] for _ in range(4)]
        return counts, await conn.fetchval("SELECT count(*) FROM http_idempotency WHERE scope = $1", scope)

    counts, left = run(database_url, body)
    assert counts == [7, 7, 6, 0] and left == 0


# ----- folding ------------------------------------------------------------------------------


async def readers_of(conn, org: str) -> dict:
    """What every reader of an org's usage rows answers: the balance, the months, the meter
    roll-up's per-hour input, and the billing page's ledger totals."""
    history = await ledger.history(conn, org)
    months, ends = summarize_months(history, {}, now_us())
    hours = await conn.fetch(
        "SELECT date_trunc('hour', usage_minute) AS h, sum(invoiced_micros)::int8 AS v FROM ledger"
        " WHERE org_id = $1 AND invoiced_micros > 0 GROUP BY 1 ORDER BY 1", org)
    page = await ledger.page(conn, org, None, 10_000)
    return {"sum": await conn.fetchval("SELECT sum(amount_micros)::int8 FROM ledger WHERE org_id = $1", org),
            "months": months, "carry": {k: v.to_json() for k, v in ends.items()},
            "meter_hours": [(r["h"], r["v"]) for r in hours],
            "page_kinds": [e.kind for e in page if e.kind != "usage"],
            "page_total": sum(e.amount_micros for e in page), "page_invoiced": sum(e.invoiced_micros for e in page)}


async def write_history(conn, org: str, rng: random.Random, start_us: int, hours: int) -> None:
    """Usage minutes (sometimes invoiced) with grants, top-ups and expirations in between,
    some inside an hour of usage and some on the very microsecond of a usage row."""
    rows = []
    for minute in range(hours * 60):
        if rng.random() < 0.7:
            at_us = start_us + minute * MINUTE_US + rng.randrange(MINUTE_US)
            rows.append((f"lu_{org}_{start_us + minute * MINUTE_US}", "usage", -rng.randrange(1, 5_000), us_to_dt(at_us // MINUTE_US *
                         MINUTE_US), us_to_dt(at_us), rng.choice((0, 0, rng.randrange(1, 900)))))
            if rng.random() < 0.03:
                kind = rng.choice(("grant", "topup", "expiration", "refund"))
                amount = rng.randrange(1, 90_000) * (-1 if kind in ("expiration", "refund") else 1)
                same = rng.random() < 0.5
                rows.append((f"le_{org}_{at_us}", kind, amount, None,
                             us_to_dt(at_us if same else at_us + rng.randrange(1, 30) * US_PER_S), 0))
    await conn.executemany(
        "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at, invoiced_micros,"
        " grant_id) VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $3 <> 'usage' THEN 'g1' END)",
        [(entry_id, org, kind, amount, minute, at, invoiced) for entry_id, kind, amount, minute, at, invoiced in rows])


def test_folding_keeps_each_orgs_sum_months_meter_hours_and_ledger_totals(database_url):
    rng = random.Random(25)
    orgs = [f"fold_{uuid.uuid4().hex[:8]}_{n}" for n in range(6)]
    old_us = (now_us() - 70 * DAY_US) // HOUR_US * HOUR_US - 5 * HOUR_US  # crosses a day, maybe a month
    recent_us = (now_us() - 1 * DAY_US) // HOUR_US * HOUR_US

    async def body(scheduler, conn):
        for org in orgs:
            await write_history(conn, org, rng, old_us, 8)
            await write_history(conn, org, rng, recent_us, 2)
        before = {org: await readers_of(conn, org) for org in orgs}
        rows_before = await conn.fetchval("SELECT count(*) FROM ledger WHERE org_id = ANY($1)", orgs)
        recent_before = await conn.fetch("SELECT * FROM ledger WHERE org_id = ANY($1) AND created_at >= $2"
                                         " ORDER BY entry_id", orgs, us_to_dt(recent_us))
        first = await scheduler.fold_usage()
        rows_after = await conn.fetchval("SELECT count(*) FROM ledger WHERE org_id = ANY($1)", orgs)
        after = {org: await readers_of(conn, org) for org in orgs}
        recent_after = await conn.fetch("SELECT * FROM ledger WHERE org_id = ANY($1) AND created_at >= $2"
                                        " ORDER BY entry_id", orgs, us_to_dt(recent_us))
        await conn.execute("UPDATE ledger_fold SET next_hour = NULL")  # fold it all again: nothing moves
        again = await scheduler.fold_usage()
        rows_again = await conn.fetchval("SELECT count(*) FROM ledger WHERE org_id = ANY($1)", orgs)
        # Each org-hour keeps one usage row per run of them: at most one more than the other
        # entries within the hour.
        per_hour = await conn.fetchval(
            "SELECT count(*) FROM (SELECT org_id, date_trunc('hour', usage_minute) AS h, count(*) AS n FROM ledger"
            " WHERE org_id = ANY($1) AND usage_minute < $2 GROUP BY 1, 2) u"
            " WHERE u.n > 1 + (SELECT count(*) FROM ledger e WHERE e.org_id = u.org_id AND e.usage_minute IS NULL"
            " AND e.created_at >= u.h AND e.created_at < u.h + interval '1 hour')", orgs, us_to_dt(recent_us))
        return before, after, first, again, rows_before, rows_after, rows_again, recent_before, recent_after, \
            per_hour

    before, after, first, again, rows_before, rows_after, rows_again, recent_before, recent_after, per_hour = \
        run(database_url, body)
    assert first["deleted"] > 1_000 and rows_after == rows_before - first["deleted"]
    for org in orgs:
        assert after[org] == before[org], org
    assert [dict(r) for r in recent_after] == [dict(r) for r in recent_before]  # a day old: not folded
    assert again["deleted"] == 0 and again["folded"] == 0 and rows_again == rows_after
    assert per_hour == 0


def test_folding_runs_beside_the_shards_upsert_of_the_current_minute(database_url):
    """The shard adds to the current minute's row in every commit; folding old hours at the
    same time neither blocks it nor loses a micro of it."""
    org = f"busy_{uuid.uuid4().hex[:8]}"
    old_us = (now_us() - 50 * DAY_US) // HOUR_US * HOUR_US

    async def body(scheduler, conn):
        await write_history(conn, org, random.Random(7), old_us, 24)
        # Written behind the hour folding has reached (no shard ever does): start it again.
        await conn.execute("UPDATE ledger_fold SET next_hour = NULL")
        total = await conn.fetchval("SELECT sum(amount_micros)::int8 FROM ledger WHERE org_id = $1", org)
        writer = await asyncpg.connect(scheduler.settings.database_url)
        commits = 0

        async def shard_commits():
            nonlocal commits
            while not folding.done():
                batch = CommitBatch()
                batch.usage_debits[(org, now_us() // MINUTE_US * MINUTE_US)] = [-3, now_us(), 1]
                async with writer.transaction():
                    await write_batch(writer, batch)
                commits += 1
                await asyncio.sleep(0)

        folding = asyncio.ensure_future(scheduler.fold_usage())
        await asyncio.gather(folding, shard_commits())
        await writer.close()
        return total, commits, folding.result(), await conn.fetchval(
            "SELECT sum(amount_micros)::int8 FROM ledger WHERE org_id = $1", org)

    total, commits, folded, after = run(database_url, body)
    assert folded["deleted"] > 500 and commits > 0
    assert after == total - 3 * commits


# ----- usage detail: usage_rollups folded per (org, lease, hour) ----------------------------

ROLLUP_SUMS = "sum(memory_mb_ms)::int8, sum(cpu_ms)::int8, sum(disk_mb_ms)::int8, sum(ticks)::int8," \
              " sum(cost_scaled), sum(duration_ms)::int8"


async def write_rollups(conn, org: str, rng: random.Random, start_us: int, hours: int) -> None:
    """Rollups of three leases over `hours` from `start_us` (an hour's start): some minutes
    empty, some leases with a row only at an hour's start, units on some rows, exact costs
    too large for a float."""
    rows = []
    for minute in range(hours * 60):
        for lease in ("a", "b", "c"):
            if rng.random() < (0.9 if minute % 60 == 0 else 0.5) and not (lease == "c" and minute % 60 != 0):
                units = rng.choice((None, None, f'{{"gpu_s": {rng.randrange(1, 99)}, "req": {rng.randrange(9)}.5}}',
                                    f'{{"req": {rng.randrange(1, 9)}}}'))
                rows.append((org, us_to_dt(start_us + minute * MINUTE_US), f"{org}_{lease}", rng.randrange(10**9),
                             rng.randrange(10**6), rng.randrange(10**9), rng.randrange(1, 60),
                             rng.randrange(10**20) * 10**6 + rng.randrange(10**6), units, rng.randrange(60_000)))
    await conn.executemany(
        "INSERT INTO usage_rollups (org_id, minute, lease_id, memory_mb_ms, cpu_ms, disk_mb_ms, ticks, cost_scaled,"
        " units, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::numeric, $9::jsonb, $10)", rows)


async def rollup_readers(conn, org: str, windows: list[tuple[int, int]]) -> dict:
    """What every reader of an org's rollups answers over whole hours: totals per org, lease,
    hour, day and month, units per lease and hour, the usage report (lease, meter, day), the
    billing page's costliest leases and the months' lease time, for each hour-aligned window."""
    async def fetch(query: str):
        return [tuple(r) for r in await conn.fetch(query, org)]

    answers = {
        "org": await fetch(f"SELECT {ROLLUP_SUMS} FROM usage_rollups WHERE org_id = $1"),
        "lease": await fetch(f"SELECT lease_id, {ROLLUP_SUMS} FROM usage_rollups WHERE org_id = $1"
                             " GROUP BY 1 ORDER BY 1"),
        "hour": await fetch(f"SELECT date_trunc('hour', minute AT TIME ZONE 'UTC'), {ROLLUP_SUMS} FROM usage_rollups"
                            " WHERE org_id = $1 GROUP BY 1 ORDER BY 1"),
        "month": await fetch(f"SELECT date_trunc('month', minute AT TIME ZONE 'UTC'), {ROLLUP_SUMS} FROM usage_rollups"
                             " WHERE org_id = $1 GROUP BY 1 ORDER BY 1"),
        "units": await fetch("SELECT lease_id, date_trunc('hour', minute AT TIME ZONE 'UTC') AS h, k, sum(v::numeric)"
                             " FROM usage_rollups, jsonb_each_text(units) AS u(k, v) WHERE org_id = $1"
                             " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"),
        "months_lease_ms": await usage.lease_ms_by_month(conn, org),
        "report_all": [await usage.report(conn, org, g, None, None) for g in ("lease", "meter", "day")],
    }
    for from_us, to_us in windows:
        answers[(from_us, to_us)] = (
            [await usage.report(conn, org, g, from_us, to_us) for g in ("lease", "meter", "day")],
            await usage.lease_costs(conn, org, from_us, to_us, 2), await usage.lease_ms_by_month(conn, org, from_us))
    return answers


def old_month_edge_us() -> int:
    """Three hours before the start of a month that began more than 38 days ago."""
    t = us_to_dt(now_us() - 38 * DAY_US)
    return dt_to_us(t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)) - 3 * HOUR_US


def test_rollup_fold_keeps_every_whole_hour_sum_and_bounds_the_rows(database_url, monkeypatch):
    """Seven hours across a month's (and day's) edge, 38+ days old, fold into one row per (org,
    lease, hour); every sum and every reader's answer over whole hours is unchanged; yesterday's
    minutes are left; runs fold a bounded number of hours each; a second fold moves nothing."""
    monkeypatch.setattr(jobs, "FOLD_HOURS_PER_RUN", 3)
    rng = random.Random(2025)
    orgs = [f"roll_{uuid.uuid4().hex[:8]}_{n}" for n in range(4)]
    old_us = old_month_edge_us()
    recent_us = (now_us() - 1 * DAY_US) // HOUR_US * HOUR_US
    windows = [(old_us, old_us + 7 * HOUR_US), (old_us + HOUR_US, old_us + 4 * HOUR_US),
               (old_us + 3 * HOUR_US, old_us + 4 * HOUR_US), (old_us - 5 * HOUR_US, recent_us + HOUR_US)]
    windows += [tuple(sorted(rng.sample(range(old_us, old_us + 8 * HOUR_US, HOUR_US), 2))) for _ in range(6)]

    async def body(scheduler, conn):
        for org in orgs:
            await write_rollups(conn, org, rng, old_us, 7)
            await write_rollups(conn, org, rng, recent_us, 2)
        await conn.execute("UPDATE usage_rollup_fold SET next_hour = NULL")  # written behind the watermark
        before = {org: await rollup_readers(conn, org, windows) for org in orgs}
        count = "SELECT count(*) FROM usage_rollups WHERE org_id = ANY($1) AND minute < $2"
        old_before = await conn.fetchval(count, orgs, us_to_dt(recent_us))
        recent = "SELECT * FROM usage_rollups WHERE org_id = ANY($1) AND minute >= $2 ORDER BY org_id, lease_id, minute"
        recent_before = [dict(r) for r in await conn.fetch(recent, orgs, us_to_dt(recent_us))]
        runs = []
        while (done := await scheduler.fold_rollups())["hours"]:
            runs.append(done)
        after = {org: await rollup_readers(conn, org, windows) for org in orgs}
        old_after = await conn.fetchval(count, orgs, us_to_dt(recent_us))
        recent_after = [dict(r) for r in await conn.fetch(recent, orgs, us_to_dt(recent_us))]
        off_hour = await conn.fetchval(
            "SELECT count(*) FROM usage_rollups WHERE org_id = ANY($1) AND minute < $2"
            " AND minute <> date_trunc('hour', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", orgs, us_to_dt(recent_us))
        # A window bound inside a folded hour counts the whole hour at its start.
        inside = (await usage.report(conn, orgs[0], "meter", old_us + 30 * MINUTE_US, old_us + HOUR_US),
                  await usage.report(conn, orgs[0], "meter", old_us, old_us + 30 * MINUTE_US),
                  await usage.report(conn, orgs[0], "meter", old_us, old_us + HOUR_US))
        await conn.execute("UPDATE usage_rollup_fold SET next_hour = NULL")  # fold it all again: nothing moves
        again = []
        while (done := await scheduler.fold_rollups())["hours"]:
            again.append(done)
        old_again = await conn.fetchval(count, orgs, us_to_dt(recent_us))
        return before, after, old_before, old_after, old_again, recent_before, recent_after, runs, again, off_hour, \
            inside

    before, after, old_before, old_after, old_again, recent_before, recent_after, runs, again, off_hour, inside = \
        run(database_url, body)
    for org in orgs:
        assert after[org] == before[org], org
    assert old_after <= 4 * 3 * 7 < old_before / 10, (old_before, old_after)  # one row per org, lease and hour
    assert off_hour == 0
    assert recent_after == recent_before  # a day old: minute detail kept
    assert len(runs) >= 3 and all(r["hours"] <= 3 for r in runs) and sum(r["hours"] for r in runs) >= 7
    deleted, folded = sum(r["deleted"] for r in runs), sum(r["folded"] for r in runs)
    assert deleted - folded <= old_before - old_after <= deleted  # a folded row is made or added to
    assert all(r["deleted"] == 0 and r["folded"] == 0 for r in again) and old_again == old_after
    assert inside[0] == [] and inside[1] == inside[2] and inside[1][0].ticks > 0


def test_rollup_fold_keeps_minute_detail_for_the_setting_then_folds_it(database_url):
    org = f"young_{uuid.uuid4().hex[:8]}"
    start_us = (now_us() - 33 * DAY_US) // HOUR_US * HOUR_US
    count = "SELECT count(*) FROM usage_rollups WHERE org_id = $1"

    async def fold_all(scheduler, conn):
        if not await conn.fetchval(count, org):
            await write_rollups(conn, org, random.Random(3), start_us, 3)
        await conn.execute("UPDATE usage_rollup_fold SET next_hour = NULL")
        rows = await conn.fetchval(count, org)
        while (await scheduler.fold_rollups())["hours"]:
            pass
        return rows, await conn.fetchval(count, org)

    rows, kept = run(database_url, fold_all)  # the default: 35 days
    assert kept == rows > 100  # 33 days old: minute detail kept
    rows, folded = run(database_url, fold_all, usage_detail_days=32)
    assert folded <= 3 * 3 < rows


def test_rollup_fold_runs_beside_the_shards_upsert_of_the_current_minute(database_url):
    """The shard adds to the current minute's rollup in every commit; folding old hours at the
    same time neither blocks it nor loses a tick of it."""
    org = f"busyroll_{uuid.uuid4().hex[:8]}"
    old_us = (now_us() - 50 * DAY_US) // HOUR_US * HOUR_US

    async def body(scheduler, conn):
        await write_rollups(conn, org, random.Random(9), old_us, 24)
        await conn.execute("UPDATE usage_rollup_fold SET next_hour = NULL")
        total = await conn.fetchval("SELECT sum(ticks)::int8 FROM usage_rollups WHERE org_id = $1", org)
        writer = await asyncpg.connect(scheduler.settings.database_url)
        commits = 0

        async def shard_commits():
            nonlocal commits
            while not folding.done():
                batch = CommitBatch()
                batch.rollups[(org, now_us() // MINUTE_US * MINUTE_US, f"{org}_a")] = (1, 1, 1, 2, 5, '{"req": 1}', 10)
                async with writer.transaction():
                    await write_batch(writer, batch)
                commits += 1
                await asyncio.sleep(0)

        folding = asyncio.ensure_future(scheduler.fold_rollups())
        await asyncio.gather(folding, shard_commits())
        await writer.close()
        return total, commits, folding.result(), await conn.fetchval(
            "SELECT sum(ticks)::int8 FROM usage_rollups WHERE org_id = $1", org)

    total, commits, folded, after = run(database_url, body)
    assert folded["hours"] == jobs.FOLD_HOURS_PER_RUN and folded["deleted"] > 500 and commits > 0
    assert after == total + 2 * commits


# ----- no transaction across a network call -------------------------------------------------


def test_outbox_delivery_holds_no_transaction_while_the_receiver_answers(database_url, receiver):
    """Regression: each job ran in a transaction (for a transaction-level advisory lock), so a
    slow receiver kept a backend 'idle in transaction' and vacuum waited behind it."""
    org = f"slow_{uuid.uuid4().hex[:8]}"
    receiver.hold_s[org] = 1.5

    async def body(scheduler, conn):
        await conn.execute("INSERT INTO outbox (org_id, type, payload, created_at)"
                           " VALUES ($1, 'org.halted', jsonb_build_object('org_id', $1::text), now())", org)
        delivering = asyncio.ensure_future(scheduler.deliver_outbox())
        for _ in range(500):  # the receiver holds each of the org's deliveries for 1.5 s
            if receiver.arrived.get(org) or delivering.done():
                break
            await asyncio.sleep(0.02)
        assert receiver.arrived.get(org), delivering.result() if delivering.done() else "no delivery in 10 s"
        states = await conn.fetch("SELECT pid, state FROM pg_stat_activity WHERE datname = current_database()"
                                  " AND pid <> pg_backend_pid()")
        held = await conn.fetchval(LOCKS_HERE + " AND granted", JOB["outbox"].lock)
        second = await asyncio.to_thread(second_scheduler, scheduler.settings.database_url)
        result = await delivering
        released = await conn.fetchval(LOCKS_HERE, JOB["outbox"].lock)
        return states, held, second, result, released

    states, held, second, result, released = run(database_url, body, webhook_urls=receiver.url)
    assert states and all(not (s["state"] or "").startswith("idle in transaction") for s in states), states
    assert held == 1 and second is None  # still one runner at a time: a second scheduler skips the job
    assert result["delivered"] == 1 and released == 0


LOCKS_HERE = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
              " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


def second_scheduler(url: str) -> dict | None:
    """Another scheduler's run of the outbox job, in a thread and event loop of its own."""
    built = scheduler_on(url, webhook_urls="http://127.0.0.1:9/never")

    async def go():
        scheduler = await started(built)
        try:
            return await scheduler.deliver_outbox()
        finally:
            await scheduler.pool.close()

    return asyncio.run(go())


# ----- bounded reads ------------------------------------------------------------------------


def test_a_ledger_page_far_back_and_a_30_day_report_read_only_their_rows_under_a_generic_plan(database_url):
    """Regression (found by bench/year.py): "$2 IS NULL OR ..." in the ledger page and the usage
    report let the generic plan, which Postgres keeps for a prepared statement after five
    runs, read every newer entry (every rollup) of the org instead of starting at the cursor."""
    org = f"long_{uuid.uuid4().hex[:8]}"
    now = now_us() // MINUTE_US * MINUTE_US

    async def body(scheduler, conn):
        await ledger.write_usage_history(conn, org, now, 5_000)
        await conn.execute(
            "INSERT INTO usage_rollups (org_id, minute, lease_id, memory_mb_ms, cpu_ms, disk_mb_ms, ticks, cost_scaled)"
            " SELECT $1, $2::timestamptz - n * interval '1 minute', 'l', 1, 1, 1, 1, 1"
            " FROM generate_series(1, 5000) n", org, us_to_dt(now))
        await conn.execute("ANALYZE ledger; ANALYZE usage_rollups")
        cursor = (now - 4_000 * MINUTE_US, "")
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            page = await ledger.page(conn, org, cursor, 50)
            report = await usage.report(conn, org, "meter", now - 4_030 * MINUTE_US, now - 4_000 * MINUTE_US)
            # Rows this transaction read, through indexes or scans, per table.
            read = {r["relname"]: r["n"] for r in await conn.fetch(
                "SELECT relname, coalesce(idx_tup_fetch, 0) + seq_tup_read AS n FROM pg_stat_xact_user_tables"
                " WHERE relname IN ('ledger', 'usage_rollups')")}
        return page, report, read

    page, report, read = run(database_url, body)
    assert len(page) == 51 and page[0].created_us < now - 4_000 * MINUTE_US
    assert report[0].ticks == 30
    assert read["ledger"] <= 60, read
    assert read["usage_rollups"] <= 40, read
