"""The faults, each injected with a bounded wait for the service to come back, and the run of
traffic through one of them. Used by tests/chaos/test_faults.py and bench/soak.py.

Every injector takes the running service (launch.Running, with `pg_proxy` and `pg_server`
as tests/conftest.py and bench/soak.py set them) and the traffic flowing through it, and
returns once the fault is over and the service answers again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pgserver
import psutil

from serve_app.launch import haproxy_processes
from tests.chaos.traffic import Traffic, billed_ticks
from tests.helpers import shard_pid, wait_for

RECOVERY_S = 60  # a fault's service must answer again within this
POSTGRES_DOWN_S = 10


def alive_pid(probe):
    try:
        return probe()
    except Exception:  # noqa: BLE001 - restarting
        return None


def ray_workers(title: str) -> list[int]:
    """Pids of the Ray workers whose process title (Ray names it after the actor) starts so."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and cmdline and cmdline[0].startswith(title):
            found.append(proc.pid)
    return found


def scheduler_pid() -> int:
    found = ray_workers("ray::SchedulerActor")
    assert len(found) == 1, found
    return found[0]


def serves(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill_shard(service, traffic: Traffic) -> None:
    shard = len(traffic.seen.answers) % service.settings.shards  # either shard, run by run
    victim = shard_pid(shard)
    os.kill(victim, signal.SIGKILL)
    wait_for(f"shard {shard} in a new process", lambda: alive_pid(lambda: shard_pid(shard)) not in (None, victim),
             RECOVERY_S)


def stop_postgres(service, traffic: Traffic) -> None:
    """pg_ctl stop: connections drop, new ones are refused, for POSTGRES_DOWN_S."""
    service.pg_server.cleanup()
    time.sleep(POSTGRES_DOWN_S)
    service.pg_server = pgserver.get_server(service.settings.data_dir / "pg", cleanup_mode="stop")


def cut_commits(service, traffic: Traffic) -> None:
    """Twelve connections cut (eight) or silenced (four) at COMMIT, both ways, in credits' and
    leases' commits (a credit's key is its note, a lease id is in its commit: both are in the
    bind parameters)."""
    cuts = []
    for n, (when, silent) in enumerate([("after_commit", False), ("before_commit", False)] * 2
                                       + [("after_commit", True), ("before_commit", True)]):
        cuts.append(service.pg_proxy.cut(f"{traffic.name}-c{n + 1}", when, silent=silent))
        cuts.append(service.pg_proxy.cut(f"{traffic.name}-l{n + 1}", when, silent=silent))
    wait_for("every armed cut to happen", lambda: all(
        c["done"] for c in service.pg_proxy.status()["cuts"] if c["id"] in cuts), RECOVERY_S)


def kill_ingress_replica(service, traffic: Traffic) -> None:
    victims = ray_workers("ray::ServeReplica:metergate:Ingress")
    assert victims, "an ingress replica runs"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for("a new ingress replica", lambda: set(ray_workers("ray::ServeReplica:metergate:Ingress")) - set(victims),
             RECOVERY_S)


def kill_haproxy(service, traffic: Traffic) -> None:
    victims = [p.pid for p in haproxy_processes(service.settings)]
    assert victims, "HAProxy serves the HTTP port"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for("HTTP served again", lambda: serves(service.base_url), RECOVERY_S)


def kill_serve_proxy(service, traffic: Traffic) -> None:
    """Serve's actors that run HAProxy on this node (its manager and the proxy), not HAProxy."""
    victims = ray_workers("ray::HAProxyManager") + ray_workers("ray::ProxyActor")
    assert victims, "Serve's proxy actors run"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for("Serve's proxy in new processes", lambda: set(ray_workers("ray::HAProxyManager")) - set(victims),
             RECOVERY_S)
    wait_for("HTTP served again", lambda: serves(service.base_url), RECOVERY_S)


def kill_scheduler(service, traffic: Traffic) -> None:
    victim = scheduler_pid()
    os.kill(victim, signal.SIGKILL)
    wait_for("the scheduler in a new process", lambda: alive_pid(scheduler_pid) not in (None, victim), RECOVERY_S)


FAULTS = {"shard-kill": kill_shard, "postgres-down": stop_postgres, "commit-cuts": cut_commits,
          "replica-kill": kill_ingress_replica, "haproxy-kill": kill_haproxy, "proxy-kill": kill_serve_proxy,
          "scheduler-kill": kill_scheduler}


def through_fault(service, admin: httpx.Client, sql, orgs: list[str], fault: str, admin_token: str,
                  service_token: str, max_s: float = 90) -> tuple[Traffic, list[str]]:
    """Traffic before, during and after the fault; then the retries of what failed (as callers
    would), and the invariants: (the traffic, the violations found)."""
    before = {org: (admin.get(f"/v1/orgs/{org}").json()["balance_micros"], billed_ticks(sql, org)) for org in orgs}
    traffic = Traffic(service.base_url, admin_token, service_token, orgs, max_s=max_s,
                      name=f"{fault}-{uuid.uuid4().hex[:6]}").start()
    try:
        wait_for("traffic acknowledged before the fault", lambda: sum(traffic.usage_sent.values()) >= 3, 30)
        started = time.monotonic()
        FAULTS[fault](service, traffic)
        traffic.fault_s = time.monotonic() - started
        acknowledged = sum(traffic.usage_sent.values())
        wait_for("traffic acknowledged after the fault",
                 lambda: sum(traffic.usage_sent.values()) >= acknowledged + 3, RECOVERY_S)
    finally:
        traffic.stop()
    traffic.settle()
    return traffic, traffic.violations(admin, sql, before)
