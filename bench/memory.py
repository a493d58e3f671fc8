"""Memory per loaded org in a shard: load 100,000 orgs into a fresh shard process.

Baseline in the same run: the same process's RSS with nothing loaded.
Run: .venv/bin/python -m bench.memory
"""

from __future__ import annotations

import time

import ray

from bench.harness import create_orgs, gate_all, kill_shard_process, running_service, shard

ORGS = 100_000
TARGET_BYTES = 2_048


def rss() -> int:
    return ray.get(shard(0).stats.remote())["rss_bytes"]


def main() -> dict:
    with running_service(shards=1):
        started = time.perf_counter()
        ids = create_orgs(ORGS, "mem")
        created_s = time.perf_counter() - started
        old_pid = kill_shard_process()  # a fresh process: nothing loaded, no garbage from creation
        while True:
            try:
                if ray.get(shard(0).ready.remote(), timeout=30)["pid"] != old_pid:
                    break
            except Exception:  # noqa: BLE001 - restarting
                time.sleep(0.2)
        gate_all(ids[:10])  # imports and pools warm; 10 orgs are noise
        baseline = rss()
        started = time.perf_counter()
        gate_all(ids)
        load_s = time.perf_counter() - started
        loaded = rss()
        assert ray.get(shard(0).stats.remote())["loaded_orgs"] == ORGS
    per_org = (loaded - baseline) / ORGS
    print(f"created {ORGS:,} orgs in {created_s:.1f} s ({ORGS / created_s:,.0f}/s through the shard's group commit)")
    print(f"shard RSS: {baseline / 2**20:.1f} MiB empty (baseline), {loaded / 2**20:.1f} MiB with {ORGS:,} orgs"
          f" loaded in {load_s:.1f} s")
    print(f"memory per loaded org: {per_org:,.0f} bytes = {per_org / TARGET_BYTES:.2f} x the 2 KB target")
    return {"bytes_per_org": per_org, "baseline_rss": baseline, "loaded_rss": loaded, "load_s": load_s}


if __name__ == "__main__":
    main()
