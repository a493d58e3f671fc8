"""Soak: steady gate, lease, credit and tick load for minutes, with faults injected on a
schedule, and every invariant checked after each one. Not in `make test` (it takes minutes).

Each round runs the traffic of tests/chaos/traffic.py (ticks, keyed credits, lease cycles,
gate checks) through one fault of tests/chaos/faults.py, in turn: kill -9 of a shard, of
the ingress replica, of HAProxy, of the scheduler; Postgres stopped for 10 s; connections
cut at COMMIT both ways. After each round the callers retry what failed, then the
invariants are checked: every acknowledged tick and credit present exactly once, balance =
ledger = what was sent, no lease left counted, the gate right, and every failure a caller
saw a 503 with Retry-After. It prints requests served, faults injected and survived,
invariant checks run and violations found (0, or the exit code is 1).

The service is the one the tests run: embedded Postgres behind tests/pgproxy.py (the
commit cuts need it), local Ray, Serve with HAProxy.
Run: .venv/bin/python -m bench.soak [--minutes 10] [--orgs 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import ADMIN_TOKEN, SERVICE_TOKEN, free_port
from config.settings import Settings
from tests.chaos.faults import FAULTS, through_fault
from tests.helpers import Sql
from tests.pgproxy import PgProxy

ROUND_MAX_S = 120  # one round's traffic ends by itself after this
CREDIT_EACH_MICROS = 1_000_000_000  # 1,000 USD per org: no org halts during a soak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--orgs", type=int, default=8)
    args = parser.parse_args(argv)
    from serve_app import launch
    from storage.db import start_embedded_postgres

    # SIGTERM ends the soak like Ctrl-C: the service it started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data_dir = Path(tempfile.mkdtemp(prefix="metergate-soak-"))
    upstream_url, pg_server = start_embedded_postgres(data_dir)
    proxy = PgProxy(upstream_url)
    settings = Settings(data_dir=data_dir, database_url=proxy.url, http_port=free_port(),
                        service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN, shards=2,
                        dashboard=False, metrics_port=0)
    running = None
    totals = {"rounds": 0, "requests": 0, "ticks": 0, "credits": 0, "gate_checks": 0,
              "faults_injected": 0, "faults_survived": 0, "invariant_checks": 0, "violations": 0,
              "by_fault": {}}
    try:
        running = launch.start(settings, ray_init_kwargs={"num_cpus": 2, "log_to_driver": False})
        running.pg_server, running.pg_proxy = pg_server, proxy
        sql = Sql(proxy.url)
        with httpx.Client(base_url=running.base_url, timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            orgs = _create_orgs(admin, args.orgs)
            deadline = time.monotonic() + args.minutes * 60
            names = list(FAULTS)
            while time.monotonic() < deadline:
                fault = names[totals["rounds"] % len(names)]
                totals["faults_injected"] += 1
                traffic, violations = through_fault(running, admin, sql, orgs, fault, ADMIN_TOKEN, SERVICE_TOKEN,
                                                    max_s=ROUND_MAX_S)
                summary = traffic.summary()
                totals["rounds"] += 1
                totals["faults_survived"] += not violations
                totals["violations"] += len(violations)
                totals["invariant_checks"] += traffic.checks
                for name in ("requests", "ticks", "credits", "gate_checks"):
                    totals[name] += summary[name]
                per = totals["by_fault"].setdefault(fault, {"injected": 0, "violations": 0, "outage_s": []})
                per["injected"] += 1
                per["violations"] += len(violations)
                per["outage_s"].append(round(traffic.fault_s, 1))
                print(f"round {totals['rounds']} {fault}: fault {traffic.fault_s:.1f} s, {summary['requests']} "
                      f"requests, {summary['not_acknowledged']} not acknowledged then retried, "
                      f"{len(violations)} violations", flush=True)
                for line in violations[:10]:
                    print(f"  violation: {line}", flush=True)
    finally:
        if running is not None:
            launch.stop(running)
        else:
            pg_server.cleanup()
        proxy.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"soak: {totals['rounds']} rounds, {totals['requests']:,} requests ({totals['ticks']:,} ticks, "
          f"{totals['credits']:,} credits, {totals['gate_checks']:,} gate checks); faults injected "
          f"{totals['faults_injected']}, survived {totals['faults_survived']}; invariant checks "
          f"{totals['invariant_checks']:,}; violations {totals['violations']}")
    print(json.dumps(totals))
    return totals


def _create_orgs(admin: httpx.Client, count: int) -> list[str]:
    orgs = [f"soak_{n}_{int(time.time())}" for n in range(count)]
    for org in orgs:
        assert admin.post("/v1/orgs", json={"org_id": org, "email": f"{org}@example.com"}).status_code == 201
        assert admin.post(f"/v1/orgs/{org}/credits",
                          json={"kind": "grant", "amount_micros": CREDIT_EACH_MICROS}).status_code == 201
    return orgs


if __name__ == "__main__":
    sys.exit(1 if main()["violations"] else 0)
