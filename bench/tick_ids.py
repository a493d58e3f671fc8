"""Tick-id retention at 10,000 ids a second: partitions dropped whole against the old DELETE.

Both designs take the same stream in the same run, on the embedded Postgres, interleaved round
by round (the order swaps each round, so a noisy 2-core host slows both alike):
- new: `tick_ids` as migration 0013 makes it, claims by storage.journal.claim_tick_ids, and the
  prune job's storage.tick_ids.maintain every simulated minute;
- old: the unpartitioned table of migration 0001 (`tick_ids_old` here), claimed with INSERT ...
  ON CONFLICT (id) as before 0013, and pruned as the old job did: a DELETE of at most 50,000
  rows past the retention every simulated minute.

Time is simulated (seen_at comes from a synthetic clock, so no run waits): 10,000 ids per
simulated second in commits of 1,000, with the production prune budget and cadence. Only the
retention is shortened, 26 h → RETENTION_S (and the 6 h partitions → WIDTH_S in proportion),
so that several retentions pass in minutes. Every commit also resends DUPLICATES ids first
sent up to the acceptance window ago; both designs must find every one of them.

Run (2 cores shared: one service at a time):
    flock /tmp/metergate-service.lock .venv/bin/python -m bench.tick_ids [--rounds 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from storage import tick_ids
from storage.db import migrate, start_embedded_postgres, stop_embedded_postgres
from storage.journal import CLAIM_TICK_IDS, claim_tick_ids
from storage.times import us_to_dt

US = 1_000_000
RATE = 10_000  # ids per simulated second: 10k orgs, one live lease each, a tick a second
BATCH = 1_000  # ids per commit, as a shard batches them
DUPLICATES = 10  # resends per commit, of ids first sent within the acceptance window
RETENTION_S = 120  # 26 h in production, compressed
WIDTH_S = 30  # 6 h partitions in production, in the same proportion (about)
MARGIN_S = 5  # the edge refuses ticks older than the retention less this (1 h in production)
JOB_EVERY_S = 60  # the prune job's cadence, as in production
OLD_PRUNE_BATCH = 50_000  # what the old job deleted per run
ROUND_S = 30  # simulated seconds per round

OLD_DDL = ("CREATE TABLE tick_ids_old (id bytea PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now());"
           " CREATE INDEX tick_ids_old_seen_at ON tick_ids_old USING brin (seen_at)")
OLD_CLAIM = ("WITH input AS (SELECT unnest($1::bytea[]) AS id),"
             " fresh AS (INSERT INTO tick_ids_old (id, seen_at) SELECT id, $2 FROM input ON CONFLICT (id) DO NOTHING"
             " RETURNING id)"
             " SELECT id FROM input EXCEPT ALL SELECT id FROM fresh")
OLD_PRUNE = ("DELETE FROM tick_ids_old WHERE ctid = ANY(ARRAY("
             " SELECT ctid FROM tick_ids_old WHERE seen_at < $1 LIMIT $2))")


class Design:
    def __init__(self, name: str, conn: asyncpg.Connection, start_us: int) -> None:
        self.name = name
        self.conn = conn
        self.now_us = start_us
        self.next_job_us = start_us
        self.claim_ms: list[float] = []
        self.job_ms: list[float] = []
        self.duplicates = 0
        self.rounds: list[dict] = []
        self.round_start = 0  # index in claim_ms of the current round's first commit

    async def claim(self, ids: list[bytes]) -> set[bytes]:
        async with self.conn.transaction():
            if self.name == "new":
                return await claim_tick_ids(self.conn, ids, self.now_us)
            return {r[0] for r in await self.conn.fetch(OLD_CLAIM, ids, us_to_dt(self.now_us))}

    async def job(self) -> None:
        started = time.perf_counter()
        async with self.conn.transaction():
            if self.name == "new":
                await tick_ids.maintain(self.conn, self.now_us, RETENTION_S, WIDTH_S)
            else:
                await self.conn.execute(OLD_PRUNE, us_to_dt(self.now_us - RETENTION_S * US), OLD_PRUNE_BATCH)
        self.job_ms.append((time.perf_counter() - started) * 1000)

    async def run_round(self, commits: list[tuple[int, list[bytes], int]]) -> float:
        """Each commit at its simulated time; the job whenever its minute has come. Returns
        the real seconds the round's claims and jobs took."""
        started = time.perf_counter()
        for at_us, ids, resent in commits:
            self.now_us = at_us
            if at_us >= self.next_job_us:
                await self.job()
                self.next_job_us += JOB_EVERY_S * US
            began = time.perf_counter()
            seen = await self.claim(ids)
            self.claim_ms.append((time.perf_counter() - began) * 1000)
            assert len(seen) == resent, (self.name, len(seen), resent)  # every resend found, nothing else
            self.duplicates += len(seen)
        return time.perf_counter() - started

    async def measure(self) -> dict:
        table = "tick_ids" if self.name == "new" else "tick_ids_old"
        rows = await self.conn.fetchval(f"SELECT count(*) FROM {table}")
        stale = await self.conn.fetchval(f"SELECT count(*) FROM {table} WHERE seen_at < $1",
                                         us_to_dt(self.now_us - RETENTION_S * US))
        size = await self.conn.fetchval(  # a plain table has no partition tree
            "SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree($1::regclass)),"
            " pg_total_relation_size($1::regclass))", table)
        return {"rows": rows, "stale": stale, "mb": size / 2**20}


