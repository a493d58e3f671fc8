"""What shadow mode costs on durable ticks/s (issue 22: at most 5 %). One service, 1,000 orgs
enforced and 1,000 in shadow (PUT /v1/orgs/{id}/enforcement), the same bodies shape as
bench/usage.py (batches of 1,000 ticks, 16 in flight), rounds interleaved enforced / shadow so
a noisy host hits both alike; prints each round and the median ratio shadow / enforced.

    PYTHONPATH=. .venv/bin/python -m bench.shadow_cost
"""

from __future__ import annotations

import asyncio
import os
import statistics
from datetime import datetime, timezone

import httpx
import msgspec

from bench.harness import ADMIN_TOKEN, create_orgs_via_api, running_service
from bench.usage import BATCH, blast

ORGS = int(os.environ.get("BENCH_ORGS", "1000"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "150"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def bodies(prefix: str, group: str) -> list[bytes]:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [msgspec.json.encode({"ticks": [
        {"tick_id": f"{prefix}-{r}-{n}", "org_id": f"{group}_{(r * BATCH + n) % ORGS}", "lease_id": f"sbx_{n % 7}",
         "started_at": started, "duration_ms": 5_000, "memory_mb": 2048, "cpu_count": 1, "disk_mb": 1024}
        for n in range(BATCH)]}) for r in range(REQUESTS)]


def to_shadow(base_url: str, org_ids: list[str]) -> None:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as admin:
        for org_id in org_ids:
            answer = admin.put(f"/v1/orgs/{org_id}/enforcement", json={"mode": "shadow"})
            assert answer.status_code == 200 and answer.json()["enforcement"] == "shadow", answer.text


def main() -> dict:
    enforced, shadow = [], []
    with running_service() as service:
        url = service.base_url + "/v1/usage"
        create_orgs_via_api(service.base_url, [f"e_{n}" for n in range(ORGS)] + [f"s_{n}" for n in range(ORGS)])
        to_shadow(service.base_url, [f"s_{n}" for n in range(ORGS)])
        asyncio.run(blast(url, bodies("warm-e", "e")[:20]))
        asyncio.run(blast(url, bodies("warm-s", "s")[:20]))
        for round_no in range(ROUNDS):
            for group, results in (("e", enforced), ("s", shadow)) if round_no % 2 == 0 else (
                    ("s", shadow), ("e", enforced)):
                seconds, accepted = asyncio.run(blast(url, bodies(f"r{round_no}-{group}", group)))
                assert accepted == REQUESTS * BATCH, accepted
                results.append(accepted / seconds)
            print(f"  round {round_no + 1}: enforced {enforced[-1]:,.0f} ticks/s, shadow {shadow[-1]:,.0f} ticks/s",
                  flush=True)
    ratio = statistics.median(s / e for s, e in zip(shadow, enforced))
    print(f"enforced: {statistics.median(enforced):,.0f} ticks/s, shadow: {statistics.median(shadow):,.0f} ticks/s "
          f"(medians of {ROUNDS}; {ORGS} orgs each, batches of {BATCH})")
    print(f"shadow / enforced = {ratio:.3f} (median of the rounds' ratios); target >= 0.95")
    return {"enforced_ticks_per_s": enforced, "shadow_ticks_per_s": shadow, "ratio": ratio}


if __name__ == "__main__":
    main()
