"""Gate checks/s and p50/p99, side by side in one run (issue 9, "What must be measured").

Five servers, each loaded by wrk, interleaved over ROUNDS rounds (the order rotates each
round), so that a noisy 2-core host slows every side alike; only same-run ratios mean much:

  (a) plain uvicorn, a no-op ASGI handler                      (this module's `noop_app`)
  (b) the gate a platform team would hand-roll: uvicorn + an asyncpg pool, one indexed SELECT
      per check against a table of 100 orgs in the service's own Postgres, a JSON decision
                                                               (this module's `handrolled_app`)
  (c) metergate's floor: a no-op Serve deployment behind the same HAProxy ingress
  (d) metergate POST /v1/gate
  (e) metergate POST /v1/gate/batch, 1,000 checks a request

(a) and (b) run as uvicorn subprocesses (1 worker, uvloop/httptools as uvicorn picks them,
no access log) on free loopback ports, and are stopped at the end.

Run: .venv/bin/python -m bench.gate   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

SECONDS = 8
WARM_SECONDS = 2
ROUNDS = 3
CONNECTIONS = 16
ORGS = 100
BATCH_CHECKS = 1_000
BATCH_CONNECTIONS = 4
HANDROLLED_TABLE = "bench_handrolled_orgs"
DSN_ENV = "BENCH_HANDROLLED_DSN"
PROJECT_DIR = Path(__file__).resolve().parent.parent

# ----- (a) and (b): the ASGI apps uvicorn serves (no project imports: a lean process) ----------

_OK = b'{"allowed":true,"reason":"ok","status":200}'
_JSON = [(b"content-type", b"application/json")]


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _answer(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send, startup=None, shutdown=None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def noop_app(scope, receive, send) -> None:
    """(a) Reads the body, answers a fixed JSON decision."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _read_body(receive)
    await _answer(send, 200, _OK)


_SELECT = (f"SELECT balance_micros, halted, suspended, max_concurrent, active_leases, max_disk_mb"
           f" FROM {HANDROLLED_TABLE} WHERE org_id = $1")
_pool: list = []  # the asyncpg pool, made at startup


async def _handrolled_startup() -> None:
    import asyncpg

    _pool.append(await asyncpg.create_pool(os.environ[DSN_ENV], min_size=8, max_size=8))


async def _handrolled_shutdown() -> None:
    await _pool.pop().close()


