"""metergate_client.GateClient in one process, against the running service (issue 9).

(i)   Local checks: GateClient.check() in a tight loop over 1,000 orgs (checks/s), and the
      time per check, timed with perf_counter_ns around batches of 100 checks (÷ 100) and
      around single checks (which includes the timer's own cost, printed alongside).
(ii)  Commit-to-local-view staleness with 1,000 orgs changing. A separate process posts
      grants (POST /v1/orgs/{id}/credits, admin token) to all 1,000 orgs, at most one per org
      at a time, and records when each request started and when its answer (the org's new
      balance) arrived. This process's GateClient timestamps every view record its feed
      thread applies (a Projection subclass: the moment `client.projection.get(org)` shows
      it). Per grant, the time until its view is in the client's projection, from: the
      ledger entry's time (the shard's clock when it cut the batch, just before the commit
      transaction: an upper bound of commit-to-view), the answer's arrival (a lower bound:
      the view is published before the answer is sent) and the request's start. Phases:
        paced    grants at GRANT_RATE/s (open loop, below what the service can take);
        churn    the same, while another process posts usage ticks to the same 1,000 orgs
                 (every org's view changes many times a second);
        flooded  grants with CREDIT_CONCURRENCY in flight (closed loop): the service saturated.
      Every grant is 1,000 USD, far more than the churn bills an org here, so "the view
      reflects the grant" is "the view's balance ≥ the answered balance − 500 USD".
(iii) Durable ticks/s (bench/usage.py's load) with gate views published (the default) vs
      off (Settings(gate_views=False)), each on a service of its own, alternating on/off
      for TICK_ROUNDS rounds each. In both, the ingress follows its shards' feeds (a gate
      check is made first) and a GateClient in another process follows GET /v1/gate/feed.

(iv)  `python -m bench.client feed-ab` alone: the churn phase of (ii) with the feed served by the
      ingress (METERGATE_FEED_REPLICAS=0) and by a replica of its own (1), interleaved rounds,
      medians and ratios.

(v)   `python -m bench.client staleness` alone: the paced and churn phases of (ii) on one service
      as deployed by default, with commit-to-view measured exactly: each record carries
      published_us, the shard's clock just after its COMMIT (one host, so one clock), and the
      time until the record is in this process's projection is measured for every record the
      feed applies and for each grant's.

Every service start runs in a child process of its own (python -m bench.client part ...):
when launch.stop()'s serve.delete / serve.shutdown steps overrun their time budget, their
threads go on after ray.shutdown() and Serve's client then starts a new local Ray from them,
which breaks a second start in the same process. So no process starts a second service. A
child that dies leaves no embedded Postgres behind: the parent stops the ones in the data
folders it made. Clocks: time.monotonic_ns (CLOCK_MONOTONIC) in every process, comparable
across them; a ledger entry's time (the server's wall clock) is converted with the
system-wide CLOCK_REALTIME − CLOCK_MONOTONIC offset.
Run: .venv/bin/python -m bench.client
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime

import httpx
import msgspec

from metergate_client import GateClient, Resources
from metergate_client import client as client_module
from metergate_client.projection import Heartbeat, Projection, PublishedRecord, Resync

ORGS = 1_000
LOCAL_SECONDS = 3.0  # the tight loop
TIMED_SECONDS = 2.0  # each of: batches of 100, single checks
STALENESS_SECONDS = 10.0  # each staleness phase: 1,000 grants at GRANT_RATE
GRANT_RATE = 100  # grants/s in the paced phases
CREDIT_CONCURRENCY = 32  # grants in flight in the flooded phase
CHURN_CONCURRENCY = 4  # usage requests (1,000 ticks each) in flight during the churn
GRANT_MICROS = 10**9  # 1,000 USD
TICK_ROUNDS = int(os.environ.get("BENCH_TICK_ROUNDS", "2"))  # service starts per setting (on, off)
TICK_BLASTS = 2  # loads per service start; their mean is the start's figure
FOLLOWER = os.environ.get("BENCH_CLIENT_FOLLOWER", "1") != "0"
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def org_ids() -> list[str]:
    return [f"u_{n}" for n in range(ORGS)]  # the orgs bench/usage.py bills


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _create_orgs(base_url: str, ids: list[str], concurrency: int = 16) -> None:
    from bench.harness import ADMIN_TOKEN

    queue = list(ids)
    async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        async def worker() -> None:
            while queue:
                org_id = queue.pop()
                response = await admin.post("/v1/orgs", json={"org_id": org_id, "email": f"{org_id}@example.com"})
                assert response.status_code in (200, 201), response.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def create_orgs(base_url: str, ids: list[str]) -> None:
    asyncio.run(_create_orgs(base_url, ids))


def first_gate(base_url: str) -> None:
    """One POST /v1/gate: the ingress starts following its shards' view feeds."""
    from bench.harness import SERVICE_TOKEN

    response = httpx.post(base_url + "/v1/gate", json={"org_id": "u_0", "action": "create"}, timeout=30,
                          headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
    assert response.status_code == 200, response.text


# ----- (i) local checks ---------------------------------------------------------------------

def measure_local(gate: GateClient, ids: list[str]) -> dict:
    resources = Resources(memory_mb=4096, cpu_count=2, disk_mb=10240)
    check = gate.check
    perf = time.perf_counter_ns
    for org_id in ids:  # every org has a current view, and the answer is local
        answer = check(org_id, "create", resources)
        assert answer.source == "local" and answer.allowed, (org_id, answer)
    before = gate.counters()

    checks, started = 0, time.perf_counter()
    while True:
        for org_id in ids:
            check(org_id, "create", resources)
        checks += len(ids)
        elapsed = time.perf_counter() - started
        if elapsed >= LOCAL_SECONDS:
            break

    per_check_batched: list[float] = []  # ns, per batch of 100 ÷ 100
    deadline = time.perf_counter() + TIMED_SECONDS
    while time.perf_counter() < deadline:
        for start in range(0, len(ids), 100):
            part = ids[start:start + 100]
            t0 = perf()
            for org_id in part:
                check(org_id, "create", resources)
            per_check_batched.append((perf() - t0) / len(part))
    batched_checks = len(per_check_batched) * 100

    single: list[int] = []  # ns, one check each, timer included
    deadline = time.perf_counter() + TIMED_SECONDS
    while time.perf_counter() < deadline:
        for org_id in ids:
            t0 = perf()
            check(org_id, "create", resources)
            single.append(perf() - t0)
    timer = []
    for _ in range(100_000):
        t0 = perf()
        timer.append(perf() - t0)

    after = gate.counters()
    total = checks + batched_checks + len(single)
    local = after["local"] - before["local"]
    assert local == total, f"{total - local} of {total} checks were not answered locally: {after}"
    return {"checks": checks, "seconds": elapsed, "checks_per_s": checks / elapsed,
            "batched_p50_us": pct(per_check_batched, 50) / 1000, "batched_p99_us": pct(per_check_batched, 99) / 1000,
            "batched_max_us": max(per_check_batched) / 1000, "batches": len(per_check_batched),
            "single_p50_us": pct(single, 50) / 1000, "single_p99_us": pct(single, 99) / 1000,
            "single_p999_us": pct(single, 99.9) / 1000, "single_max_us": max(single) / 1000,
            "singles": len(single), "timer_p50_us": pct(timer, 50) / 1000, "timer_p99_us": pct(timer, 99) / 1000,
            "stale_during": after["stale"] - before["stale"]}


# ----- (ii) staleness -------------------------------------------------------------------------

class TimedProjection(Projection):
    """A Projection that timestamps each record the feed applies (when get() shows it)."""

    log: list | None = None  # (org_id, balance_micros, monotonic_ns, published_us); None: not recording

    def advance(self, shard, epoch, seq, records) -> None:
        super().advance(shard, epoch, seq, records)
        log = TimedProjection.log
        if log is not None and records:
            now = time.monotonic_ns()
            for record in records:
                log.append((record.org_id, record.view.balance_micros, now, getattr(record, "published_us", None)))


_PUBLISHED_FEED = msgspec.json.Decoder(PublishedRecord | Heartbeat | Resync)


def _read_published(line):
    """The client's feed reader, keeping each record's published_us (a client drops it)."""
    return _PUBLISHED_FEED.decode(line)


@contextmanager
def timed_projection():
    """GateClients made inside use TimedProjection (also for the snapshots of a resync), and
    read the feed's records with their published_us."""
    original, reader = client_module.Projection, client_module.read_feed_line
    client_module.Projection, client_module.read_feed_line = TimedProjection, _read_published
    try:
        yield
    finally:
        client_module.Projection, client_module.read_feed_line = original, reader
        TimedProjection.log = None


def _helper(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """python -m bench.client <role> ...: a helper process (see the end of this file)."""
    return subprocess.Popen([sys.executable, "-m", "bench.client", *args], cwd=PROJECT_DIR, stdout=stdout, text=True)


def measure_staleness(base_url: str, phase: str) -> dict:
    """One phase (paced, churn, flooded) against this process's GateClient (TimedProjection)."""
    log: list = []
    churner = _helper("churn", base_url) if phase == "churn" else None
    churn_out = None
    try:
        if churner is not None:
            assert churner.stdout.readline().strip() == "ready"
            time.sleep(1.0)  # the churn is under way before the first grant
        rate, concurrency = (0, CREDIT_CONCURRENCY) if phase == "flooded" else (GRANT_RATE, 0)
        granter = _helper("grants", base_url, str(STALENESS_SECONDS), str(rate), str(concurrency))
        assert granter.stdout.readline().strip() == "ready"
        TimedProjection.log = log
        out, _ = granter.communicate(timeout=STALENESS_SECONDS + 120)
        time.sleep(1.0)  # the last grants' views arrive
    finally:
        TimedProjection.log = None
        if churner is not None:
            churner.send_signal(signal.SIGTERM)
            churn_out = churner.communicate(timeout=120)[0]
    assert granter.returncode == 0, f"the grants process failed ({granter.returncode})"
    report = json.loads(out.strip().splitlines()[-1])
    mutations = report["mutations"]
    by_org: dict[str, list[tuple[int, int, int | None]]] = defaultdict(list)
    wall_minus_mono = time.time_ns() - time.monotonic_ns()  # one host: the shards' clock is this one
    from_publish = []  # every record the feed applied: the shard's time after COMMIT -> in the view
    for org_id, balance, at, published_us in log:  # one feed thread appends: in time order
        published = None if published_us is None else published_us * 1000 - wall_minus_mono
        by_org[org_id].append((at, balance, published))
        if published is not None:
            from_publish.append((at - published) / 1e6)
    from_ack, from_start, from_entry, from_commit, unmatched = [], [], [], [], 0
    for org_id, balance, started, answered, entry in mutations:
        threshold = balance - GRANT_MICROS // 2
        for at, seen, published in by_org.get(org_id, ()):
            if seen >= threshold:
                from_ack.append((at - answered) / 1e6)
                from_start.append((at - started) / 1e6)
                from_entry.append((at - entry) / 1e6)
                if published is not None:
                    from_commit.append((at - published) / 1e6)
                break
        else:
            unmatched += 1
    requests = [(m[3] - m[2]) / 1e6 for m in mutations]
    result = {"phase": phase, "mutations": len(mutations), "mutations_per_s": len(mutations) / report["seconds"],
              "seconds": report["seconds"],
              "orgs_changed": len({m[0] for m in mutations}), "records_applied": len(log),
              "unmatched": unmatched, "before_ack": sum(1 for v in from_ack if v < 0),
              "skipped": report["skipped"], "rate": rate, "concurrency": concurrency,
              "request_p50_ms": pct(requests, 50), "request_p99_ms": pct(requests, 99)}
    for name, values in (("ack", from_ack), ("start", from_start), ("entry", from_entry),
                         ("commit", from_commit), ("published", from_publish)):
        if values:
            result.update({f"{name}_p50_ms": pct(values, 50), f"{name}_p99_ms": pct(values, 99),
                           f"{name}_max_ms": max(values)})
    if churn_out:
        result["churn"] = json.loads(churn_out.strip().splitlines()[-1])
    return result


def print_staleness(s: dict) -> None:
    how = (f"{s['concurrency']} in flight" if s["concurrency"] else f"paced at {s['rate']}/s")
    extra = (f", during usage ticks to the same orgs at {s['churn']['ticks_per_s']:,.0f} ticks/s"
             f" ({CHURN_CONCURRENCY} requests in flight)" if "churn" in s else "")
    nan = float("nan")
    print(f"(ii) staleness, {s['phase']}: grants to {s['orgs_changed']:,} orgs, {how}{extra}:"
          f" {s['mutations']:,} answered in {s['seconds']:.1f} s ({s['skipped']} skipped: org busy),"
          f" request p50 {s['request_p50_ms']:.1f} ms, p99 {s['request_p99_ms']:.1f} ms",
          flush=True)
    print(f"    ledger entry (batch cut, before commit) -> in the local view: p50 {s.get('entry_p50_ms', nan):.1f} ms,"
          f" p99 {s.get('entry_p99_ms', nan):.1f} ms, max {s.get('entry_max_ms', nan):.1f} ms"
          f"  (commit-to-view is at most this)")
    print(f"    commit (the shard's clock after COMMIT, published_us) -> in the local view: grants p50"
          f" {s.get('commit_p50_ms', nan):.1f} ms, p99 {s.get('commit_p99_ms', nan):.1f} ms, max"
          f" {s.get('commit_max_ms', nan):.1f} ms; every record applied ({s['records_applied']:,}): p50"
          f" {s.get('published_p50_ms', nan):.1f} ms, p99 {s.get('published_p99_ms', nan):.1f} ms"
          f"  target p99 <= 100 ms")
    print(f"    answer received -> in the local view: p50 {s.get('ack_p50_ms', nan):.1f} ms,"
          f" p99 {s.get('ack_p99_ms', nan):.1f} ms, max {s.get('ack_max_ms', nan):.1f} ms"
          f" ({s['before_ack']:,} of {s['mutations']:,} there before the answer; commit-to-view is at least this)")
    print(f"    request start   -> in the local view: p50 {s.get('start_p50_ms', nan):.1f} ms,"
          f" p99 {s.get('start_p99_ms', nan):.1f} ms, max {s.get('start_max_ms', nan):.1f} ms;"
          f" never seen: {s['unmatched']}; records the feed applied: {s['records_applied']:,}", flush=True)


@contextmanager
def synced_client(ids: list[str], **settings):
    """A service (bench.harness settings plus `settings`) with the orgs created, and a
    GateClient in this process (TimedProjection) holding every org's view: (service, client)."""
    from bench.harness import SERVICE_TOKEN, running_service

    with running_service(**settings) as service, timed_projection():
        create_orgs(service.base_url, ids)
        first_gate(service.base_url)
        gate = GateClient(service.base_url, SERVICE_TOKEN, max_staleness_s=1.0)
        try:
            assert gate.wait_synced(60), "the client did not sync within 60 s"
            deadline = time.monotonic() + 30
            while any(gate.projection.get(o) is None for o in ids):
                assert time.monotonic() < deadline, f"{len(gate.projection)} views after 30 s"
                time.sleep(0.05)
            yield service, gate
        finally:
            gate.close()


def part_client() -> dict:
    """(i) and (ii), on one service (run in a child process)."""
    ids = org_ids()
    result: dict = {}
    with synced_client(ids) as (service, gate):
        result["local"] = local = measure_local(gate, ids)
        print(f"(i) local checks, 1 thread, {ORGS:,} orgs: {local['checks_per_s']:,.0f} checks/s"
              f" ({local['checks']:,} in {local['seconds']:.1f} s)  target >= 1,000,000/s", flush=True)
        print(f"    per check, batches of 100 / 100: p50 {local['batched_p50_us']:.2f} µs,"
              f" p99 {local['batched_p99_us']:.2f} µs, max {local['batched_max_us']:.1f} µs"
              f" ({local['batches']:,} batches)  target p99 <= 20 µs")
        print(f"    single checks (timer included):  p50 {local['single_p50_us']:.2f} µs,"
              f" p99 {local['single_p99_us']:.2f} µs, p99.9 {local['single_p999_us']:.1f} µs,"
              f" max {local['single_max_us']:.0f} µs ({local['singles']:,} checks);"
              f" the timer alone: p50 {local['timer_p50_us']:.3f} µs, p99 {local['timer_p99_us']:.3f} µs",
              flush=True)
        for phase in ("paced", "churn", "flooded"):
            result[f"staleness_{phase}"] = s = measure_staleness(service.base_url, phase)
            print_staleness(s)
        answers = [gate.check(o, "create") for o in ids]
        result["after_sources"] = sorted({a.source.value for a in answers})
        result["counters"] = gate.counters()
        print(f"client.counters(): {result['counters']}", flush=True)
    return result


# ----- (iii) durable ticks, gate views on vs off ---------------------------------------------

def part_ticks(gate_views: bool, tag: str) -> dict:
    """One service start, gate views on or off: durable ticks/s (run in a child process)."""
    from bench import usage
    from bench.harness import SERVICE_TOKEN, running_service

    with running_service(gate_views=gate_views) as service:
        create_orgs(service.base_url, org_ids())
        first_gate(service.base_url)
        views_status = httpx.get(service.base_url + "/v1/gate/views", params={"limit": 10}, timeout=30,
                                 headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}).status_code
        follower = _helper("follow", service.base_url) if FOLLOWER else None
        follower_counters = None
        try:
            asyncio.run(usage.blast(service.base_url + "/v1/usage", usage.bodies(f"warm{tag}")[:20]))
            rates = []
            for blast in range(TICK_BLASTS):
                payloads = usage.bodies(f"{tag}b{blast}")
                seconds, accepted = asyncio.run(usage.blast(service.base_url + "/v1/usage", payloads))
                assert accepted == len(payloads) * usage.BATCH, accepted
                rates.append(accepted / seconds)
        finally:
            if follower is not None:
                follower.terminate()
                lines = follower.communicate(timeout=30)[0].strip().splitlines()
                follower_counters = json.loads(lines[-1]) if lines else None
    return {"gate_views": gate_views, "ticks_per_s": statistics.mean(rates), "blasts": rates,
            "follower": follower_counters, "views_status": views_status}


def measure_ticks() -> dict:
    runs = []
    for round_no in range(TICK_ROUNDS):
        for gate_views in (True, False) if round_no % 2 == 0 else (False, True):
            started = time.monotonic()
            runs.append(run_part("ticks", "on" if gate_views else "off", f"r{round_no}"))
            print(f"  (iii) round {round_no + 1}, gate views {'on ' if gate_views else 'off'}:"
                  f" {runs[-1]['ticks_per_s']:,.0f} ticks/s (loads: "
                  f"{', '.join(f'{r:,.0f}' for r in runs[-1]['blasts'])}; {time.monotonic() - started:.0f} s with"
                  f" start and stop); GET /v1/gate/views answered {runs[-1]['views_status']};"
                  f" feed follower: {runs[-1]['follower']}", flush=True)
    on = [r["ticks_per_s"] for r in runs if r["gate_views"]]
    off = [r["ticks_per_s"] for r in runs if not r["gate_views"]]
    # Neighbouring runs (one on, one off) are the same-minute comparisons.
    pairs = [1 - (a["ticks_per_s"] / b["ticks_per_s"] if a["gate_views"] else b["ticks_per_s"] / a["ticks_per_s"])
             for a, b in zip(runs[0::2], runs[1::2])]
    return {"on": on, "off": off, "on_median": statistics.median(on), "off_median": statistics.median(off),
            "cost": 1 - statistics.median(on) / statistics.median(off), "pair_costs": pairs}


# ----- the run --------------------------------------------------------------------------------

def run_part(*args: str) -> dict:
    """python -m bench.client part ARGS in a child process (its output goes to ours); its result.
    If it fails, the embedded Postgres of the data folders it made is stopped."""
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "metergate-bench-*")))
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result_file:
        code = subprocess.run([sys.executable, "-m", "bench.client", "part", result_file.name, *args],
                              cwd=PROJECT_DIR, check=False).returncode
        if code == 0:
            return json.load(result_file)
    from storage.db import stop_postgres_now

    for data_dir in set(glob.glob(os.path.join(tempfile.gettempdir(), "metergate-bench-*"))) - before:
        stop_postgres_now(data_dir, wait_s=10)
        shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError(f"bench.client part {' '.join(args)} failed (exit code {code})")


