"""Billing page loads against an org with a year of ledger rows, and another org's gate meanwhile.

A billing page load used to read the org's whole ledger (one usage row per minute: ~525k a
year) on the replica's 4-connection pool, whose loop also answers every org's gate. Now the
months are kept once over (a load reads the current month's rows) and an org token is held to
a request budget (429 past it). This measures, in one run, interleaved over rounds:

- a quiet org's gate checks (one connection, back to back): p50 and p99, alone, and while 8
  loops load the heavy org's page with the admin token (no budget: the page's own cost) and
  with an org token (the budget);
- the heavy org's page: the first load (which computes and keeps the year's months) and the
  ones after it.

The heavy org's ledger rows are written straight into Postgres (a year of usage minutes):
what the page reads, not what the shard holds. Prints ratios against the alone baseline.
Run: .venv/bin/python -m bench.billing_page [--rows 500000] [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import asyncpg
import httpx

from bench.harness import ADMIN_TOKEN, SERVICE_TOKEN, running_service
from storage import ledger



def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def write_year(url: str, org_id: str, rows: int, now_us: int) -> None:
    """`rows` usage rows of 1 µUSD, one a minute, ending now (the page reads them, not the shard)."""
    conn = await asyncpg.connect(url)
    try:
        await ledger.write_usage_history(conn, org_id, now_us, rows)
    finally:
        await conn.close()


def page_loops(base_url: str, org_id: str, token: str, seconds: float, loops: int, done) -> None:
    """In a process of its own: `loops` concurrent page loads for `seconds`; counts by status."""

    async def loop(client: httpx.AsyncClient, counts: dict) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = await client.get(f"/billing/{org_id}")
            counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
            if answer.status_code == 429:
                await asyncio.sleep(float(answer.headers.get("retry-after", "1")))

    async def run() -> dict:
        counts: dict = {}
        async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            await asyncio.gather(*(loop(client, counts) for _ in range(loops)))
        return counts

    done.put(asyncio.run(run()))


def gate_latencies_ms(base_url: str, org_id: str, seconds: float) -> list[float]:
    body = {"org_id": org_id, "action": "create"}
    latencies = []
    with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert client.post("/v1/gate", json=body).status_code == 200
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def with_page_loads(base_url: str, heavy: str, token: str, quiet: str, seconds: float) -> tuple[list[float], dict]:
    done = multiprocessing.Queue()
    loader = multiprocessing.Process(target=page_loops, args=(base_url, heavy, token, seconds, 8, done))
    loader.start()
    time.sleep(0.5)  # the loops are under way
    latencies = gate_latencies_ms(base_url, quiet, seconds - 1)
    counts = done.get(timeout=seconds + 120)
    loader.join(timeout=30)
    return latencies, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with running_service() as running:
        base = running.base_url.replace("0.0.0.0", "127.0.0.1")
        admin = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        heavy, quiet = "bench_heavy", "bench_quiet"
        for org_id in (heavy, quiet):
            assert admin.post("/v1/orgs", json={"org_id": org_id, "email": f"{org_id}@example.com"}).status_code in (
                200, 201)
        now_us = int(time.time() * 1e6)
        started = time.monotonic()
        asyncio.run(write_year(running.settings.database_url, heavy, args.rows, now_us))
        print(f"billing page: {args.rows:,} ledger rows written in {time.monotonic() - started:.1f} s")
        loads = []
        for _ in range(4):
            started = time.perf_counter()
            assert admin.get(f"/billing/{heavy}").status_code == 200
            loads.append((time.perf_counter() - started) * 1000)
        print(f"billing page: first load {loads[0]:,.0f} ms (keeps the closed months), then "
              f"{statistics.median(loads[1:]):,.0f} ms (median of 3)")
        token = admin.post(f"/v1/orgs/{heavy}/tokens", json={"ttl_s": 3600}).json()["token"]
        results: dict[str, list] = {"alone": [], "admin pages": [], "org-token pages": []}
        counts: dict[str, dict] = {"admin pages": {}, "org-token pages": {}}
        for _ in range(args.rounds):
            results["alone"] += gate_latencies_ms(base, quiet, args.seconds - 1)
            for name, with_token in (("admin pages", ADMIN_TOKEN), ("org-token pages", token)):
                latencies, seen = with_page_loads(base, heavy, with_token, quiet, args.seconds)
                results[name] += latencies
                for status, n in seen.items():
                    counts[name][status] = counts[name].get(status, 0) + n
        alone_p99 = percentile(results["alone"], 0.99)
        print(f"{'quiet org gate, ' + str(args.rounds) + ' interleaved rounds':44} {'checks':>8} {'p50 ms':>8}"
              f" {'p99 ms':>8} {'p99 / alone':>12}  page loads by status")
        for name, latencies in results.items():
            p99 = percentile(latencies, 0.99)
            print(f"{name:44} {len(latencies):>8,} {percentile(latencies, 0.5):>8.2f} {p99:>8.2f}"
                  f" {p99 / alone_p99:>12.2f}  {counts.get(name, '')}")


if __name__ == "__main__":
    main()