async def handrolled_app(scope, receive, send) -> None:
    """(b) What a team writes: parse the JSON body, one indexed SELECT, a JSON decision."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send, _handrolled_startup, _handrolled_shutdown)
        return
    try:
        body = json.loads(await _read_body(receive))
        org_id, resources = body["org_id"], body.get("resources") or {}
    except (ValueError, KeyError, TypeError):
        await _answer(send, 400, b'{"error":"bad request"}')
        return
    row = await _pool[0].fetchrow(_SELECT, org_id)
    if row is None:
        await _answer(send, 404, b'{"error":"unknown org"}')
        return
    balance, halted, suspended, max_concurrent, active, max_disk = row
    if suspended:
        reason = "suspended"
    elif halted:
        reason = "halted"
    elif balance <= 0:
        reason = "insufficient_balance"
    elif resources.get("disk_mb", 0) > max_disk:
        reason = "resource_limit"
    elif active + 1 > max_concurrent:
        reason = "concurrency_limit"
    else:
        reason = "ok"
    await _answer(send, 200, json.dumps({
        "allowed": reason == "ok", "reason": reason, "balance_micros": balance,
        "active_leases": active, "max_concurrent": max_concurrent}).encode())


# ----- the run ----------------------------------------------------------------------------------

def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"uvicorn did not listen on {port} within {timeout_s} s")


@contextmanager
def uvicorn_server(app: str, env: dict[str, str] | None = None):
    """A uvicorn subprocess (1 worker) serving bench.gate:<app> on a free loopback port; yields
    its base URL and stops it (SIGTERM, then SIGKILL) on the way out."""
    from bench.harness import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"bench.gate:{app}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--log-level", "warning", "--no-access-log"],
        cwd=PROJECT_DIR, env={**os.environ, **(env or {})})
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


def _make_handrolled_table(dsn: str, org_ids: list[str]) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {HANDROLLED_TABLE}")
            await conn.execute(f"""CREATE TABLE {HANDROLLED_TABLE} (
                org_id text PRIMARY KEY, balance_micros bigint NOT NULL, halted boolean NOT NULL,
                suspended boolean NOT NULL, max_concurrent integer NOT NULL, active_leases integer NOT NULL,
                max_disk_mb integer NOT NULL)""")
            await conn.copy_records_to_table(HANDROLLED_TABLE, records=[
                (org_id, 5_000_000, False, False, 10, n % 3, 51_200) for n, org_id in enumerate(org_ids)])
            await conn.execute(f"ANALYZE {HANDROLLED_TABLE}")
        finally:
            await conn.close()

    asyncio.run(run())


def _drop_handrolled_table(dsn: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {HANDROLLED_TABLE}")
        finally:
            await conn.close()

    asyncio.run(run())


def _check_answers(url: str, body: str, batch: bool = False) -> None:
    """One request by hand before the load: the server answers what the benchmark assumes."""
    import httpx

    from bench.harness import SERVICE_TOKEN

    response = httpx.post(url, content=body, timeout=30, headers={
        "Authorization": f"Bearer {SERVICE_TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    data = response.json()
    if batch:
        assert len(data["decisions"]) == BATCH_CHECKS and all(d["allowed"] for d in data["decisions"]), \
            str(data)[:300]
    else:
        assert data["allowed"] is True, (url, data)


def _med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> dict:
    from bench.harness import (
        create_orgs_via_api,
        deploy_noop,
        have_wrk,
        running_service,
        wrk,
    )

    assert have_wrk(), "this benchmark needs wrk (apt-get install wrk)"
    org_ids = [f"bench_{n}" for n in range(ORGS)]
    bodies = [json.dumps({"org_id": org_id, "action": "create",
                          "resources": {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 10240}})
              for org_id in org_ids]
    batch = [json.dumps({"checks": [json.loads(bodies[(n + k) % ORGS]) for k in range(BATCH_CHECKS)]})
             for n in range(4)]
    started = time.monotonic()
    with running_service() as service, ExitStack() as servers:
        dsn = service.settings.database_url
        deploy_noop()
        create_orgs_via_api(service.base_url, org_ids)
        _make_handrolled_table(dsn, org_ids)
        servers.callback(_drop_handrolled_table, dsn)
        uvicorn_url = servers.enter_context(uvicorn_server("noop_app"))
        handrolled_url = servers.enter_context(uvicorn_server("handrolled_app", {DSN_ENV: dsn})) + "/v1/gate"
        # name → (url, bodies, connections, checks per request)
        sides = {
            "uvicorn_noop": (uvicorn_url + "/", bodies, CONNECTIONS, 1),
            "handrolled": (handrolled_url, bodies, CONNECTIONS, 1),
            "serve_floor": (service.base_url + "/noop", bodies, CONNECTIONS, 1),
            "gate": (service.base_url + "/v1/gate", bodies, CONNECTIONS, 1),
            "gate_batch": (service.base_url + "/v1/gate/batch", batch, BATCH_CONNECTIONS, BATCH_CHECKS),
        }
        for name, (url, load, _, checks) in sides.items():
            _check_answers(url, load[0], batch=checks > 1)
        for name, (url, load, connections, _) in sides.items():  # warm every path
            wrk(url, load, WARM_SECONDS, connections)
        rounds: list[dict[str, dict]] = []
        names = list(sides)
        for round_no in range(ROUNDS):
            order = names[round_no % len(names):] + names[:round_no % len(names)]  # rotated each round
            results = {}
            for name in order:
                url, load, connections, checks = sides[name]
                result = wrk(url, load, SECONDS, connections)
                result["checks_per_s"] = result["rps"] * checks
                results[name] = result
            rounds.append(results)
            print(f"  round {round_no + 1}: " + ", ".join(
                f"{n} {results[n]['checks_per_s']:,.0f}/s" for n in names), flush=True)
    elapsed = time.monotonic() - started

    medians = {name: {key: _med([r[name][key] for r in rounds]) for key in ("checks_per_s", "rps", "p50_ms", "p99_ms")}
               | {"errors": sum(r[name]["errors"] for r in rounds), "requests": sum(r[name]["requests"] for r in rounds)}
               for name in names}
    gate_over_handrolled = [r["gate"]["checks_per_s"] / r["handrolled"]["checks_per_s"] for r in rounds]
    floor_over_uvicorn = [r["serve_floor"]["checks_per_s"] / r["uvicorn_noop"]["checks_per_s"] for r in rounds]
    gate_over_floor = [r["gate"]["checks_per_s"] / r["serve_floor"]["checks_per_s"] for r in rounds]
    result = {
        "servers": medians, "rounds": rounds, "seconds": SECONDS, "connections": CONNECTIONS,
        "batch_connections": BATCH_CONNECTIONS, "batch_checks": BATCH_CHECKS,
        "gate_over_handrolled": _med(gate_over_handrolled), "gate_over_handrolled_rounds": gate_over_handrolled,
        "floor_over_uvicorn": _med(floor_over_uvicorn), "floor_over_uvicorn_rounds": floor_over_uvicorn,
        "gate_over_floor": _med(gate_over_floor), "gate_over_floor_rounds": gate_over_floor,
        "batch_checks_per_s": medians["gate_batch"]["checks_per_s"],
        "batch_checks_per_s_rounds": [r["gate_batch"]["checks_per_s"] for r in rounds],
        "elapsed_s": elapsed,
    }
    labels = {
        "uvicorn_noop": "plain uvicorn, no-op ASGI handler",
        "handrolled": "uvicorn + asyncpg, one indexed SELECT per check (hand-rolled)",
        "serve_floor": "metergate floor: no-op Serve deployment (HAProxy)",
        "gate": "metergate POST /v1/gate",
        "gate_batch": f"metergate POST /v1/gate/batch ({BATCH_CHECKS:,} checks/request, {BATCH_CONNECTIONS} conns)",
    }
    print(f"\nmedians of {ROUNDS} interleaved rounds of {SECONDS} s; wrk, {CONNECTIONS} connections"
          f" unless noted ({elapsed:.0f} s in all)")
    print("| server | checks/s | requests/s | p50 | p99 | errors |\n|---|---|---|---|---|---|")
    for name in names:
        m = medians[name]
        print(f"| {labels[name]} | {m['checks_per_s']:,.0f} | {m['rps']:,.0f} | {m['p50_ms']:.1f} ms"
              f" | {m['p99_ms']:.1f} ms | {m['errors']} |")

    def ratios(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(f"\n/v1/gate / hand-rolled:     {result['gate_over_handrolled']:.2f} x (rounds {ratios(gate_over_handrolled)})"
          f"  target >= 1.0")
    print(f"batch checks/s:             {result['batch_checks_per_s']:,.0f} (rounds "
          f"{', '.join(f'{v:,.0f}' for v in result['batch_checks_per_s_rounds'])})  target >= 100,000")
    print(f"Serve floor / uvicorn no-op: {result['floor_over_uvicorn']:.2f} x (rounds {ratios(floor_over_uvicorn)})")
    print(f"/v1/gate / Serve floor:     {result['gate_over_floor']:.2f} x (rounds {ratios(gate_over_floor)})")
    return result


if __name__ == "__main__":
    main()
