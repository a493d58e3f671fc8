"""Import speed and memory (issue 22 part 2): `metergate import FILE` of N orgs, against the
same orgs made the plain way in the same run (POST /v1/orgs, then one POST credits per amount,
32 requests in flight), on the real service (embedded Postgres, Ray, Serve).

    PYTHONPATH=. .venv/bin/python bench/import_orgs.py --orgs 100000

Prints orgs/s of both and the ratio of those rates (the plain way on at most 10,000 of them
unless --baseline-orgs says otherwise), the import CLI's peak RSS (it streams the file: memory
of one chunk, whatever N) and what the shard processes grew by holding the imported orgs, and the
second run's orgs/s (every org unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.harness import ADMIN_TOKEN, running_service

METERGATE = Path(sys.executable).parent / "metergate"
IN_FLIGHT = 32


def org_line(prefix: str, n: int) -> dict:
    """An org of the source: a balance, one in three with an expiring grant, one in eleven a debt."""
    org_id = f"{prefix}_{n}"
    line = {"org_id": org_id, "email": f"{org_id}@example.com", "balance_micros": 1_000_000 + n}
    if n % 11 == 0:
        line["balance_micros"] = -5_000 - n
    elif n % 3 == 0:
        line["grants"] = [{"id": f"{org_id}_g1", "kind": "grant", "amount_micros": 500_000,
                           "expires_at": "2031-01-01T00:00:00Z"}]
    return line


def shard_rss_bytes() -> int:
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("ShardActor" in part for part in proc.info["cmdline"] or ()):
                total += proc.memory_info().rss
        except (psutil.Error, OSError):
            continue
    return total


async def plain_way(base_url: str, lines: list[dict]) -> float:
    """The baseline: each org created, then each of its amounts booked, by the public API."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        queue = list(reversed(lines))

        async def worker() -> None:
            while queue:
                line = queue.pop()
                created = await client.post("/v1/orgs", json={"org_id": line["org_id"], "email": line["email"]})
                assert created.status_code in (200, 201), created.text
                rest = line["balance_micros"] - sum(g["amount_micros"] for g in line.get("grants", ()))
                for grant in line.get("grants", ()):
                    booked = await client.post(f"/v1/orgs/{line['org_id']}/credits", json={
                        "kind": "grant", "amount_micros": grant["amount_micros"], "expires_at": grant["expires_at"]})
                    assert booked.status_code == 201, booked.text
                if rest:
                    booked = await client.post(f"/v1/orgs/{line['org_id']}/credits",
                                               json={"kind": "adjustment", "amount_micros": rest})
                    assert booked.status_code == 201, booked.text

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return time.perf_counter() - started


def import_run(base_url: str, path: Path) -> tuple[float, dict, int]:
    """(seconds, the CLI's --json answer, its peak RSS in KiB, sampled every 20 ms: wait4's
    ru_maxrss would count the pages of this process the child had between fork and exec)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update({"METERGATE_URL": base_url, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN})
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen([str(METERGATE), "import", str(path), "--json"], env=env, stdout=stdout,
                                 stderr=stderr, text=True)
        peak = 0
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"metergate import failed: {stderr.read()[-2000:]}")
        return seconds, json.loads(stdout.read()), peak // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=100_000)
    parser.add_argument("--baseline-orgs", type=int, default=None,
                        help="orgs made the plain way for the baseline rate (default: --orgs, at most 10,000: "
                             "at ~200 orgs/s a plain 100k would take the better part of ten minutes)")
    args = parser.parse_args()
    n = args.orgs
    b = args.baseline_orgs if args.baseline_orgs is not None else min(n, 10_000)
    with running_service() as running, tempfile.TemporaryDirectory() as folder:
        base = running.base_url
        baseline_lines = [org_line("plain", i) for i in range(b)]
        plain_s = asyncio.run(plain_way(base, baseline_lines))
        del baseline_lines

        path = Path(folder) / "orgs.jsonl"
        with path.open("w") as handle:
            for i in range(n):
                handle.write(json.dumps(org_line("imported", i)) + "\n")
        file_bytes = path.stat().st_size
        rss_before = shard_rss_bytes()
        first_s, first, cli_peak_kib = import_run(base, path)
        rss_after = shard_rss_bytes()
        second_s, second, _ = import_run(base, path)
        assert (first["created"], second["unchanged"], first["bad"]) == (n, n, 0), (first, second)
    report = {
        "orgs": n, "baseline_orgs": b, "file_bytes": file_bytes,
        "import_orgs_per_s": round(n / first_s, 1), "plain_api_orgs_per_s": round(b / plain_s, 1),
        "import_over_plain": round((n / first_s) / (b / plain_s), 2), "rerun_unchanged_orgs_per_s": round(n / second_s, 1),
        "import_cli_peak_rss_mib": round(cli_peak_kib / 1024, 1),
        "shard_rss_growth_mib": round((rss_after - rss_before) / 2**20, 1),
        "shard_rss_bytes_per_org": round((rss_after - rss_before) / n),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