def main() -> dict:
    started = time.monotonic()
    result = run_part("client")
    print(f"    ({time.monotonic() - started:.0f} s so far)", flush=True)
    result["ticks"] = ticks = measure_ticks()
    print(f"(iii) durable ticks/s (bench/usage.py's load: batches of 1,000, {ORGS:,} orgs,"
          f" {os.environ.get('BENCH_CONCURRENCY', '16')} in flight; {'a GateClient following the feed in another process' if FOLLOWER else 'no feed follower'}),"
          f" medians of {TICK_ROUNDS} service starts each: gate views on {ticks['on_median']:,.0f},"
          f" off {ticks['off_median']:,.0f} -> cost {ticks['cost'] * 100:.1f} % (neighbouring on/off pairs: "
          f"{', '.join(f'{c * 100:.1f} %' for c in ticks['pair_costs'])})  target <= 10 %")
    result["elapsed_s"] = time.monotonic() - started
    print(f"    ({result['elapsed_s']:.0f} s in all)")
    return result


# ----- (iv) the feed on the ingress vs on replicas of its own, under churn ----------------------

FEED_AB_ROUNDS = int(os.environ.get("BENCH_FEED_ROUNDS", "2"))


def part_feed(feed_replicas: int) -> dict:
    """The churn phase of (ii) on a service with METERGATE_FEED_REPLICAS=feed_replicas."""
    with synced_client(org_ids(), feed_replicas=feed_replicas) as (service, _):
        result = measure_staleness(service.base_url, "churn")
    print_staleness(result)
    return result


