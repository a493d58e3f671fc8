"""A shard's recovery with 100,000 orgs whose journal tails are as long as they get (issue 25).

A tail is the journal rows after an org's last snapshot; the commit that would make it
`snapshot_every_entries` (64) long writes a snapshot instead (actors/batch.py finish), so the
longest tail a restart finds is 63 entries. Two populations of ORGS orgs share one embedded
Postgres, written straight into it with COPY:

- subject ("tail_"): each org created by the real core (CreateOrg, as the shard does), its
  snapshot at seq 1 (actors/formats.encode_snapshot), then 63 journal rows at seq 2..64, each
  the items of one commit of real commands (a Credit every 8th, else one tick billed by
  actors/usage.bill_ticks), encoded by the journal encoder the shard uses; ledger rows as the
  commit writes them (one per credit, one per usage minute), so SUM(ledger) = balance.
- baseline ("base_"): the same orgs in the same state (the 63 commands applied), saved as a
  snapshot at seq 64 with no tail.

The commands hold no org id, so the 63 rows are the same bytes for every org: they are made on
one org and checked against a real application of the same commands on every 1,000th org.

Measured, each time on a fresh ShardActor in this process (memory empty, as after a restart):
  state:  every org of the population read with shard.state() in chunks of CHUNK (first use loads)
  submit: one Credit to every org with shard.submit() in chunks (loads before queueing, commits;
          for the subject that commit is the 64th entry, so it writes a snapshot per org)
Subject and baseline alternate over ROUNDS rounds. The data is put back after each run (the
Credit, and the idle snapshots housekeeping takes 2 s after a load, change it), outside the timing.

Run: flock /tmp/metergate-service.lock .venv/bin/python -m bench.recovery_tails
     (BENCH_ORGS, BENCH_ROUNDS, BENCH_CHUNK to change the size)
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
import msgspec

from actors import commands as cmd
from actors.clock import now_us
from actors.commands import CreateOrg, Credit, JournalItem, fingerprint
from actors.effects import Effects
from actors.formats import encode_journal, encode_snapshot
from actors.placement import slot_of
from actors.shard import ShardActor
from actors.ticks import Tick
from actors.timeutil import minute_us
from actors.usage import bill_ticks
from config.catalog import load_catalog
from config.settings import Settings
from storage.db import migrate, start_embedded_postgres, stop_embedded_postgres
from storage.slots import ensure_slots
from storage.times import us_to_dt

ORGS = int(os.environ.get("BENCH_ORGS", "100000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CHUNK = int(os.environ.get("BENCH_CHUNK", "1000"))
TAIL = Settings().snapshot_every_entries - 1  # 63: one more entry and the commit snapshots instead
PLAN = "payg"
CHECK_EVERY = 1_000  # every this many orgs, the template rows are checked against a real run
COPY_ORGS = 5_000  # orgs per COPY
ROUND_CREDIT_NOTE = "bench round credit"
POPULATIONS = {"base": "baseline (snapshot only)", "tail": f"subject ({TAIL}-entry tails)"}
US = 1_000_000


def org_ids(prefix: str) -> list[str]:
    return [f"{prefix}_{n:06d}" for n in range(ORGS)]


# ----- the rows ---------------------------------------------------------------------------


def created(org_id: str, catalog, at_us: int):
    """A new org as the shard creates it on CreateOrg: (org, effects)."""
    fx = Effects()
    outcome = cmd.execute(None, CreateOrg(f"{org_id}@example.com", PLAN, True), catalog, at_us, fx, org_id=org_id)
    return outcome.org, fx


def apply_tail(org, catalog, created_us: int, fx: Effects) -> list[bytes]:
    """The TAIL commits applied to `org`, each as its journal row (the shard's encoder)."""
    rows = []
    for k in range(TAIL):
        at = created_us + (k + 1) * 250_000
        if k % 8 == 0:
            command = Credit("grant", 2_000_000, note="bench tail credit")
            cmd.execute(org, command, catalog, at, fx)
            items = [JournalItem(at, command)]
        else:
            tick = Tick(f"tick-{k}", org.org_id, "sbx", at - US, 1_000, 1024, 1, 0, None)
            items = [JournalItem(at, c) for c in bill_ticks(org, [tick], catalog, at, fx).commands]
        rows.append(encode_journal(items))
    return rows


def ledger_rows(org_id: str, fx: Effects) -> list[tuple]:
    """The ledger rows a commit writes for these effects (actors/batch.py finish, storage/journal.py):
    usage summed per minute, every other entry a row of its own."""
    rows, minutes = [], {}
    for n, (_, entry) in enumerate(fx.ledger):
        if entry.kind == "usage":
            minute = minute_us(entry.at_us)
            held = minutes.setdefault(minute, [0, entry.at_us, 0])
            held[0] += entry.amount_micros
            held[2] += entry.invoiced_micros
            continue
        rows.append((f"le_{org_id}_{n}", org_id, entry.kind, entry.amount_micros, entry.grant_id,
                     us_to_dt(entry.expires_at_us) if entry.expires_at_us else None, entry.note,
                     entry.idempotency_key, None, None, us_to_dt(entry.at_us), entry.invoiced_micros))
    for minute, (amount, first_us, invoiced) in minutes.items():
        rows.append((f"lu_{org_id}_{minute // US}", org_id, "usage", amount, None, None, None, None, None,
                     us_to_dt(minute), us_to_dt(first_us), invoiced))
    return rows


LEDGER_COLUMNS = ["entry_id", "org_id", "kind", "amount_micros", "grant_id", "expires_at", "note",
                  "idempotency_key", "request_hash", "usage_minute", "created_at", "invoiced_micros"]


class Template:
    """The rows of one org, made by the real core, that every org of a population repeats."""

    def __init__(self, catalog, created_us: int) -> None:
        self.catalog, self.created_us = catalog, created_us
        org, fx = created("tmpl_0", catalog, created_us)
        self.tail = apply_tail(org, catalog, created_us, fx)
        self.final = org.to_snapshot()
        self.balance = org.balance_micros
        self.ledger = ledger_rows("tmpl_0", fx)

    def subject(self, org_id: str, check: bool) -> tuple[bytes, list[tuple]]:
        org, fx = created(org_id, self.catalog, self.created_us)
        snapshot = encode_snapshot(org.to_snapshot())
        if check:  # the shared rows are what this org's own commands give
            assert apply_tail(org, self.catalog, self.created_us, fx) == self.tail, org_id
            assert org.balance_micros == self.balance
            assert sum(r[3] for r in ledger_rows(org_id, fx)) == self.balance
        return snapshot, self.ledger_of(org_id)

    def baseline(self, org_id: str, check: bool) -> tuple[bytes, list[tuple]]:
        snapshot = encode_snapshot(msgspec.structs.replace(self.final, org_id=org_id, email=f"{org_id}@example.com"))
        if check:
            org, fx = created(org_id, self.catalog, self.created_us)
            apply_tail(org, self.catalog, self.created_us, fx)
            assert encode_snapshot(org.to_snapshot()) == snapshot, org_id
        return snapshot, self.ledger_of(org_id)

    def ledger_of(self, org_id: str) -> list[tuple]:
        return [(row[0].replace("tmpl_0", org_id), org_id, *row[2:]) for row in self.ledger]


async def generate(conn: asyncpg.Connection, template: Template) -> None:
    created_at = us_to_dt(template.created_us)
    started = time.perf_counter()
    for prefix in ("tail", "base"):
        ids = org_ids(prefix)
        for start in range(0, ORGS, COPY_ORGS):
            orgs, snapshots, journal, ledger = [], [], [], []
            for n in range(start, min(start + COPY_ORGS, ORGS)):
                org_id = ids[n]
                check = n % CHECK_EVERY == 0
                if prefix == "tail":
                    snapshot, rows = template.subject(org_id, check)
                    snapshots.append((org_id, 1, snapshot))
                    journal.extend((org_id, seq, entry) for seq, entry in enumerate(template.tail, 2))
                else:
                    snapshot, rows = template.baseline(org_id, check)
                    snapshots.append((org_id, TAIL + 1, snapshot))
                orgs.append((org_id, f"{org_id}@example.com", "prepaid", slot_of(org_id), created_at))
                ledger.extend(rows)
            async with conn.transaction():
                await conn.copy_records_to_table("orgs", records=orgs,
                                                 columns=["org_id", "email", "billing_mode", "slot", "created_at"])
                await conn.copy_records_to_table("org_snapshots", records=snapshots, columns=["org_id", "seq", "state"])
                if journal:
                    await conn.copy_records_to_table("org_journal", records=journal, columns=["org_id", "seq", "entry"])
                await conn.copy_records_to_table("ledger", records=ledger, columns=LEDGER_COLUMNS)
            done = start + len(orgs)
            if done % 25_000 == 0 or done == ORGS:
                print(f"  {POPULATIONS[prefix]}: {done:,} orgs written ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    # What each run is put back to: the rows as generated.
    await conn.execute("CREATE TABLE bench_saved_snapshots AS SELECT org_id, seq, state FROM org_snapshots")
    await conn.execute("CREATE TABLE bench_saved_journal AS SELECT org_id, seq, entry FROM org_journal")
    await conn.execute("VACUUM ANALYZE")
    print(f"generated in {time.perf_counter() - started:.0f} s", flush=True)


async def check_generated(conn: asyncpg.Connection, template: Template) -> None:
    counts = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM org_snapshots) AS snapshots, (SELECT count(*) FROM org_journal) AS journal,"
        " (SELECT count(*) FROM ledger) AS ledger")
    assert counts["snapshots"] == 2 * ORGS and counts["journal"] == ORGS * TAIL, dict(counts)
    sums = await conn.fetch("SELECT org_id, sum(amount_micros) AS s FROM ledger WHERE org_id = ANY($1) GROUP BY org_id",
                            ["tail_000000", f"tail_{ORGS - 1:06d}", "base_000000"])
    assert all(r["s"] == template.balance for r in sums) and len(sums) == 3, sums
    size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('org_journal'))")
    print(f"rows: {counts['snapshots']:,} snapshots, {counts['journal']:,} journal rows ({size}),"
          f" {counts['ledger']:,} ledger rows; SUM(ledger) = balance = {template.balance:,} micro-USD per org",
          flush=True)


