"""The multi-node scenario of tests/test_multinode.py, run in a process of its own (the test
session has its own Ray in-process): `python -m tests.multinode_scenario WORK_DIR RAY_DIR`.

1. An embedded Postgres in WORK_DIR, and a Ray cluster of three raylets on this machine
   (ray.cluster_utils.Cluster: a head and two workers of one CPU each) whose processes get
   the METERGATE_* settings from their environment, as cluster.yaml's `ray start` does.
2. `serve deploy serve_config.yaml` through the head's dashboard, the file as it is but for
   what one machine needs: a free port on loopback, one proxy (three proxies on one host
   would want the same port) and a tenth of a CPU per ingress replica (these nodes have one).
   The application builder migrates, starts the shards (spread) and the scheduler, then the
   ingress.
3. Orgs on the shards of a worker node get credit; ticks and more credit stream in over HTTP;
   the node is removed (its raylet and processes killed) a third of the way through.
4. The lost shards come back on another node. What failed is sent again with the same tick
   ids and idempotency keys, as a caller does.
5. A clean stop: the service (launch.stop), Ray's nodes, the embedded Postgres.

The last line printed is a JSON report of what was seen; tests/test_multinode.py checks it
and that no process of this scenario is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from actors.placement import NAMESPACE, shard_name, slot_of
from config.settings import Settings
from serve_app import launch
from storage.db import pid_running
from tests.helpers import (
    ADMIN_TOKEN,
    SERVICE_TOKEN,
    TICK_MICROS,
    TICKS_PER_REQUEST,
    free_port,
    tick_batch,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 3
ORGS = 4
REQUESTS = 30
CREDIT_EVERY = 5  # one credit per this many tick requests, streamed with them
START_CREDIT_MICROS = 100_000_000
STREAM_CREDIT_MICROS = 1_000_000
ORG_TOKEN_SECRET = "multinode-scenario-org-token-secret-0123456789"
CAPABILITY_KEY = "multinode-scenario-capability-key-0123456789"[:43]
WAIT_S = 90
HELD_AFTER_S = 10  # a credit answered idempotency_in_progress this long: its first attempt holds the key
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[scenario +{time.monotonic() - STARTED:5.1f}s] {message}", flush=True)


def main(work_dir: Path, ray_dir: Path) -> dict:
    settings = Settings(data_dir=work_dir / "data", http_host="127.0.0.1", http_port=free_port(),
                        service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN, org_token_secret=ORG_TOKEN_SECRET,
                        capability_key=CAPABILITY_KEY, shards=SHARDS, serve_haproxy=False)
    running = launch.Running(settings)
    cluster = None
    try:
        running.settings = settings = launch.prepare_database(settings, running)  # the embedded Postgres
        say("embedded Postgres up")
        cluster = start_cluster(settings, ray_dir)
        report = scenario(cluster, running)
    finally:
        stop_everything(cluster, running)
    return report


def start_cluster(settings: Settings, ray_dir: Path) -> Cluster:
    # What cluster.yaml's ~/metergate.env gives every `ray start`: Ray's processes inherit it.
    os.environ.update({
        "METERGATE_DATABASE_URL": settings.database_url,
        "METERGATE_SERVICE_TOKEN": settings.service_token,
        "METERGATE_ADMIN_TOKEN": settings.admin_token,
        "METERGATE_ORG_TOKEN_SECRET": settings.org_token_secret,
        "METERGATE_CAPABILITY_KEY": settings.capability_key,
        "METERGATE_SHARDS": str(settings.shards),
        "METERGATE_DATA_DIR": str(settings.data_dir),
    })
    for name in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY"):
        os.environ.pop(name, None)
    node = {"num_cpus": 1, "temp_dir": str(ray_dir)}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": None})  # None: a free port, not the default another Ray may hold
    for _ in range(2):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE)
    say(f"Ray cluster up: {len(cluster.list_all_nodes())} nodes, dashboard {cluster.webui_url}")
    return cluster


def serve_deploy(settings: Settings, cluster: Cluster, work_dir: Path) -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"].update(host=settings.http_host, port=settings.http_port)
    config["proxy_location"] = "HeadOnly"
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["ray_actor_options"]["num_cpus"] = 0.1
    path = work_dir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    subprocess.run([str(serve_cli), "deploy", str(path), "--address", f"http://{cluster.webui_url}"],
                   check=True, timeout=60, cwd=ROOT)
    say("serve deploy sent")


def shard_nodes() -> dict[int, str]:
    """Shard → the id of the node its (alive) actor runs on."""
    actors = list_actors(filters=[("state", "=", "ALIVE"), ("ray_namespace", "=", NAMESPACE)], limit=1000)
    by_name = {a.name: a.node_id for a in actors}
    return {k: by_name[shard_name(k)] for k in range(SHARDS) if shard_name(k) in by_name}


def scenario(cluster: Cluster, running: launch.Running) -> dict:
    settings = running.settings
    serve_deploy(settings, cluster, Path(settings.data_dir).parent)
    base_url = f"http://{settings.http_host}:{settings.http_port}"
    with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        return _run(cluster, running, base_url, admin)


def _run(cluster: Cluster, running: launch.Running, base_url: str, admin: httpx.Client) -> dict:
    settings = running.settings

    def ready() -> bool:
        try:
            return admin.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the ingress to answer /readyz", ready, timeout_s=WAIT_S)
    say("ready")

    placed = wait_for("every shard placed", lambda: (p := shard_nodes()) and len(p) == SHARDS and p, timeout_s=WAIT_S)
    workers = {node.node_id: node for node in cluster.worker_nodes}
    victim_id = max(workers, key=lambda n: sum(1 for node in placed.values() if node == n))
    lost = sorted(k for k, node in placed.items() if node == victim_id)
    assert lost, f"no shard on a worker node: {placed}"
    replicas = [a.node_id[:8] for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith("ServeReplica:metergate:")]
    say(f"shards on nodes { {k: n[:8] for k, n in placed.items()} }, ingress replicas on {replicas}; "
        f"removing {victim_id[:8]} with shards {lost}")

    orgs = orgs_on(lost, running.slot_map)
    for org in orgs:
        created = admin.post("/v1/orgs", json={"org_id": org, "email": f"{org}@example.com"})
        assert created.status_code == 201, created.text
        granted = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": START_CREDIT_MICROS},
                             headers={"Idempotency-Key": f"start-{org}"})
        assert granted.status_code == 201, granted.text
    start_balance = {org: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] for org in orgs}

    lost_pids = [ray.get(ray.get_actor(shard_name(k), namespace=NAMESPACE).ready.remote(), timeout=WAIT_S)["pid"]
                 for k in lost]
    acknowledged, failed = stream_while_removing(cluster, workers[victim_id], lost_pids, base_url, orgs)
    say(f"stream done: {len(acknowledged)} acknowledged, {len(failed)} failed")
    billed_before_retry = billed_ticks(settings.database_url, orgs)

    moved = wait_for("the lost shards on other nodes", lambda: _moved(lost, victim_id), timeout_s=WAIT_S)
    say(f"shards {lost} now on {[n[:8] for n in moved.values()]}")
    retried, held = [], []
    with httpx.Client(base_url=base_url, timeout=30,
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as compute:
        for kind, number in failed:
            (retried if send_again(compute, admin, orgs, kind, number) else held).append((kind, number))
    say(f"sent again: {len(retried)} acknowledged, {len(held)} credit keys still claimed by their first attempt")

    ticks_of = {org: 0 for org in orgs}
    for number in range(REQUESTS):
        for tick in tick_batch(orgs, number)["ticks"]:
            ticks_of[tick["org_id"]] += 1
    credit_keys = stream_credit_keys(settings.database_url, orgs)  # (org, key) of each credit in the ledger
    balances = {}
    for org in orgs:
        state = admin.get(f"/v1/orgs/{org}")
        assert state.status_code == 200, state.text
        credited = STREAM_CREDIT_MICROS * sum(1 for owner, _ in credit_keys if owner == org)
        balances[org] = {"expected": start_balance[org] + credited - ticks_of[org] * TICK_MICROS,
                         "actual": state.json()["balance_micros"], "ledger": ledger_sum(settings.database_url, org)}
    return {
        "nodes_at_start": 1 + len(workers),
        "shard_nodes_before": placed,
        "spread_over_nodes": len(set(placed.values())),
        "removed_node": victim_id,
        "lost_shards": lost,
        "shard_nodes_after": moved,
        "requests": REQUESTS,
        "ticks_per_request": TICKS_PER_REQUEST,
        "acknowledged": [list(a) for a in acknowledged + retried],
        "failed": [list(f) for f in failed],
        "held": [list(h) for h in held],
        "billed_before_retry": billed_before_retry,
        "billed_after_retry": billed_ticks(settings.database_url, orgs),
        "balances": balances,
        "credit_keys_sent": [credit_key(n) for n in range(0, REQUESTS, CREDIT_EVERY)],
        "credit_keys_in_ledger": [key for _, key in credit_keys],
    }


def orgs_on(shards: list[int], slot_map: list[int]) -> list[str]:
    found, n = [], 0
    while len(found) < ORGS:
        candidate = f"mn_org_{n}"
        if slot_map[slot_of(candidate)] in shards:
            found.append(candidate)
        n += 1
    return found


def stream_while_removing(cluster: Cluster, victim, lost_pids: list[int], base_url: str, orgs: list[str]):
    """Tick batches (and every CREDIT_EVERY-th request a credit) over HTTP; the victim node is
    removed a third of the way through, and the stream goes on once its shards' processes are
    gone (they outlive their raylet for a moment, and could answer the next requests).
    Returns (acknowledged, failed) as (kind, number)."""
    acknowledged: list[tuple[str, int]] = []
    failed: list[tuple[str, int]] = []
    with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as compute, \
            httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        for number in range(REQUESTS):
            if number == REQUESTS // 3:
                say("removing the node")
                cluster.remove_node(victim, allow_graceful=False)
                wait_for("the lost shards' processes to end",
                         lambda: not any(pid_running(pid) for pid in lost_pids), timeout_s=WAIT_S)
                say("node removed, its shards' processes gone")
            requests = [("ticks", number)] + ([("credit", number)] if number % CREDIT_EVERY == 0 else [])
            for kind, n in requests:
                try:
                    response = send(compute, admin, orgs, kind, n)
                    ok = response.status_code in (200, 201)
                    answer = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, answer = False, repr(exc)
                if not ok:
                    say(f"{kind} {n} failed: {answer}")
                (acknowledged if ok else failed).append((kind, n))
    return acknowledged, failed


def send(compute: httpx.Client, admin: httpx.Client, orgs: list[str], kind: str, number: int) -> httpx.Response:
    if kind == "ticks":
        return compute.post("/v1/usage", json=tick_batch(orgs, number))
    org = orgs[number // CREDIT_EVERY % len(orgs)]
    return admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": STREAM_CREDIT_MICROS},
                      headers={"Idempotency-Key": credit_key(number)})


def credit_key(number: int) -> str:
    return f"stream-credit-{number}"


def send_again(compute, admin, orgs, kind: str, number: int) -> bool:
    """Send a failed request again until it is acknowledged (True). False: a credit whose
    Idempotency-Key its first attempt still claims. That attempt ended without a definite
    answer from the shard (503 shard_unavailable: the call failed as the node went, after or
    before the commit), or with the ingress replica on the removed node; serve_app/
    idempotency.py then keeps the claim, since the credit may have committed, and lets the
    same request take it over only after ABANDONED_AFTER_S (120 s), longer than this waits.
    Such a credit is in the ledger once or not at all (tests/test_multinode.py checks)."""
    deadline = time.monotonic() + WAIT_S
    claimed_since = None
    while True:
        try:
            response = send(compute, admin, orgs, kind, number)
            if response.status_code in (200, 201):
                return True
            last = f"{response.status_code} {response.text[:300]}"
            if response.status_code == 409 and "idempotency_in_progress" in response.text:
                claimed_since = claimed_since or time.monotonic()
                if time.monotonic() - claimed_since > HELD_AFTER_S:
                    return False
        except httpx.HTTPError as exc:
            last = repr(exc)
        assert time.monotonic() < deadline, f"{kind} {number} was never acknowledged; last answer: {last}"
        time.sleep(0.2)


def _moved(lost: list[int], victim_id: str) -> dict[int, str] | None:
    nodes = shard_nodes()
    if all(k in nodes and nodes[k] != victim_id for k in lost):
        for k in lost:  # up and recovered: ready() answers once the shard has claimed its epoch
            ray.get(ray.get_actor(shard_name(k), namespace=NAMESPACE).ready.remote(), timeout=30)
        return {k: nodes[k] for k in lost}
    return None


def _query(url: str, query: str, *args):
    async def run():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def billed_ticks(url: str, orgs: list[str]) -> int:
    return _query(url, "SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = ANY($1)", orgs)


def ledger_sum(url: str, org: str) -> int:
    return _query(url, "SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger WHERE org_id = $1", org)


def stream_credit_keys(url: str, orgs: list[str]) -> list[tuple[str, str]]:
    async def run():
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT org_id, idempotency_key FROM ledger WHERE org_id = ANY($1)"
                                    " AND idempotency_key LIKE 'stream-credit-%' ORDER BY idempotency_key", orgs)
            return [(r["org_id"], r["idempotency_key"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def stop_everything(cluster: Cluster | None, running: launch.Running) -> None:
    """The service as `make up` stops it (the ingress, the scheduler, the shards drained and
    killed, the embedded Postgres), then Ray's nodes."""
    say("stopping")
    running.started_serve = cluster is not None
    launch.stop(running)
    if ray.is_initialized():
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    say("stopped")


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(result), flush=True)
