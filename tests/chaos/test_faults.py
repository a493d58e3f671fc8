"""Faults while traffic flows: whatever breaks, every acknowledged change is in Postgres exactly
once, balance = credits - debits, callers are told 503 with Retry-After while the fault
lasts, and no decision after it is wrong.

The connection to Postgres is cut with tests/pgproxy.py, which the test service reaches
Postgres through: at the worst moment, after the COMMIT went out and before its answer came
back.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pgserver
import psutil
import pytest

from serve_app.launch import haproxy_dir
from tests.chaos.traffic import Traffic
from tests.helpers import (
    ADMIN_TOKEN,
    SERVICE_TOKEN,
    assert_error,
    hour_tick,
    ledger_sum,
    shard_pid,
    stripe_deliver,
    stripe_event,
    wait_for,
)

FAULT_TRAFFIC_S = 90  # each traffic loop ends by itself after this, fault or no fault
RECOVERY_S = 60


def _entries_noted(sql, org: str, note: str) -> list:
    return sql.fetch("SELECT kind, amount_micros FROM ledger WHERE org_id = $1 AND note = $2", org, note)


def _balance(admin, org: str) -> int:
    return admin.get(f"/v1/orgs/{org}").json()["balance_micros"]


def test_a_credit_whose_commit_answer_was_lost_is_found_committed_and_answered_once(service, admin, sql, new_org):
    """No Idempotency-Key: a 503 here would make the caller credit twice on retry."""
    org = new_org()
    before = _balance(admin, org)
    note = f"cut-after-{uuid.uuid4().hex[:8]}"
    cut = service.pg_proxy.cut(note, "after_commit")
    response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000, "note": note})
    assert _cut_done(service, cut)
    assert response.status_code == 201, response.text
    assert response.json()["amount_micros"] == 1_000_000
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 1_000_000)]
    assert _balance(admin, org) == before + 1_000_000 == ledger_sum(sql, org)


def test_a_credit_whose_commit_never_reached_postgres_is_503_and_its_retry_lands_once(service, admin, sql, new_org):
    org = new_org()
    before = _balance(admin, org)
    note = f"cut-before-{uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": f"retry-{note}"}
    cut = service.pg_proxy.cut(note, "before_commit")
    body = {"kind": "grant", "amount_micros": 2_000_000, "note": note}
    refused = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert _cut_done(service, cut)
    assert_error(refused, 503, "shard_unavailable")
    assert refused.headers["Retry-After"] == "1"
    assert _entries_noted(sql, org, note) == []
    assert _balance(admin, org) == before == ledger_sum(sql, org)
    # Postgres said it rolled back, so the key was given back: the retry runs at once.
    retried = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert retried.status_code == 201, retried.text
    again = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert again.json() == retried.json()
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 2_000_000)]
    assert _balance(admin, org) == before + 2_000_000 == ledger_sum(sql, org)


@pytest.mark.parametrize("when", ["after_commit", "before_commit"])
def test_ticks_whose_commit_connection_is_cut_are_billed_exactly_once(service, admin, compute, sql, new_org, when):
    org = new_org()
    before = _balance(admin, org)
    lease = f"sbx-cut-{uuid.uuid4().hex[:8]}"  # a lease id appears in the usage rollup the commit writes
    ticks = {"ticks": [hour_tick(org, f"{lease}-{n}", lease) for n in range(3)]}
    cut = service.pg_proxy.cut(lease, when)
    first = compute.post("/v1/usage", json=ticks)
    assert _cut_done(service, cut)
    if when == "after_commit":
        assert first.status_code == 200, first.text
        assert first.json()["accepted"] == 3
    else:
        assert_error(first, 503, "shard_unavailable")
    resent = compute.post("/v1/usage", json=ticks)
    assert resent.status_code == 200, resent.text
    assert resent.json()["accepted"] + resent.json()["duplicates"] == 3
    assert resent.json()["duplicates"] == (3 if when == "after_commit" else 0)
    billed = sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = $1", org)
    assert billed == 3
    assert _balance(admin, org) == before - 3 * 165_600 == ledger_sum(sql, org)


def _cut_done(service, cut_id: int) -> bool:
    return wait_for(f"cut {cut_id}", lambda: next(c["done"] for c in service.pg_proxy.status()["cuts"]
                                                   if c["id"] == cut_id), timeout_s=30)


# ----- faults while traffic flows -------------------------------------------------------------


@pytest.fixture
def busy_orgs(admin, new_org, org_id_on):
    """Four orgs on both shards, with credit enough that nothing halts: every gate answer after
    a fault is known in advance (allowed), and any other one is wrong."""
    orgs = [new_org(org_id=org_id_on(k % 2, "chaos")) for k in range(4)]
    for org in orgs:
        assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 100_000_000}
                          ).status_code == 201
    return orgs, {org: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] for org in orgs}


def through_fault(service, admin, sql, busy_orgs, inject, name: str) -> Traffic:
    """Traffic before, during and after `inject()`; then retries of what failed, and the checks."""
    orgs, start_balances = busy_orgs
    traffic = Traffic(service.base_url, ADMIN_TOKEN, SERVICE_TOKEN, orgs, max_s=FAULT_TRAFFIC_S,
                      name=f"{name}-{uuid.uuid4().hex[:6]}").start()
    try:
        wait_for("traffic acknowledged before the fault", lambda: sum(traffic.usage_sent.values()) >= 3, 30)
        started = time.monotonic()
        inject()
        traffic.fault_s = time.monotonic() - started
        acknowledged = sum(traffic.usage_sent.values())
        wait_for("traffic acknowledged after the fault",
                 lambda: sum(traffic.usage_sent.values()) >= acknowledged + 3, RECOVERY_S)
    finally:
        traffic.stop()
    traffic.settle()
    violations = traffic.violations(admin, sql, start_balances)
    print(f"{name}: fault lasted {getattr(traffic, 'fault_s', 0):.1f} s, {traffic.summary()}, "
          f"answers {dict(traffic.seen.answers)}")
    assert violations == [], violations[:10]
    return traffic


def _failures(traffic: Traffic) -> int:
    return sum(n for (_, status), n in traffic.seen.answers.items() if status not in (200, 201, 204))


def test_kill_9_of_a_shard_while_traffic_flows(service, admin, sql, busy_orgs):
    def kill_shard() -> None:
        victim = shard_pid(0)
        os.kill(victim, signal.SIGKILL)
        wait_for("shard 0 in a new process", lambda: _alive_pid(lambda: shard_pid(0)) not in (None, victim), RECOVERY_S)

    through_fault(service, admin, sql, busy_orgs, kill_shard, "shard-kill")


@pytest.mark.skipif(bool(os.environ.get("METERGATE_DATABASE_URL")), reason="stops the embedded Postgres")
def test_postgres_stopped_for_10_s_while_traffic_flows(service, admin, sql, busy_orgs):
    def stop_postgres() -> None:
        service.pg_server.cleanup()  # pg_ctl stop: connections drop, new ones are refused
        time.sleep(10)
        service.pg_server = pgserver.get_server(service.settings.data_dir / "pg", cleanup_mode="stop")

    traffic = through_fault(service, admin, sql, busy_orgs, stop_postgres, "postgres-down")
    assert traffic.seen.answers[("usage", 503)] > 0, "callers were told to retry while Postgres was down"


def test_connections_cut_mid_commit_while_traffic_flows(service, admin, sql, busy_orgs):
    """Cuts at COMMIT of credits and ticks, both ways: each is found out, none guessed."""
    name = f"cut-{uuid.uuid4().hex[:6]}"
    cuts = []

    def cut_commits() -> None:
        for n, when in enumerate(["after_commit", "before_commit"] * 3):
            cuts.append(service.pg_proxy.cut(f"{name}-c{n + 1}", when))  # a credit's key is its note
            cuts.append(service.pg_proxy.cut(f"{name}-l{n + 1}", when))  # a lease id is in its commit
        wait_for("every armed cut to happen", lambda: all(
            c["done"] for c in service.pg_proxy.status()["cuts"] if c["id"] in cuts), RECOVERY_S)

    orgs, start_balances = busy_orgs
    traffic = Traffic(service.base_url, ADMIN_TOKEN, SERVICE_TOKEN, orgs, max_s=FAULT_TRAFFIC_S, name=name).start()
    try:
        cut_commits()
    finally:
        traffic.stop()
    traffic.settle()
    violations = traffic.violations(admin, sql, start_balances)
    print(f"commit cuts: {len(cuts)} cuts, {traffic.summary()}, answers {dict(traffic.seen.answers)}")
    assert violations == [], violations[:10]


def _ray_workers(title: str) -> list[int]:
    """Pids of the Ray workers whose process title (Ray names it after the actor) starts so."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and cmdline and cmdline[0].startswith(title):
            found.append(proc.pid)
    return found