async def restore(conn: asyncpg.Connection, prefix: str) -> str:
    """Put the population's rows back as generated (outside the timing)."""
    started = time.perf_counter()
    low, high = f"{prefix}_", f"{prefix}`"  # the population's ids sort between these
    async with conn.transaction():
        snapshotted = [r[0] for r in await conn.fetch(
            "UPDATE org_snapshots s SET seq = b.seq, state = b.state FROM bench_saved_snapshots b"
            " WHERE s.org_id = b.org_id AND s.org_id >= $1 AND s.org_id < $2 AND s.seq <> b.seq"
            " RETURNING s.org_id", low, high)]
        # rows the run appended, then the whole tail of every org it snapshotted (compacted)
        await conn.execute("DELETE FROM org_journal WHERE org_id >= $1 AND org_id < $2 AND seq > $3",
                           low, high, TAIL + 1)
        if snapshotted:
            await conn.execute("DELETE FROM org_journal j USING unnest($1::text[]) AS a(org_id)"
                               " WHERE j.org_id = a.org_id", snapshotted)
            await conn.execute("INSERT INTO org_journal SELECT j.* FROM bench_saved_journal j"
                               " JOIN unnest($1::text[]) AS a(org_id) USING (org_id) ORDER BY j.org_id, j.seq",
                               snapshotted)
        await conn.execute("DELETE FROM ledger WHERE note = $1", ROUND_CREDIT_NOTE)
        await conn.execute("DELETE FROM outbox WHERE org_id >= $1 AND org_id < $2", low, high)
    await conn.execute("VACUUM ANALYZE org_journal, org_snapshots, ledger")
    return f"{len(snapshotted):,} snapshots put back in {time.perf_counter() - started:.1f} s"


