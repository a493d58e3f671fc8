"""A year of data for 10k orgs, retention and folding run until they settle, and the hot
queries' plans and times on it, against a small database in the same run (the baseline).

Generated straight into an embedded Postgres with generate_series (no service, no shard):
orgs with snapshots, journal tails and due times; a ledger with a signup grant, a top-up a
month (a Stripe payment each) and usage rows per minute; outbox events, Idempotency-Key
answers, inbound Stripe event ids, meter events for the postpaid orgs (one in five); and one
busy org ("big") with a usage row and a rollup row every minute of the year.

Scaled down for a 2-core machine (and said in the output): a real org busy all day writes a
usage row every minute (~525k a year); here each org has `--usage-hours` busy hours a year
(60 rows each) and only "big" is busy every minute; outbox, idempotency and inbound rates
are per org and day as given. Rollups are generated for "big" only (what the billing page
reads); the fold_rollups job folds them to one per lease and hour past 35 days.

Then: the retention and fold jobs run (the scheduler's own job functions, through its
session-locked path) until a run finds nothing; VACUUM ANALYZE; the same queries again.
Run: flock /tmp/metergate-service.lock .venv/bin/python -m bench.year [--orgs 10000] [--days 365]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from actors.clock import now_us
from actors.jobs import METER_GRACE_S, METER_LOOKBACK_S, SchedulerActor
from actors.months import month_of, month_start_us, next_month, summarize_months
from config.settings import Settings
from storage import due, journal, ledger, meter_events, months, outbox, usage
from storage.db import create_pool, migrate, start_embedded_postgres, stop_embedded_postgres
from storage.times import us_to_dt

DAY_US = 86_400_000_000
TABLES = ("orgs", "org_snapshots", "org_journal", "org_due", "ledger", "usage_rollups", "outbox", "http_idempotency",
          "inbound_webhooks", "meter_events", "stripe_customers")


async def generate(conn: asyncpg.Connection, orgs: int, days: int, now: int, usage_hours: int, outbox_per_day: float,
                   keys_per_day: float, stripe_events_per_day: float) -> None:
    start = us_to_dt(now - days * DAY_US)
    end = us_to_dt(now)
    hours = days * 24
    await conn.execute(
        "INSERT INTO orgs (org_id, email, billing_mode, slot, created_at) SELECT 'o' || n, 'o' || n || '@example.com',"
        " CASE WHEN n % 5 = 0 THEN 'postpaid' ELSE 'prepaid' END, n % 1024, $2::timestamptz FROM generate_series(1, $1) n"
        " UNION ALL SELECT 'big', 'big@example.com', 'postpaid', 7, $2::timestamptz", orgs, start)
    await conn.execute("INSERT INTO org_snapshots (org_id, seq, state) SELECT org_id, 10,"
                       " decode(repeat(md5(org_id), 48), 'hex') FROM orgs")
    await conn.execute("INSERT INTO org_journal (org_id, seq, entry) SELECT org_id, 10 + s,"
                       " decode(repeat(md5(org_id || s), 6), 'hex') FROM orgs, generate_series(1, 3) s")
    # 1% due now; the others within the next month (a period end, an expiry).
    await conn.execute("INSERT INTO org_due (org_id, due_at) SELECT org_id, $1::timestamptz + CASE WHEN"
                       " hashtext(org_id) % 100 = 0 THEN interval '-1 minute' ELSE (abs(hashtext(org_id)) % 2592000)"
                       " * interval '1 second' END FROM orgs", end)
    await conn.execute("INSERT INTO stripe_customers (org_id, customer_id) SELECT org_id, 'cus_' || org_id FROM orgs"
                       " WHERE billing_mode = 'postpaid'")
    # A signup grant, and a top-up (a Stripe payment) at the start of every month.
    await conn.execute(
        "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, grant_id, idempotency_key, created_at)"
        " SELECT 'le_' || org_id || '_' || m, org_id, CASE WHEN m = 0 THEN 'signup_grant' ELSE 'topup' END,"
        " 20000000, 'gr_' || m, CASE WHEN m > 0 THEN 'stripe:payment:pi_' || org_id || '_' || m END,"
        " $1::timestamptz + m * interval '30 days' + (abs(hashtext(org_id)) % 86400) * interval '1 second'"
        " FROM orgs, generate_series(0, $2::int / 30) m"
        " WHERE $1::timestamptz + m * interval '30 days' < $3", start, days, end)
    # Busy hours spread over the year per org; a usage row per minute of each.
    await conn.execute(
        "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at, invoiced_micros)"
        " SELECT 'lu_' || o.org_id || '_' || extract(epoch FROM m)::bigint, o.org_id, 'usage', -(1 + (k * 61 + mi) % 997),"
        " m, m + interval '5 seconds', CASE WHEN o.billing_mode = 'postpaid' THEN (k * 13 + mi) % 500 ELSE 0 END"
        " FROM orgs o, generate_series(0, $3::int - 1) k, generate_series(0, 59) mi,"
        " LATERAL (SELECT date_trunc('hour', $1::timestamptz) + ((k * $4::int / $3::int + abs(hashtext(o.org_id)))"
        "   % $4::int) * interval '1 hour' + mi * interval '1 minute' AS m) t"
        " WHERE o.org_id <> 'big' AND m < date_trunc('minute', $2::timestamptz)", start, end, usage_hours, hours)
    await conn.execute(
        "INSERT INTO ledger (entry_id, org_id, kind, amount_micros, usage_minute, created_at, invoiced_micros)"
        " SELECT 'lu_big_' || extract(epoch FROM m)::bigint, 'big', 'usage', -(1 + n % 997), m, m + interval '5 seconds',"
        " n % 300 FROM generate_series(1, $2::int * 1440) n,"
        " LATERAL (SELECT date_trunc('minute', $1::timestamptz) - n * interval '1 minute' AS m) t", end, days)
    await conn.execute(
        "INSERT INTO usage_rollups (org_id, minute, lease_id, memory_mb_ms, cpu_ms, disk_mb_ms, ticks, cost_scaled,"
        " duration_ms) SELECT 'big', date_trunc('minute', $1::timestamptz) - n * interval '1 minute',"
        " 'lease_' || (n / 1440) % 40, 60000 * 2048, 60000 * 2, 60000 * 10240, 6, 1000000 * (n % 997), 60000"
        " FROM generate_series(1, $2::int * 1440) n", end, days)
    per_org = f"generate_series(1, greatest(1, ($2::int * {{rate}})::int)) s"
    at = "($1::timestamptz - (abs(hashtext(o.org_id || s)) % ($2::int * 86400)) * interval '1 second')"
    await conn.execute(
        "INSERT INTO outbox (org_id, type, payload, created_at, status, attempts, next_attempt_at, delivered_at)"
        " SELECT o.org_id, 'balance.low', jsonb_build_object('org_id', o.org_id, 'balance_micros', s), c,"
        " CASE WHEN c > $1::timestamptz - interval '10 seconds' THEN 'pending' WHEN s % 50 = 0 THEN 'dead'"
        "  ELSE 'delivered' END, 1, c + interval '1 second', c + interval '1 second'"
        f" FROM orgs o, {per_org.format(rate=outbox_per_day)}, LATERAL (SELECT {at} AS c) t", end, days)
    await conn.execute(
        "INSERT INTO http_idempotency (scope, key, request_hash, status, body, created_at)"
        " SELECT 'org:' || o.org_id, 'k' || s, md5(o.org_id || s), 200, convert_to(repeat('{\"ok\":1}', 40), 'UTF8'),"
        f" {at} FROM orgs o, {per_org.format(rate=keys_per_day)}", end, days)
    await conn.execute(
        "INSERT INTO inbound_webhooks (source, event_id, event_type, status, response, received_at, outcome, reason)"
        " SELECT 'stripe', 'evt_' || o.org_id || '_' || s, 'invoice.paid', 200, convert_to('{\"applied\":[1]}', 'UTF8'),"
        f" {at}, CASE WHEN s % 40 = 0 THEN 'dead_letter' ELSE 'applied' END, NULL"
        f" FROM orgs o, {per_org.format(rate=stripe_events_per_day)}", end, days)
    # Every closed hour of invoiced usage already sent, with the identifier the roll-up makes.
    await conn.execute(
        "INSERT INTO meter_events (identifier, org_id, meter, hour, value, status, attempts, created_at, sent_at)"
        " SELECT 'mg_' || md5(o || '|usage_micros|' || extract(epoch FROM h)::bigint || '|0'), o, 'usage_micros', h, v,"
        " 'sent', 1, h + interval '3 minutes', h + interval '3 minutes' FROM (SELECT org_id AS o,"
        " date_trunc('hour', usage_minute) AS h, sum(invoiced_micros)::int8 AS v FROM ledger WHERE invoiced_micros > 0"
        " AND usage_minute < date_trunc('hour', $1::timestamptz) GROUP BY 1, 2) b", end)


class Explaining:
    """A connection that asks for each statement's plan before running it (the plans of the
    storage functions as they are, not copies of their SQL)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def _explain(self, query: str, args: tuple) -> None:
        analyze = query.lstrip().upper().startswith("SELECT")  # reads only: a write is planned, not run
        rows = await self.conn.fetch(("EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN ") + query, *args)
        self.plans.append("\n".join(r[0] for r in rows))

    async def fetch(self, query, *args):
        await self._explain(query, args)
        return await self.conn.fetch(query, *args)

    async def fetchrow(self, query, *args):
        await self._explain(query, args)
        return await self.conn.fetchrow(query, *args)

    async def fetchval(self, query, *args):
        await self._explain(query, args)
        return await self.conn.fetchval(query, *args)

    async def execute(self, query, *args):
        await self._explain(query, args)
        return await self.conn.execute(query, *args)


