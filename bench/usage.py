"""Durable usage ticks/s through POST /v1/usage in batches of 1,000.

Every 200 response means its ticks are committed to Postgres. Baseline in the same run: the
same bodies posted to a no-op Serve endpoint (what HTTP alone carries).
Run: .venv/bin/python -m bench.usage
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime, timezone

import httpx
import msgspec

from bench.harness import SERVICE_TOKEN, create_orgs_via_api, deploy_noop, running_service

BATCH = 1_000
REQUESTS = 200
ROUNDS = 3
CONCURRENCY = int(__import__("os").environ.get("BENCH_CONCURRENCY", "16"))
ORGS = int(__import__("os").environ.get("BENCH_ORGS", "1000"))


def bodies(prefix: str) -> list[bytes]:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for r in range(REQUESTS):
        ticks = [{"tick_id": f"{prefix}-{r}-{n}", "org_id": f"u_{(r * BATCH + n) % ORGS}",
                  "lease_id": f"sbx_{n % 7}", "started_at": started, "duration_ms": 5_000,
                  "memory_mb": 2048, "cpu_count": 1, "disk_mb": 1024} for n in range(BATCH)]
        out.append(msgspec.json.encode({"ticks": ticks}))
    return out


async def blast(url: str, payloads: list[bytes], until: float | None = None,
                concurrency: int | None = None) -> tuple[float, int]:
    """Post every payload (or stop at time.monotonic() `until`), `concurrency` in flight
    (default CONCURRENCY); returns (seconds, ticks accepted)."""
    queue = list(payloads)
    accepted = 0
    concurrency = concurrency or CONCURRENCY

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal accepted
        while queue and (until is None or time.monotonic() < until):
            body = queue.pop()
            response = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 200, response.text[:300]
            data = response.json()
            accepted += data.get("accepted", BATCH)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started, accepted


def main() -> dict:
    """Baseline and durable runs interleaved, ROUNDS each: medians, so a noisy host cancels out."""
    floors, durables = [], []
    with running_service() as service:
        deploy_noop()
        create_orgs_via_api(service.base_url, [f"u_{n}" for n in range(ORGS)])
        asyncio.run(blast(service.base_url + "/v1/usage", bodies("warm")[:20]))
        for round_no in range(ROUNDS):
            noop_s, _ = asyncio.run(blast(service.base_url + "/noop", bodies(f"noop{round_no}")))
            usage_s, accepted = asyncio.run(blast(service.base_url + "/v1/usage", bodies(f"run{round_no}")))
            assert accepted == REQUESTS * BATCH, accepted
            floors.append(REQUESTS * BATCH / noop_s)
            durables.append(accepted / usage_s)
            print(f"  round {round_no + 1}: no-op {floors[-1]:,.0f} ticks/s, durable {durables[-1]:,.0f} ticks/s",
                  flush=True)
    floor, durable = statistics.median(floors), statistics.median(durables)
    ratio = statistics.median(d / f for d, f in zip(durables, floors))
    print(f"no-op Serve endpoint, same bodies: {floor:,.0f} ticks/s (median of {ROUNDS})")
    print(f"POST /v1/usage durable:           {durable:,.0f} ticks/s (median of {ROUNDS}; {ORGS} orgs,"
          f" batches of {BATCH}, {CONCURRENCY} in flight)")
    print(f"durable / floor = {ratio:.2f}; target >= 50,000 ticks/s")
    return {"noop_ticks_per_s": floor, "durable_ticks_per_s": durable, "ratio": ratio,
            "durable_rounds": durables, "noop_rounds": floors}


if __name__ == "__main__":
    main()