# ----- the measurement --------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def one_run(settings_json: str, prefix: str, how: str, balance: int) -> dict:
    gc.collect()
    rss_before = rss_bytes()
    shard = ShardActor(0, settings_json)
    await shard.ready()
    ids = org_ids(prefix)
    started = time.perf_counter()
    try:
        for start in range(0, ORGS, CHUNK):
            part = ids[start:start + CHUNK]
            if how == "state":
                answers = await shard.state(part)
            else:
                credit = Credit("grant", 1_000, note=ROUND_CREDIT_NOTE)
                answers = await shard.submit([(org_id, credit, fingerprint(credit)) for org_id in part])
            bad = [a for a in answers if "error" in a]
            assert not bad, bad[:3]
        seconds = time.perf_counter() - started
        stats = await shard.stats()
        expected = balance + (1_000 if how == "submit" else 0)
        assert all(shard.orgs[o].org.balance_micros == expected for o in ids[::CHECK_EVERY]), "a replay went wrong"
        assert stats["loaded_orgs"] == ORGS, stats["loaded_orgs"]
    finally:
        shard.loop_task.cancel()
        await asyncio.gather(shard.loop_task, return_exceptions=True)
        await shard.pool.close()
    return {"seconds": seconds, "orgs_per_s": ORGS / seconds, "loaded_in_commit": stats["loaded_in_commit"],
            "rss_after": stats["rss_bytes"], "rss_growth": stats["rss_bytes"] - rss_before,
            "tail_orgs_left": stats["totals"]["tail_orgs"], "commits": stats["commits"],
            "phase_ms": stats["commit_phase_ms_total"]}



