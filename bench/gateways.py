"""Every way a gateway gates, in one run (issue 20, "What must be shown"): bench/relay.py's five
HTTP sides (plain uvicorn no-op, the hand-rolled uvicorn + asyncpg gate, POST /v1/gate, the
relay's POST /v1/gate and /v1/gate/batch) and, in the same interleaved rounds (the order
rotates each round), three more subjects:

  ts_local   the TypeScript client's local checks in Node (clients/typescript/bench/local-checks.mjs:
             GateClient.local() over 10,000 orgs, no server; single checks timed, timer included)
  py_local   the Python client's local checks (bench.client.measure_local: GateClient.check()
             over bench.client's 1,000 orgs, a client following this service's feed; single
             checks timed, timer included), the reference of ts_local's ratio
  workers    the Workers pattern's staleness (clients/typescript/bench/workers-staleness.mjs:
             a Worker in workerd gating with isolateGate follows this service; an org halted
             and resumed WORKER_CHANGES times in all, each change timed from the admin answer
             to the end of the Worker's first local answer showing it, an upper bound)

Goals: the relay >= 2.0x the hand-rolled gate; the TypeScript client >= 2,000,000 checks/s
with p99 <= 5 µs; the Workers pattern within its staleness bound (1 s). Prints one table.
Run: .venv/bin/python -m bench.gateways   (needs wrk, Node 20+ and npm)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from bench.gate import PROJECT_DIR, SECONDS, _med
from bench.relay import (
    CONNECTIONS,
    GOAL,
    LABELS,
    ROUNDS,
    http_sides,
    interleaved,
    load_side,
    medians,
    ratio_rounds,
    relay_counters,
)

PACKAGE = Path(PROJECT_DIR) / "clients" / "typescript"
TS_GOAL_CHECKS_PER_S = 2_000_000
TS_GOAL_P99_US = 5.0
WORKER_CHANGES = 54  # in all, WORKER_CHANGES / ROUNDS a round (an even number: each halt resumed)
WORKER_BOUND_MS = 1_000.0  # gate-worker.mjs's maxStalenessS
WORKER_ORG = "bench_worker"


def _node(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def build_typescript() -> None:
    """node_modules from the lockfile when missing, then dist/ with tsc when missing or older than src/."""
    if not (PACKAGE / "node_modules" / ".bin" / "tsc").exists() or not (PACKAGE / "node_modules" / "miniflare").exists():
        _node(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"], 600)
    built = PACKAGE / "dist" / "workers.js"
    newest_source = max(p.stat().st_mtime for p in (PACKAGE / "src").glob("*.ts"))
    if not built.exists() or built.stat().st_mtime < newest_source:
        _node([str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], 300)


def ts_local() -> dict:
    out = json.loads(_node(["node", "bench/local-checks.mjs"], 300).strip().splitlines()[-1])
    return {"checks_per_s": out["checks_per_s"], "p50_us": out["p50_us"], "p99_us": out["p99_us"],
            "p999_us": out["p999_us"], "orgs": out["orgs"], "node": out["node"]}


def py_local(base_url: str, ids: list[str]) -> dict:
    """A GateClient of its own for the round (synced, every org's view there), measured by
    bench.client.measure_local, then closed."""
    from bench.client import measure_local
    from bench.harness import SERVICE_TOKEN
    from metergate_client import GateClient

    gate = GateClient(base_url, SERVICE_TOKEN, max_staleness_s=1.0)
    try:
        assert gate.wait_synced(60), "the Python client did not sync within 60 s"
        deadline = time.monotonic() + 30
        while any(gate.projection.get(o) is None for o in ids):
            assert time.monotonic() < deadline, f"{len(gate.projection)} views after 30 s"
            time.sleep(0.05)
        m = measure_local(gate, ids)
    finally:
        gate.close()
    return {"checks_per_s": m["checks_per_s"], "p50_us": m["single_p50_us"], "p99_us": m["single_p99_us"],
            "batched_p99_us": m["batched_p99_us"], "orgs": len(ids)}


def workers(base_url: str, changes: int) -> dict:
    from bench.harness import ADMIN_TOKEN, SERVICE_TOKEN

    env = {"METERGATE_URL": base_url, "METERGATE_SERVICE_TOKEN": SERVICE_TOKEN, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN,
           "METERGATE_ORG": WORKER_ORG, "METERGATE_CHANGES": str(changes)}
    return json.loads(_node(["node", "bench/workers-staleness.mjs"], 300, env).strip().splitlines()[-1])


def pct(values: list[float], q: float) -> float:
    """Nearest rank, as workers-staleness.mjs takes it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _brief(name: str, r: dict) -> str:
    if name == "workers":
        return f"workers p50 {r['p50_ms']:.0f} ms max {r['max_ms']:.0f} ms"
    return f"{name} {r['checks_per_s']:,.0f}/s"


def _yes(met: bool) -> str:
    return "**yes**" if met else "**no**"


def main() -> dict:
    from bench.client import create_orgs, first_gate
    from bench.client import org_ids as client_org_ids
    from bench.harness import create_orgs_via_api, have_wrk, running_service

    assert have_wrk(), "this benchmark needs wrk (apt-get install wrk)"
    started = time.monotonic()
    build_typescript()
    per_round = 2 * math.ceil(WORKER_CHANGES / ROUNDS / 2)
    with running_service() as service, http_sides(service) as (sides, relay_url):
        ids = client_org_ids()
        create_orgs(service.base_url, ids)
        first_gate(service.base_url)
        create_orgs_via_api(service.base_url, [WORKER_ORG])
        subjects = {name: lambda side=side: load_side(side) for name, side in sides.items()}
        subjects |= {"ts_local": ts_local, "py_local": lambda: py_local(service.base_url, ids),
                     "workers": lambda: workers(service.base_url, per_round)}
        rounds = interleaved(subjects, brief=_brief)
        counters = relay_counters(relay_url)
    elapsed = time.monotonic() - started

    http = medians(rounds, list(sides))
    over_handrolled = {name: _med(ratio_rounds(rounds, name, "handrolled")) for name in sides}
    relay_rounds = ratio_rounds(rounds, "relay", "handrolled")
    local = medians(rounds, ["ts_local", "py_local"], ("checks_per_s", "p50_us", "p99_us"))
    ts_over_py_rounds = ratio_rounds(rounds, "ts_local", "py_local")
    ts_over_py = _med(ts_over_py_rounds)
    each = [ms for r in rounds for ms in r["workers"]["each_ms"]]
    lower = [ms for r in rounds for ms in r["workers"]["lower_each_ms"]]
    stale = {"changes": len(each), "p50_ms": pct(each, 0.5), "p99_ms": pct(each, 0.99), "max_ms": max(each),
             "lower_p50_ms": pct(lower, 0.5), "lower_p99_ms": pct(lower, 0.99),
             "local_age_p99_s": max(r["workers"]["local_age_p99_s"] for r in rounds)}
    ts, py = local["ts_local"], local["py_local"]
    met = {"relay": over_handrolled["relay"] >= GOAL,
           "ts_checks": ts["checks_per_s"] >= TS_GOAL_CHECKS_PER_S, "ts_p99": ts["p99_us"] <= TS_GOAL_P99_US,
           "workers": stale["p99_ms"] <= WORKER_BOUND_MS}

    print(f"\nmedians of {ROUNDS} interleaved rounds ({elapsed:.0f} s in all); HTTP: wrk {SECONDS} s,"
          f" {CONNECTIONS} connections unless noted; ratios are medians of the rounds' own ratios")
    print("| subject | checks/s | p50 | p99 | ratio | goal | met |\n|---|---|---|---|---|---|---|")
    for name in sides:
        m = http[name]
        goal = (f"≥ {GOAL:.1f}× hand-rolled", _yes(met["relay"])) if name == "relay" else ("", "")
        print(f"| {LABELS[name]} | {m['checks_per_s']:,.0f} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms"
              f" | {over_handrolled[name]:.2f}× hand-rolled | {goal[0]} | {goal[1]} |")
    print(f"| Python GateClient.check(), 1 thread, {rounds[0]['py_local']['orgs']:,} orgs, following the feed"
          f" | {py['checks_per_s']:,.0f} | {py['p50_us']:.2f} µs | {py['p99_us']:.2f} µs | 1.00× Python | (reference) | |")
    print(f"| TypeScript GateClient.local(), Node {rounds[0]['ts_local']['node']}, {rounds[0]['ts_local']['orgs']:,} orgs"
          f" | {ts['checks_per_s']:,.0f} | {ts['p50_us']:.2f} µs | {ts['p99_us']:.2f} µs | {ts_over_py:.2f}× Python"
          f" | ≥ {TS_GOAL_CHECKS_PER_S:,}/s; p99 ≤ {TS_GOAL_P99_US:.0f} µs | {_yes(met['ts_checks'])}; {_yes(met['ts_p99'])} |")
    print(f"| Workers pattern (isolateGate in workerd): admin answer → the Worker's local decision,"
          f" {stale['changes']} changes | | {stale['p50_ms']:.0f} ms | {stale['p99_ms']:.0f} ms"
          f" | max {stale['max_ms']:.0f} ms | p99 ≤ {WORKER_BOUND_MS:,.0f} ms (the bound) | {_yes(met['workers'])} |")

    def listed(values: list[float], fmt: str = "{:.2f}") -> str:
        return ", ".join(fmt.format(v) for v in values)

    print(f"\nrelay / hand-rolled by round: {listed(relay_rounds)}; TypeScript / Python by round: {listed(ts_over_py_rounds)}")
    print(f"local p50/p99 are single checks timed with the timer in them; Python per check in batches of 100:"
          f" p99 {_med([r['py_local']['batched_p99_us'] for r in rounds]):.2f} µs; TypeScript p99.9"
          f" {_med([r['ts_local']['p999_us'] for r in rounds]):.2f} µs")
    print(f"Workers staleness is an upper bound (the end of the first answer showing the change); lower bound"
          f" (the start of the request before it): p50 {stale['lower_p50_ms']:.0f} ms, p99 {stale['lower_p99_ms']:.0f} ms;"
          f" a request every ~10 ms, changes 0.25-2.25 s apart; oldest local answer's view, p99 per round at most {stale['local_age_p99_s']:.3f} s")
    errors = ", ".join(f"{name} {http[name]['errors']}" for name in sides)
    print(f"wrk errors (all rounds): {errors}; relay's checks by source: {counters}")
    return {"http": http, "over_handrolled": over_handrolled, "relay_over_handrolled_rounds": relay_rounds,
            "local": local, "ts_over_py": ts_over_py, "ts_over_py_rounds": ts_over_py_rounds,
            "workers": stale, "met": met, "rounds": rounds, "relay_counters": counters, "elapsed_s": elapsed}


if __name__ == "__main__":
    main()
