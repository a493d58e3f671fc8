"""All benchmarks, one after another (each starts and stops its own service).

Each runs in a child process of its own: a service stop whose Serve steps overrun their
time budget can leave threads behind that start a new local Ray in the process that ran it
(serve_app/launch.py stop()), which would break the next benchmark's start.
Run: make bench   (the gate benchmark needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module: str, env: dict[str, str] | None = None) -> dict:
    """python -m bench.run_all one MODULE RESULT_FILE, in a child process; its result."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result_file:
        code = subprocess.run([sys.executable, "-m", "bench.run_all", "one", module, result_file.name],
                              cwd=PROJECT_DIR, env={**os.environ, **(env or {})}, check=False).returncode
        if code != 0:
            raise RuntimeError(f"python -m {module} failed (exit code {code})")
        return json.load(result_file)


def main() -> None:
    results = {}
    for name in ("gate", "client", "usage", "memory", "recovery", "recovery_tails"):
        print(f"\n=== {name} ===", flush=True)
        results[name] = run(f"bench.{name}")
    print("\n=== usage, ticks clustered (10 per org per batch) ===", flush=True)
    results["usage_clustered"] = run("bench.usage", {"BENCH_ORGS": "100"})
    print("\n=== summary ===")
    g, c = results["gate"], results["client"]
    print(f"gate:     {g['servers']['gate']['rps']:,.0f} req/s = {g['gate_over_handrolled']:.2f} x the hand-rolled"
          f" uvicorn + asyncpg gate, {g['gate_over_floor']:.2f} x the Serve floor (p50 {g['servers']['gate']['p50_ms']:.1f}"
          f" ms, p99 {g['servers']['gate']['p99_ms']:.1f} ms); batch {g['batch_checks_per_s']:,.0f} checks/s;"
          f" Serve floor = {g['floor_over_uvicorn']:.2f} x plain uvicorn")
    paced, churn = c["staleness_paced"], c["staleness_churn"]
    print(f"client:   {c['local']['checks_per_s']:,.0f} local checks/s, p99 {c['local']['batched_p99_us']:.2f} µs"
          f" (batches of 100) / {c['local']['single_p99_us']:.2f} µs (single); commit-to-view p99 between"
          f" {paced['ack_p99_ms']:.0f} and {paced['entry_p99_ms']:.0f} ms (paced grants), {churn['ack_p99_ms']:.0f}"
          f" and {churn['entry_p99_ms']:.0f} ms (under tick churn); gate views cost {c['ticks']['cost'] * 100:.1f} %"
          f" of durable ticks/s")
    print(f"usage:    {results['usage']['durable_ticks_per_s']:,.0f} durable ticks/s (1 tick per org per batch),"
          f" {results['usage_clustered']['durable_ticks_per_s']:,.0f} (10 per org per batch)")
    print(f"memory:   {results['memory']['bytes_per_org']:,.0f} bytes per loaded org")
    print(f"recovery: {results['recovery']['recovered_s']:.2f} s for 10,000 orgs after kill -9")


def one(module: str, result_path: str) -> None:
    result = importlib.import_module(module).main()
    with open(result_path, "w") as out:
        json.dump(result, out, default=str)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        one(sys.argv[2], sys.argv[3])
    else:
        main()
