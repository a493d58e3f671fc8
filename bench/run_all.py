"""All benchmarks, one after another (each starts and stops its own service).

Run: make bench   (the gate benchmark needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import os

from bench import gate, memory, recovery, usage


def main() -> None:
    results = {}
    for name, module in (("gate", gate), ("usage", usage), ("memory", memory), ("recovery", recovery)):
        print(f"\n=== {name} ===", flush=True)
        results[name] = module.main()
    os.environ["BENCH_ORGS"] = "100"
    print("\n=== usage, ticks clustered (10 per org per batch) ===", flush=True)
    usage.ORGS = 100
    results["usage_clustered"] = usage.main()
    print("\n=== summary ===")
    print(f"gate:     {results['gate']['gate']['rps']:.0f} req/s = {results['gate']['gate_over_floor']:.2f} x no-op floor"
          f" (p50 {results['gate']['gate']['p50_ms']:.1f} ms, p99 {results['gate']['gate']['p99_ms']:.1f} ms)")
    print(f"usage:    {results['usage']['durable_ticks_per_s']:,.0f} durable ticks/s (1 tick per org per batch),"
          f" {results['usage_clustered']['durable_ticks_per_s']:,.0f} (10 per org per batch)")
    print(f"memory:   {results['memory']['bytes_per_org']:,.0f} bytes per loaded org")
    print(f"recovery: {results['recovery']['recovered_s']:.2f} s for 10,000 orgs after kill -9")


if __name__ == "__main__":
    main()
