"""Start the real service for a benchmark (embedded Postgres, local Ray, Serve) and drive it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from actors.placement import NAMESPACE, shard_name
from config.settings import Settings
from tests.helpers import free_port

SERVICE_TOKEN = "bench-service-token-0123456789"
ADMIN_TOKEN = "bench-admin-token-0123456789"


@serve.deployment(max_ongoing_requests=2000, ray_actor_options={"num_cpus": 0.1})
class NoOp:
    """The floor: a Serve endpoint that does nothing but answer."""

    async def __call__(self, request: Request) -> Response:
        await request.body()
        return Response(b'{"allowed":true,"reason":"ok","status":200}', media_type="application/json")


@contextmanager
def running_service(shards: int = 2, **overrides):
    from serve_app import launch

    data_dir = Path(tempfile.mkdtemp(prefix="metergate-bench-"))
    settings = Settings(**{"data_dir": data_dir, "http_port": free_port(), "service_token": SERVICE_TOKEN,
                           "admin_token": ADMIN_TOKEN, "shards": shards,
                           "dashboard": False, "metrics_port": 0,  # no fixed ports, no dashboard's CPU
                           **overrides})
    running = launch.start(settings, ray_init_kwargs={"num_cpus": 2, "log_to_driver": False})
    try:
        yield running
    finally:
        launch.stop(running)
        shutil.rmtree(data_dir, ignore_errors=True)


def deploy_noop() -> None:
    serve.run(NoOp.bind(), name="noop", route_prefix="/noop")


def shard(k: int):
    return ray.get_actor(shard_name(k), namespace=NAMESPACE)


WRK_SCRIPT = """
local bodies = {BODIES}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer TOKEN"
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def wrk(url: str, bodies: list[str], seconds: int, connections: int, token: str = SERVICE_TOKEN) -> dict:
    """Load with wrk (a separate process); returns requests/s, p50 and p99 in ms, errors."""
    lua_bodies = "{" + ",".join(json.dumps(b) for b in bodies) + "}"
    script = WRK_SCRIPT.replace("{BODIES}", lua_bodies).replace("TOKEN", token)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", handle.name, url],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(handle.name)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    raw = json.loads(line[len("RESULT "):])
    return {"rps": raw["requests"] / (raw["duration_us"] / 1e6), "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "errors": raw["errors"], "requests": raw["requests"]}


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def create_orgs_via_api(base_url: str, org_ids: list[str]) -> None:
    """Create orgs through POST /v1/orgs, as a user would."""
    import httpx

    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as admin:
        for org_id in org_ids:
            response = admin.post("/v1/orgs", json={"org_id": org_id, "email": f"{org_id}@example.com"})
            assert response.status_code in (200, 201), response.text


def create_orgs(count: int, prefix: str, shard_index: int = 0, batch: int = 2_000) -> list[str]:
    """Create orgs through the shard's own command path (group commit), in batches."""
    from actors.shard import CreateOrg

    handle = shard(shard_index)
    ids = [f"{prefix}_{n}" for n in range(count)]
    for start in range(0, count, batch):
        part = ids[start:start + batch]
        results = ray.get(handle.submit.remote(
            [(org_id, CreateOrg(f"{org_id}@example.com", "payg", True), None) for org_id in part]))
        assert all(r.get("created") for r in results), results[:3]
    return ids


def kill_shard_process(shard_index: int = 0) -> int:
    """kill -9 the shard's process; Ray restarts the actor (max_restarts=-1)."""
    import signal

    pid = ray.get(shard(shard_index).ready.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def gate_all(org_ids: list[str], shard_index: int = 0, batch: int = 5_000) -> None:
    from actors.org import Resources

    handle = shard(shard_index)
    for start in range(0, len(org_ids), batch):
        results = ray.get(handle.gate.remote([(o, "create", Resources()) for o in org_ids[start:start + batch]]))
        assert all("allowed" in r for r in results), results[:3]
