"""Gate checks/s and p50/p99 through Serve, against a no-op Serve endpoint (the floor).

Run: .venv/bin/python -m bench.gate   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import json

from bench.harness import create_orgs_via_api, deploy_noop, have_wrk, running_service, wrk

SECONDS = 10
ROUNDS = 3
CONNECTIONS = 16
ORGS = 100
BATCH_CHECKS = 1_000
BATCH_CONNECTIONS = 4


def main() -> dict:
    assert have_wrk(), "this benchmark needs wrk (apt-get install wrk)"
    with running_service() as service:
        deploy_noop()
        create_orgs_via_api(service.base_url, [f"bench_{n}" for n in range(ORGS)])
        bodies = [json.dumps({"org_id": f"bench_{n}", "action": "create",
                              "resources": {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 10240}})
                  for n in range(ORGS)]
        batch = [json.dumps({"checks": [json.loads(bodies[(n + k) % ORGS]) for k in range(BATCH_CHECKS)]})
                 for n in range(4)]
        wrk(service.base_url + "/noop", bodies, 3, CONNECTIONS)  # warm every path
        wrk(service.base_url + "/v1/gate", bodies, 3, CONNECTIONS)
        wrk(service.base_url + "/v1/gate/batch", batch, 3, BATCH_CONNECTIONS)
        rounds, batches = [], []  # interleaved, so a noisy host slows every side alike
        for _ in range(ROUNDS):
            rounds.append((wrk(service.base_url + "/noop", bodies, SECONDS, CONNECTIONS),
                           wrk(service.base_url + "/v1/gate", bodies, SECONDS, CONNECTIONS)))
            batches.append(wrk(service.base_url + "/v1/gate/batch", batch, SECONDS, BATCH_CONNECTIONS))
    ratios = [g["rps"] / f["rps"] for f, g in rounds]
    median_index = sorted(range(ROUNDS), key=lambda i: ratios[i])[ROUNDS // 2]
    floor, gate = rounds[median_index]
    checks_per_s = sorted(b["rps"] * BATCH_CHECKS for b in batches)
    result = {"noop_floor": floor, "gate": gate, "gate_over_floor": ratios[median_index],
              "ratios": ratios, "target_ratio": 0.8, "connections": CONNECTIONS, "seconds": SECONDS,
              "batch_checks_per_s": checks_per_s[ROUNDS // 2], "batch_errors": sum(b["errors"] for b in batches)}
    for n, ((f, g), r) in enumerate(zip(rounds, ratios), 1):
        print(f"  round {n}: no-op {f['rps']:.0f} req/s, gate {g['rps']:.0f} req/s, ratio {r:.2f}")
    print(f"no-op Serve floor: {floor['rps']:.0f} req/s  p50 {floor['p50_ms']:.1f} ms  p99 {floor['p99_ms']:.1f} ms")
    print(f"POST /v1/gate:     {gate['rps']:.0f} req/s  p50 {gate['p50_ms']:.1f} ms  p99 {gate['p99_ms']:.1f} ms"
          f"  errors {gate['errors']}")
    print(f"gate / floor = {result['gate_over_floor']:.2f}, the median round (target >= 0.8)")
    print(f"POST /v1/gate/batch ({BATCH_CHECKS} checks a request, {BATCH_CONNECTIONS} connections): "
          f"{result['batch_checks_per_s']:,.0f} checks/s median (rounds "
          f"{checks_per_s[0]:,.0f}-{checks_per_s[-1]:,.0f}), errors {result['batch_errors']}")
    return result


if __name__ == "__main__":
    main()