def scans(plan: str) -> list[str]:
    """The plan's scan nodes, shortened ('Index Scan using ledger_org_newest on ledger'), and
    of a read, its pages (the top node's buffers) and rows."""
    out = []
    lines = plan.splitlines()
    for line in lines:
        text = line.strip().removeprefix("->").strip()
        if "Scan" in text.split("  (")[0]:
            out.append(text.split("  (")[0])
    buffers = next((line.strip() for line in lines if line.strip().startswith("Buffers:")), None)
    if buffers and "actual" in lines[0]:
        out.append(f"[{buffers}, rows={lines[0].split('rows=')[-1].split()[0]}]")
    return out


def hot_queries(now: int, payment_ids: list[str], load_ids: list[str]) -> dict:
    """name -> async function(conn): each one what a job or the billing page runs."""
    today = now // DAY_US * DAY_US
    window = (today - 29 * DAY_US, today + DAY_US)
    this_month = month_start_us(month_of(now))
    deep = (now - 200 * DAY_US, "")
    return {
        "meter roll-up": lambda c: meter_events.roll_up(c, now - METER_GRACE_S * 1_000_000,
                                                        now - METER_LOOKBACK_S * 1_000_000, None, "shadow"),
        "meter events due": lambda c: meter_events.due(c, now, 500),
        "due sweep": lambda c: due.due_orgs(c, now, 2_000, []),
        "outbox due": lambda c: outbox.due(c, now, 200),
        "outbox gauges": lambda c: outbox.waiting_and_dead(c),
        "billing: days (30)": lambda c: usage.report(c, "big", "day", *window),
        "billing: meters (30)": lambda c: usage.report(c, "big", "meter", *window),
        "billing: leases (30)": lambda c: usage.lease_costs(c, "big", *window, 10),
        "billing: months kept": lambda c: months.closed(c, "big"),
        "billing: month's ledger": lambda c: ledger.history(c, "big", this_month),
        "billing: month's lease time": lambda c: usage.lease_ms_by_month(c, "big", this_month),
        "ledger page (newest)": lambda c: ledger.page(c, "big", None, 50),
        "ledger page (200 days back)": lambda c: ledger.page(c, "big", deep, 50),
        "credits_of_payments (100)": lambda c: ledger.credits_of_payments(c, payment_ids),
        "load_orgs (500)": lambda c: journal.load_orgs(c, load_ids),
    }