def part_staleness() -> dict:
    """(v): commit-to-view, idle (paced grants) and under churn, on one service as deployed by
    default (the feed on a replica of its own)."""
    with synced_client(org_ids()) as (service, _):
        results = {phase: measure_staleness(service.base_url, phase) for phase in ("paced", "churn")}
    for result in results.values():
        print_staleness(result)
    return results


def feed_ab() -> dict:
    """(iv): FEED_AB_ROUNDS rounds, each the churn phase with the feed served by the ingress
    (METERGATE_FEED_REPLICAS=0) and then by a replica of its own (1), each on a service of its
    own; medians and their ratios (own / ingress: below 1 is better)."""
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for n in range(FEED_AB_ROUNDS):
        for replicas in (0, 1):
            print(f"(iv) round {n + 1}: feed on {'its own replica' if replicas else 'the ingress'}", flush=True)
            runs[replicas].append(run_part("feed", str(replicas)))
    keys = ("commit_p50_ms", "commit_p99_ms", "published_p50_ms", "published_p99_ms", "ack_p50_ms", "ack_p99_ms",
            "entry_p50_ms", "entry_p99_ms")
    medians = {r: {k: statistics.median(run[k] for run in runs[r]) for k in keys} for r in runs}
    ratios = {k: medians[1][k] / medians[0][k] if medians[0][k] > 0 else float("nan") for k in keys}
    print(f"(iv) feed under churn, medians of {FEED_AB_ROUNDS} rounds (ms): on the ingress {medians[0]};"
          f" on its own replica {medians[1]}; own / ingress: "
          + ", ".join(f"{k} {ratios[k]:.2f}" for k in keys) + "  target p99 <= 100 ms", flush=True)
    return {"runs": runs, "medians": medians, "ratios": ratios}