class Sent:
    """A sample of the ids sent so far (20 a commit) with when, oldest first, to resend from."""

    def __init__(self) -> None:
        self.at_us: list[int] = []
        self.ids: list[bytes] = []
        self.first = 0  # the oldest still inside the acceptance window

    def add(self, at_us: int, ids: list[bytes]) -> None:
        self.at_us.extend(at_us for _ in ids)
        self.ids.extend(ids)

    def resends(self, at_us: int, n: int, rng: random.Random) -> list[bytes]:
        while self.first < len(self.at_us) and self.at_us[self.first] < at_us - (RETENTION_S - MARGIN_S) * US:
            self.first += 1
        span = range(self.first, len(self.ids))
        return [self.ids[k] for k in rng.sample(span, min(n, len(span)))]


def stream(start_us: int, seconds: int, sent: Sent, rng: random.Random) -> list[tuple[int, list[bytes], int]]:
    """Commits for `seconds` simulated seconds from start_us: (time, ids, resends among them)."""
    commits = []
    per_s = RATE // BATCH
    for k in range(seconds * per_s):
        at_us = start_us + k * US // per_s
        fresh = [os.urandom(16) for _ in range(BATCH - DUPLICATES)]
        resent = sent.resends(at_us, DUPLICATES, rng)
        commits.append((at_us, fresh + resent, len(resent)))
        sent.add(at_us, fresh[:20])
    return commits