async def keep_months(conn: asyncpg.Connection, org_id: str, now: int) -> float:
    """What the first months read of an org does (serve_app/calls.py months_of): the whole
    history summarized, the months over kept. Returns its time in ms."""
    started = time.perf_counter()
    entries = await ledger.history(conn, org_id)
    lease_ms = await usage.lease_ms_by_month(conn, org_id)
    rows, ends = summarize_months(entries, lease_ms, now)
    over = [(r["month"], r, ends[r["month"]].to_json()) for r in rows
            if r["month"] in ends and month_start_us(next_month(r["month"])) + 2 * DAY_US < now]
    await months.keep(conn, org_id, over)
    return (time.perf_counter() - started) * 1000


async def time_queries(url: str, now: int, explain: bool) -> tuple[dict[str, float], dict[str, list[str]]]:
    conn = await asyncpg.connect(url)
    try:
        payment_ids = [f"pi_o{n}_{m}" for n in range(1, 101) for m in (1,)]
        load_ids = [r[0] for r in await conn.fetch("SELECT org_id FROM orgs ORDER BY md5(org_id) LIMIT 500")]
        queries = hot_queries(now, payment_ids, load_ids)
        times, plans = {}, {}
        for name, query in queries.items():
            for _ in range(6):  # warm: the pages read, and the plan Postgres keeps after five runs chosen
                await query(conn)
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                await query(conn)
                runs.append((time.perf_counter() - started) * 1000)
            times[name] = statistics.median(runs)
            if explain:
                explaining = Explaining(conn)
                await query(explaining)
                plans[name] = [s for plan in explaining.plans for s in scans(plan)]
        return times, plans
    finally:
        await conn.close()


async def counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    finally:
        await conn.close()