# ----- helper processes (python -m bench.client <role> ...) -----------------------------------

async def _grants(base_url: str, seconds: float, rate: float, concurrency: int) -> dict:
    """Grants to every org, one per org at a time, for `seconds`: `rate` a second (open
    loop), or `concurrency` in flight (closed loop) when rate is 0."""
    from bench.harness import ADMIN_TOKEN

    ids = org_ids()
    mutations: list[tuple[str, int, int, int, int]] = []  # org, balance, start, answer, entry (monotonic ns)
    wall_minus_mono = time.time_ns() - time.monotonic_ns()  # system-wide: the same in every process
    busy: set[str] = set()
    skipped = 0
    clock = time.monotonic_ns
    body = json.dumps({"kind": "grant", "amount_micros": GRANT_MICROS}).encode()
    headers = {"Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency or 256)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        async def grant(org_id: str) -> None:
            busy.add(org_id)
            try:
                t0 = clock()
                response = await admin.post(f"/v1/orgs/{org_id}/credits", content=body, headers=headers)
                t1 = clock()
                assert response.status_code == 201, response.text[:300]
                answer = response.json()
                entry_us = int(datetime.fromisoformat(answer["created_at"]).timestamp() * 1_000_000)
                mutations.append((org_id, answer["balance_micros"], t0, t1, entry_us * 1000 - wall_minus_mono))
            finally:
                busy.discard(org_id)

        print("ready", flush=True)
        started = time.monotonic()
        until = started + seconds
        if rate:
            tasks: set[asyncio.Task] = set()
            k = 0
            while (at := started + k / rate) < until:
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                org_id = ids[k % len(ids)]
                k += 1
                if org_id in busy:
                    skipped += 1
                    continue
                task = asyncio.ensure_future(grant(org_id))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        else:
            async def worker(mine: list[str]) -> None:
                n = 0
                while time.monotonic() < until:
                    await grant(mine[n % len(mine)])
                    n += 1

            await asyncio.gather(*(worker(ids[w::concurrency]) for w in range(concurrency)))
        return {"mutations": mutations, "seconds": time.monotonic() - started, "skipped": skipped}


def _churn(base_url: str) -> dict:
    """Usage ticks to the 1,000 orgs, CHURN_CONCURRENCY requests in flight, until SIGTERM."""
    from bench import usage

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    accepted, spent, n = 0, 0.0, 0
    print("ready", flush=True)
    while not stop.is_set():
        payloads = usage.bodies(f"churn{n}-{os.getpid()}")
        n += 1
        for start in range(0, len(payloads), 20):  # in parts, so that a stop is heard soon
            if stop.is_set():
                break
            took, done = asyncio.run(usage.blast(base_url + "/v1/usage", payloads[start:start + 20],
                                                 concurrency=CHURN_CONCURRENCY))
            accepted += done
            spent += took
    return {"ticks": accepted, "seconds": spent, "ticks_per_s": accepted / spent if spent else 0.0}


def _follow(base_url: str) -> None:
    from bench.harness import SERVICE_TOKEN

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gate = GateClient(base_url, SERVICE_TOKEN)
    try:
        stop.wait()
    finally:
        print(json.dumps(gate.counters()), flush=True)
        gate.close()


def _part(result_path: str, what: str, *args: str) -> None:
    if what == "feed":
        result = part_feed(int(args[0]))
    elif what == "staleness":
        result = part_staleness()
    else:
        result = part_client() if what == "client" else part_ticks(args[0] == "on", args[1])
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else "main"
    if role == "part":
        _part(*sys.argv[2:])
    elif role == "grants":
        print(json.dumps(asyncio.run(_grants(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))))
    elif role == "churn":
        print(json.dumps(_churn(sys.argv[2])))
    elif role == "follow":
        _follow(sys.argv[2])
    elif role == "feed-ab":
        feed_ab()
    elif role == "staleness":
        run_part("staleness")
    else:
        main()