async def run(url: str, rounds: int) -> dict:
    old_conn, new_conn = await asyncpg.connect(url), await asyncpg.connect(url)
    await old_conn.execute(OLD_DDL)
    # Synthetic time a day past now, aligned to a partition: past the migration's legacy partition.
    start_us = (time.time_ns() // 1000 + 86_400 * US) // (WIDTH_S * US) * (WIDTH_S * US)
    designs = {"old": Design("old", old_conn, start_us), "new": Design("new", new_conn, start_us)}
    rng, sent = random.Random(25), Sent()
    print(f"{RATE:,} ids per simulated second, commits of {BATCH:,} ({DUPLICATES} resends each); retention "
          f"{RETENTION_S} s (26 h compressed), partitions {WIDTH_S} s; old prune: {OLD_PRUNE_BATCH:,} rows "
          f"a {JOB_EVERY_S} s run")
    print(f"{'round':>5} {'sim s':>6} | {'old rows':>10} {'stale':>10} {'MB':>6} {'commit ms':>9} | "
          f"{'new rows':>10} {'stale':>8} {'MB':>6} {'commit ms':>9} | {'new/old ms':>10}")
    ratios = []
    for number in range(rounds):
        commits = stream(start_us + number * ROUND_S * US, ROUND_S, sent, rng)
        order = ["old", "new"] if number % 2 == 0 else ["new", "old"]
        real_s = {}
        for name in order:
            designs[name].round_start = len(designs[name].claim_ms)
            real_s[name] = await designs[name].run_round(commits)
        line = {}
        for name in ("old", "new"):
            d = designs[name]
            measured = await d.measure()
            measured["commit_ms"] = statistics.median(d.claim_ms[d.round_start:])
            measured["ids_per_real_s"] = len(commits) * BATCH / real_s[name]
            d.rounds.append(measured)
            line[name] = measured
        ratios.append(line["new"]["commit_ms"] / line["old"]["commit_ms"])
        o, n = line["old"], line["new"]
        print(f"{number + 1:>5} {(number + 1) * ROUND_S:>6} | {o['rows']:>10,} {o['stale']:>10,} {o['mb']:>6.0f}"
              f" {o['commit_ms']:>9.1f} | {n['rows']:>10,} {n['stale']:>8,} {n['mb']:>6.0f} {n['commit_ms']:>9.1f}"
              f" | {ratios[-1]:>10.2f} | real ids/s old {o['ids_per_real_s']:,.0f} new {n['ids_per_real_s']:,.0f}")
    plan = await new_conn.fetch("EXPLAIN " + CLAIM_TICK_IDS, [os.urandom(16) for _ in range(BATCH)],
                                us_to_dt(designs["new"].now_us))
    await old_conn.close()
    await new_conn.close()
    old, new = designs["old"], designs["new"]
    assert old.duplicates == new.duplicates  # the same resends found by both
    bound = RATE * (RETENTION_S + 2 * WIDTH_S)  # the retention, the partition being written, the oldest one
    result = {
        "old_rows": old.rounds[-1]["rows"], "new_rows": new.rounds[-1]["rows"], "new_bound_rows": bound,
        "old_stale": old.rounds[-1]["stale"], "new_stale": new.rounds[-1]["stale"],
        "old_mb": old.rounds[-1]["mb"], "new_mb": new.rounds[-1]["mb"],
        "new_max_rows": max(r["rows"] for r in new.rounds),
        "commit_ms_ratio_median": statistics.median(ratios),
        "old_commit_ms_p50": statistics.median(old.claim_ms), "new_commit_ms_p50": statistics.median(new.claim_ms),
        "old_job_ms_max": max(old.job_ms), "new_job_ms_max": max(new.job_ms),
        "old_job_ms_p50": statistics.median(old.job_ms), "new_job_ms_p50": statistics.median(new.job_ms),
        "duplicates_found": new.duplicates,
        "old_ids_per_real_s_last": old.rounds[-1]["ids_per_real_s"],
        "new_ids_per_real_s_last": new.rounds[-1]["ids_per_real_s"],
    }
    print(f"\nafter {rounds * ROUND_S} simulated s ({rounds * ROUND_S * RATE:,} ids each):")
    print(f"  rows:  old {result['old_rows']:,} (of which past the retention {result['old_stale']:,}), "
          f"new {result['new_rows']:,} (max over rounds {result['new_max_rows']:,}; bound "
          f"rate x (retention + 2 partitions) = {bound:,}) -> old/new {result['old_rows'] / result['new_rows']:.2f} x")
    print(f"  size:  old {result['old_mb']:.0f} MB, new {result['new_mb']:.0f} MB")
    print(f"  commit (claim of {BATCH:,} ids) p50: old {result['old_commit_ms_p50']:.1f} ms, new "
          f"{result['new_commit_ms_p50']:.1f} ms; new/old per round: median {result['commit_ms_ratio_median']:.2f} x"
          f" (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"  job run: old DELETE p50 {result['old_job_ms_p50']:.0f} ms (max {result['old_job_ms_max']:.0f}),"
          f" new partition drop/create p50 {result['new_job_ms_p50']:.0f} ms (max {result['new_job_ms_max']:.0f})")
    print(f"  resends found as duplicates by both: {result['duplicates_found']:,}")
    print("  claim plan (new):\n    " + "\n    ".join(r[0] for r in plan))
    return result


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="metergate-bench-ticks-"))
    url, server = start_embedded_postgres(data_dir)
    try:
        asyncio.run(migrate(url))
        return asyncio.run(run(url, args.rounds))
    finally:
        stop_embedded_postgres(server)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
