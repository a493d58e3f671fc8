"""The relay's POST /v1/gate, side by side in one run with bench/gate.py's baselines (issue 20).

Five servers, each loaded by wrk, interleaved over ROUNDS rounds (the order rotates each
round, as in bench/gate.py, so that a noisy 2-core host slows every side alike):

  (a) plain uvicorn, a no-op ASGI handler                          (bench.gate.noop_app)
  (b) the hand-rolled gate: uvicorn + asyncpg, one indexed SELECT per check (bench.gate.handrolled_app)
  (c) metergate POST /v1/gate, through its HAProxy ingress
  (d) the relay's POST /v1/gate (`python -m metergate_client.relay`, one process, following
      the service's feed; every answer checked `local` before the load)
  (e) the relay's POST /v1/gate/batch, 1,000 checks a request

The goal: (d) at least 2.0x (b). Run: .venv/bin/python -m bench.relay   (needs wrk)
bench/gateways.py runs the same sides (http_sides, interleaved) beside the TypeScript client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import httpx

from bench.gate import (
    BATCH_CHECKS,
    BATCH_CONNECTIONS,
    CONNECTIONS,
    DSN_ENV,
    ORGS,
    PROJECT_DIR,
    SECONDS,
    WARM_SECONDS,
    _check_answers,
    _drop_handrolled_table,
    _make_handrolled_table,
    _med,
    _wait_port,
    uvicorn_server,
)

ROUNDS = 3
GOAL = 2.0
LABELS = {
    "uvicorn_noop": "plain uvicorn, no-op ASGI handler",
    "handrolled": "uvicorn + asyncpg, one indexed SELECT per check (hand-rolled)",
    "gate": "metergate POST /v1/gate (HAProxy, Serve)",
    "relay": "relay POST /v1/gate (loopback, local answers)",
    "relay_batch": f"relay POST /v1/gate/batch ({BATCH_CHECKS:,} checks/request, {BATCH_CONNECTIONS} conns)",
}


@contextmanager
def relay_server(service_url: str, token: str):
    """The relay as a gateway runs it, a subprocess on a free loopback port; yields its URL
    once every org's check is answered `local`."""
    from bench.harness import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "metergate_client.relay", "--url", service_url, "--port", str(port),
         "--max-staleness-s", "1.0", "--heartbeat-s", "0.25"],
        cwd=PROJECT_DIR, env={**os.environ, "METERGATE_SERVICE_TOKEN": token})
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_local(url: str, org_ids: list[str], token: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        while True:
            sources = {http.post("/v1/gate", json={"org_id": o, "action": "create"}).json().get("source")
                       for o in org_ids}
            if sources == {"local"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not answer every org locally within {timeout_s} s: {sources}")
            time.sleep(0.2)


@contextmanager
def http_sides(service):
    """(a)-(e) on the running service: the orgs created, every server started, its first answer
    checked and its path warmed. Yields (sides, relay_url); sides maps a name to
    (url, bodies, connections, checks per request). Stops the servers on the way out."""
    from bench.harness import SERVICE_TOKEN, create_orgs_via_api, wrk

    org_ids = [f"bench_{n}" for n in range(ORGS)]
    bodies = [json.dumps({"org_id": org_id, "action": "create",
                          "resources": {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 10240}})
              for org_id in org_ids]
    batch = [json.dumps({"checks": [json.loads(bodies[(n + k) % ORGS]) for k in range(BATCH_CHECKS)]})
             for n in range(4)]
    with ExitStack() as servers:
        dsn = service.settings.database_url
        create_orgs_via_api(service.base_url, org_ids)
        _make_handrolled_table(dsn, org_ids)
        servers.callback(_drop_handrolled_table, dsn)
        uvicorn_url = servers.enter_context(uvicorn_server("noop_app"))
        handrolled_url = servers.enter_context(uvicorn_server("handrolled_app", {DSN_ENV: dsn})) + "/v1/gate"
        relay_url = servers.enter_context(relay_server(service.base_url, SERVICE_TOKEN))
        _wait_local(relay_url, org_ids, SERVICE_TOKEN)
        sides = {
            "uvicorn_noop": (uvicorn_url + "/", bodies, CONNECTIONS, 1),
            "handrolled": (handrolled_url, bodies, CONNECTIONS, 1),
            "gate": (service.base_url + "/v1/gate", bodies, CONNECTIONS, 1),
            "relay": (relay_url + "/v1/gate", bodies, CONNECTIONS, 1),
            "relay_batch": (relay_url + "/v1/gate/batch", batch, BATCH_CONNECTIONS, BATCH_CHECKS),
        }
        for url, load, _, checks in sides.values():
            _check_answers(url, load[0], batch=checks > 1)
        for url, load, connections, _ in sides.values():  # warm every path
            wrk(url, load, WARM_SECONDS, connections)
        yield sides, relay_url


def load_side(side: tuple) -> dict:
    """One wrk load of SECONDS on a side: requests/s, checks/s, p50 and p99 in ms, errors."""
    from bench.harness import wrk

    url, load, connections, checks = side
    result = wrk(url, load, SECONDS, connections)
    result["checks_per_s"] = result["rps"] * checks
    return result


def interleaved(subjects: dict[str, Callable[[], dict]], rounds: int = ROUNDS,
                brief: Callable[[str, dict], str] | None = None) -> list[dict[str, dict]]:
    """Each subject once a round, the order rotated each round; a line per round."""
    brief = brief or (lambda name, r: f"{name} {r['checks_per_s']:,.0f}/s")
    names = list(subjects)
    results_by_round: list[dict[str, dict]] = []
    for round_no in range(rounds):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        results = {name: subjects[name]() for name in order}
        results_by_round.append(results)
        print(f"  round {round_no + 1}: " + ", ".join(brief(n, results[n]) for n in names), flush=True)
    return results_by_round


def medians(rounds: list[dict[str, dict]], names, keys=("checks_per_s", "rps", "p50_ms", "p99_ms")) -> dict:
    return {name: {key: _med([r[name][key] for r in rounds]) for key in keys}
            | {"errors": sum(r[name].get("errors", 0) for r in rounds)} for name in names}


def ratio_rounds(rounds: list[dict[str, dict]], top: str, bottom: str) -> list[float]:
    return [r[top]["checks_per_s"] / r[bottom]["checks_per_s"] for r in rounds]


def relay_counters(relay_url: str) -> dict:
    with httpx.Client(base_url=relay_url, timeout=10) as http:
        return {line.split()[0]: line.split()[1] for line in http.get("/metrics").text.splitlines()
                if line.startswith("metergate_relay_checks_total")}


def main() -> dict:
    from bench.harness import have_wrk, running_service

    assert have_wrk(), "this benchmark needs wrk (apt-get install wrk)"
    started = time.monotonic()
    with running_service() as service, http_sides(service) as (sides, relay_url):
        rounds = interleaved({name: lambda side=side: load_side(side) for name, side in sides.items()})
        counters = relay_counters(relay_url)
    elapsed = time.monotonic() - started

    names = list(sides)
    medianed = medians(rounds, names)
    relay_over_handrolled = ratio_rounds(rounds, "relay", "handrolled")
    relay_over_gate = ratio_rounds(rounds, "relay", "gate")
    relay_over_noop = ratio_rounds(rounds, "relay", "uvicorn_noop")
    result = {"servers": medianed, "rounds": rounds, "relay_counters": counters, "elapsed_s": elapsed,
              "relay_over_handrolled": _med(relay_over_handrolled), "relay_over_handrolled_rounds": relay_over_handrolled,
              "relay_over_gate": _med(relay_over_gate), "relay_over_noop": _med(relay_over_noop)}
    print(f"\nmedians of {ROUNDS} interleaved rounds of {SECONDS} s; wrk, {CONNECTIONS} connections"
          f" unless noted ({elapsed:.0f} s in all)")
    print("| server | checks/s | requests/s | p50 | p99 | errors |\n|---|---|---|---|---|---|")
    for name in names:
        m = medianed[name]
        print(f"| {LABELS[name]} | {m['checks_per_s']:,.0f} | {m['rps']:,.0f} | {m['p50_ms']:.2f} ms"
              f" | {m['p99_ms']:.2f} ms | {m['errors']} |")

    def ratios(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(f"\nrelay / hand-rolled:   {result['relay_over_handrolled']:.2f} x (rounds {ratios(relay_over_handrolled)})"
          f"  target >= {GOAL}")
    print(f"relay / POST /v1/gate: {result['relay_over_gate']:.2f} x (rounds {ratios(relay_over_gate)})")
    print(f"relay / uvicorn no-op: {result['relay_over_noop']:.2f} x (rounds {ratios(relay_over_noop)})")
    print(f"relay's checks by source: {counters}")
    return result


if __name__ == "__main__":
    main()