def _ingress_replica_pids() -> list[int]:
    return _ray_workers("ray::ServeReplica:metergate:Ingress")


def test_kill_9_of_the_ingress_replica_while_traffic_flows(service, admin, sql, busy_orgs):
    def kill_replica() -> None:
        victims = _ingress_replica_pids()
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_for("a new ingress replica", lambda: set(_ingress_replica_pids()) - set(victims), RECOVERY_S)

    through_fault(service, admin, sql, busy_orgs, kill_replica, "replica-kill")


def _haproxy_pids(service) -> list[int]:
    ours = str(haproxy_dir(service.settings)) + os.sep
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(arg.startswith(ours) for arg in p.info["cmdline"] or ())]


def test_kill_9_of_haproxy_while_traffic_flows(service, admin, sql, busy_orgs):
    def kill_haproxy() -> None:
        victims = _haproxy_pids(service)
        assert victims, "HAProxy serves the HTTP port"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_for("HTTP served again", lambda: _answers(service), RECOVERY_S)

    through_fault(service, admin, sql, busy_orgs, kill_haproxy, "haproxy-kill")


def _answers(service) -> bool:
    import httpx

    try:
        return httpx.get(f"{service.base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _alive_pid(probe):
    try:
        return probe()
    except Exception:  # noqa: BLE001 - restarting
        return None


def test_a_stripe_top_up_delivered_while_its_shard_restarts_is_credited_once(service, admin, compute, sql,
                                                                             org_id_on, new_org):
    org = new_org(org_id=org_id_on(1, "stripe-restart"))
    before = admin.get(f"/v1/orgs/{org}").json()["balance_micros"]
    session = {"id": f"cs_{uuid.uuid4().hex[:10]}", "object": "checkout.session", "mode": "payment",
               "payment_status": "paid", "status": "complete", "amount_total": 1_500, "currency": "usd",
               "client_reference_id": org, "payment_intent": f"pi_{uuid.uuid4().hex[:10]}",
               "metadata": {"org_id": org}}
    event = stripe_event("checkout.session.completed", session)
    victim = shard_pid(1)
    os.kill(victim, signal.SIGKILL)
    # Stripe redelivers until it gets a 2xx: so does this loop, bounded.
    statuses = []
    deadline = time.monotonic() + RECOVERY_S
    while time.monotonic() < deadline:
        response = stripe_deliver(compute, event)
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
        time.sleep(0.2)
    assert statuses[-1] == 200, statuses
    assert stripe_deliver(compute, event).json()["duplicate"] is True
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'topup'", org) == 1
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == before + 15_000_000 == ledger_sum(sql, org)
    print(f"stripe webhook during a shard restart: answers {statuses}")


def test_the_scheduler_killed_mid_delivery_loses_no_outbound_event(service, admin, sql, receiver, new_org):
    """Deliveries wait on a slow receiver, and the scheduler is killed while they do: the run's
    marks never commit, so the restarted scheduler delivers them again (the same message ids,
    which receivers dedupe on). Nothing is lost; nothing is marked delivered that was not."""
    org = new_org()
    receiver.hold_s[org] = 3.0
    try:
        for _ in range(3):
            assert admin.post(f"/v1/orgs/{org}/halt").status_code == 200
            assert admin.post(f"/v1/orgs/{org}/resume").status_code == 200
        events = sql.val("SELECT count(*) FROM outbox WHERE org_id = $1", org)
        assert events >= 6
        wait_for("a delivery in flight", lambda: receiver.arrived.get(org, 0) > 0, 30)
        victim = _scheduler_pid()
        os.kill(victim, signal.SIGKILL)  # while the receiver still holds the delivery
    finally:
        receiver.hold_s.pop(org, None)
    wait_for("every event delivered after the restart",
             lambda: sql.val("SELECT count(*) FROM outbox WHERE org_id = $1 AND status = 'delivered'", org) == events,
             90)
    assert wait_for("the scheduler in a new process", lambda: _alive_pid(_scheduler_pid) not in (None, victim), 60)
    ids = [m["svix_id"] for m in receiver.of_org(org, accepted_only=True)]
    assert len(set(ids)) == events, "every event reached the receiver"
    # The killed run's deliveries (the receiver was still holding them) were sent again.
    assert receiver.arrived[org] > events, receiver.arrived[org]


def _scheduler_pid() -> int:
    found = _ray_workers("ray::SchedulerActor")
    assert len(found) == 1, found
    return found[0]