async def run(url: str) -> dict:
    catalog_settings = Settings()
    template = Template(load_catalog(catalog_settings.catalog), now_us() - 3_600 * US)
    balance = template.balance
    conn = await asyncpg.connect(url)
    try:
        await generate(conn, template)
        await check_generated(conn, template)
        del template
        gc.collect()
        settings = Settings(database_url=url, shards=1, service_token="s" * 20, admin_token="a" * 20,
                            org_token_secret="o" * 32, metrics_port=0)
        settings_json = settings.model_dump_json()
        results: dict[str, dict[str, list[dict]]] = {how: {p: [] for p in POPULATIONS} for how in ("state", "submit")}
        for round_no in range(ROUNDS):
            order = ["base", "tail"] if round_no % 2 == 0 else ["tail", "base"]
            for prefix in order:
                for how in ("state", "submit"):
                    result = await one_run(settings_json, prefix, how, balance)
                    results[how][prefix].append(result)
                    put_back = await restore(conn, prefix)
                    print(f"round {round_no + 1} {how:6} {POPULATIONS[prefix]:28}: {result['seconds']:7.2f} s"
                          f" = {result['orgs_per_s']:8,.0f} orgs/s; RSS {result['rss_after'] / 2**20:6.0f} MiB"
                          f" (+{result['rss_growth'] / 2**20:.0f}); loaded_in_commit {result['loaded_in_commit']};"
                          f" orgs still with a tail {result['tail_orgs_left']:,}; {put_back}", flush=True)
    finally:
        await conn.close()
    return summarize(results)


def summarize(results: dict) -> dict:
    summary = {"orgs": ORGS, "tail": TAIL, "rounds": ROUNDS, "chunk": CHUNK,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(f"\n{ORGS:,} orgs per population, {TAIL}-entry tails, chunks of {CHUNK:,}, {ROUNDS} interleaved rounds")
    for how, label in (("state", "state() of every org"), ("submit", "submit(Credit) to every org")):
        base, tail = results[how]["base"], results[how]["tail"]
        ratios = [t["seconds"] / b["seconds"] for b, t in zip(base, tail)]
        median = {p: statistics.median(r["seconds"] for r in results[how][p]) for p in POPULATIONS}
        print(f"{label}: baseline {median['base']:.2f} s ({ORGS / median['base']:,.0f} orgs/s), subject"
              f" {median['tail']:.2f} s ({ORGS / median['tail']:,.0f} orgs/s) (medians); subject / baseline per"
              f" round {', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f};"
              f" loaded_in_commit {[r['loaded_in_commit'] for r in tail]}")
        summary[how] = {"baseline_s": [r["seconds"] for r in base], "subject_s": [r["seconds"] for r in tail],
                        "ratios": ratios, "median_ratio": statistics.median(ratios),
                        "baseline_median_s": median["base"], "subject_median_s": median["tail"],
                        "loaded_in_commit": [r["loaded_in_commit"] for r in tail + base],
                        "subject_rss_growth_mib": [r["rss_growth"] / 2**20 for r in tail],
                        "subject_phase_ms": [r["phase_ms"] for r in tail]}
    print(f"peak RSS of this process (generation included): {summary['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return summary


def main() -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="metergate-recovery-tails-"))
    url, server = start_embedded_postgres(data_dir)
    try:
        asyncio.run(_prepare(url))
        return asyncio.run(run(url))
    finally:
        stop_embedded_postgres(server)
        shutil.rmtree(data_dir, ignore_errors=True)


async def _prepare(url: str) -> None:
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await ensure_slots(conn, 1)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