async def settle(url: str) -> tuple[dict, float]:
    """Retention and folding, through the scheduler's own jobs, until a run finds nothing."""
    settings = Settings(database_url=url, jobs_enabled=False)
    # Built where no event loop runs: it then starts nothing of its own (no router, no loop).
    scheduler = await asyncio.to_thread(SchedulerActor, settings.model_dump_json(), [0])
    scheduler.pool = await create_pool(url)
    scheduler.started = asyncio.get_running_loop().create_future()
    scheduler.started.set_result(None)
    totals: dict = {}
    started = time.perf_counter()
    try:
        while True:
            kept = await scheduler.retention()
            folded = await scheduler.fold_usage()
            rolled = await scheduler.fold_rollups()
            for name, n in {**kept, "ledger (folded away)": folded["deleted"],
                            "usage_rollups (folded away)": rolled["deleted"]}.items():
                totals[name] = totals.get(name, 0) + n
            if not any(kept.values()) and folded["hours"] == 0 and rolled["hours"] == 0:
                break
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
    finally:
        await scheduler.pool.close()
    return totals, time.perf_counter() - started


def named(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="metergate-year-"))
    base, server = start_embedded_postgres(folder)
    try:
        conn = await asyncpg.connect(base)
        await conn.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
        await conn.execute("SELECT pg_reload_conf()")
        for name in ("year_small", "year_big"):
            await conn.execute(f"CREATE DATABASE {name}")
        await conn.close()
        now = now_us()
        sizes = {"year_small": (args.small_orgs, args.small_days), "year_big": (args.orgs, args.days)}
        print(f"scale: {args.orgs} orgs x {args.days} days; each org {args.usage_hours} busy hours a year (60 usage rows"
              f" each; a real busy org has ~8760), 'big' busy every minute; outbox {args.outbox_per_day}, keys"
              f" {args.keys_per_day}, Stripe events {args.stripe_events_per_day} per org and day. Baseline:"
              f" {args.small_orgs} orgs x {args.small_days} days at the same rates.")
        report: dict = {}
        for name, (orgs, days) in sizes.items():
            url = named(base, name)
            await migrate(url)
            conn = await asyncpg.connect(url)
            started = time.perf_counter()
            await generate(conn, orgs, days, now, args.usage_hours, args.outbox_per_day, args.keys_per_day,
                           args.stripe_events_per_day)
            await conn.execute("VACUUM ANALYZE")
            generated_s = time.perf_counter() - started
            first_months_ms = await keep_months(conn, "big", now)
            await conn.close()
            before = await counts(url)
            times_before, _ = await time_queries(url, now, explain=False)
            deleted, settle_s = await settle(url)
            after = await counts(url)
            times_after, plans = await time_queries(url, now, explain=True)
            conn = await asyncpg.connect(url)
            await conn.execute("DELETE FROM org_months WHERE org_id = 'big'")
            first_months_after_ms = await keep_months(conn, "big", now)  # the same read on the folded ledger
            await conn.close()
            report[name] = (before, after, times_before, times_after, plans, deleted, generated_s, settle_s,
                            first_months_ms)
            print(f"{name}: generated in {generated_s:.0f} s, settled in {settle_s:.0f} s; first months read of"
                  f" 'big' (its whole history, then kept): {first_months_ms:.0f} ms per minute rows,"
                  f" {first_months_after_ms:.0f} ms folded")
        small, big = report["year_small"], report["year_big"]
        print("\nrows per table (big: before -> after retention and folding; small after)")
        for table in TABLES:
            print(f"  {table:18} {big[0][table]:>11,} -> {big[1][table]:>11,}   small {small[1][table]:>9,}")
        print(f"  deleted: {big[5]}")
        print("\nhot queries, median of 5 (ms): small | big before | big after | after / small")
        for name in small[3]:
            ratio = big[3][name] / small[3][name] if small[3][name] > 0 else float("nan")
            print(f"  {name:30} {small[3][name]:8.2f} | {big[2][name]:9.2f} | {big[3][name]:8.2f} | {ratio:6.1f}x")
        print("\nplans on big after (scans):")
        for name, found in big[4].items():
            seq = [s for s in found if s.startswith("Seq Scan") and not s.endswith(("ledger_fold", "usage_rollup_fold", "meter_money_from"))]
            print(f"  {name:30} {'; '.join(found)}{'   <-- SEQ SCAN' if seq else ''}")
    finally:
        stop_embedded_postgres(server)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--usage-hours", type=int, default=12)
    parser.add_argument("--outbox-per-day", type=float, default=0.2)
    parser.add_argument("--keys-per-day", type=float, default=0.1)
    parser.add_argument("--stripe-events-per-day", type=float, default=0.05)
    parser.add_argument("--small-orgs", type=int, default=100)
    parser.add_argument("--small-days", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
