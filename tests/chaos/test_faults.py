"""Faults while traffic flows: whatever breaks, every acknowledged change is in Postgres exactly
once, balance = credits - debits, callers are told 503 with Retry-After while the fault
lasts, and no decision after it is wrong.

The connection to Postgres is cut with tests/pgproxy.py, which the test service reaches
Postgres through: at the worst moment, after the COMMIT went out and before its answer came
back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
import uuid

import psutil
import pytest

from actors.claim import OUTCOME_WAIT_S
from actors.shard_fence import COMMIT_WAIT_S
from serve_app.haproxy_front import rewrite
from serve_app.launch import haproxy_dir, haproxy_processes
from tests.chaos.faults import alive_pid, scheduler_pid, through_fault
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


def test_a_commit_whose_outcome_cannot_be_learned_is_503_outcome_unknown_and_keeps_its_key(
        service, admin, sql, new_org):
    """Postgres goes out of reach right after the COMMIT, for longer than the shard asks it
    (OUTCOME_WAIT_S): the caller is told the truth, `outcome_unknown`, and its key stays
    claimed, so a retry cannot apply the credit a second time."""
    org = new_org()
    note = f"cut-unknown-{uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": f"unknown-{note}"}
    body = {"kind": "grant", "amount_micros": 3_000_000, "note": note}
    cut = service.pg_proxy.cut(note, "after_commit", then_refuse_s=OUTCOME_WAIT_S + 5)
    started = time.monotonic()
    unknown = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert _cut_done(service, cut)
    assert_error(unknown, 503, "outcome_unknown", mentions="Idempotency-Key")
    assert unknown.headers["Retry-After"] == "1"
    wait_for("Postgres in reach again", lambda: time.monotonic() - started > OUTCOME_WAIT_S + 6, 60)
    retried = wait_for("an answer to the retry", lambda: _answered(admin, f"/v1/orgs/{org}/credits", body, key), 60)
    assert_error(retried, 409, "idempotency_in_progress")
    # It did commit (the proxy let the COMMIT through): once, and memory agrees after reloading.
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 3_000_000)]
    assert wait_for("the org's state", lambda: _answered(admin, f"/v1/orgs/{org}", None, {}), 60
                    ).json()["balance_micros"] == ledger_sum(sql, org)


def test_a_keyed_credit_whose_answer_could_not_be_kept_under_its_key_still_gets_that_answer(
        service, admin, sql, new_org):
    """The credit commits; then the statement that keeps its answer under the Idempotency-Key
    loses its connection. A 503 would tell the caller that a committed credit failed: it gets
    the credit. The key stays claimed, so a retry is told idempotency_in_progress (and, past
    ABANDONED_AFTER_S, meets the ledger's own key): never a second credit."""
    org = new_org()
    before = _balance(admin, org)
    note = f"cut-record-{uuid.uuid4().hex[:8]}"  # in the answer, so in the statement that keeps it
    key = {"Idempotency-Key": f"kept-{uuid.uuid4().hex[:8]}"}  # not the note: the claim must go through
    body = {"kind": "grant", "amount_micros": 4_000_000, "note": note}
    cut = service.pg_proxy.cut(note, "statement")
    response = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert _cut_done(service, cut)
    assert response.status_code == 201, response.text
    assert response.json()["note"] == note and response.json()["amount_micros"] == 4_000_000
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key), 409, "idempotency_in_progress")
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 4_000_000)]
    assert _balance(admin, org) == before + 4_000_000 == ledger_sum(sql, org)


def _answered(client, path: str, body: dict | None, headers: dict):
    """The first answer that is not an outage (503)."""
    response = client.post(path, json=body, headers=headers) if body is not None else client.get(path)
    return response if response.status_code != 503 else None


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


@pytest.mark.parametrize("when", ["after_commit", "before_commit"])
def test_a_commit_a_silent_network_leaves_unanswered_is_settled_by_postgres_within_seconds(
        service, admin, sql, new_org, when):
    """A partition, not a cut: no reset, no answer, the connection just goes quiet. The shard
    must not wait asyncpg's 60 s command timeout (every commit of the shard queued behind it):
    past COMMIT_WAIT_S it asks Postgres, as for a cut, and answers what Postgres says."""
    org = new_org()
    before = _balance(admin, org)
    note = f"silent-{when}-{uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": f"retry-{note}"}
    body = {"kind": "grant", "amount_micros": 5_000_000, "note": note}
    cut = service.pg_proxy.cut(note, when, silent=True)
    started = time.monotonic()
    response = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    took = time.monotonic() - started
    assert _cut_done(service, cut)
    assert COMMIT_WAIT_S <= took < COMMIT_WAIT_S + 15, took
    if when == "after_commit":  # Postgres committed it: acknowledged, once
        assert response.status_code == 201, response.text
    else:  # the COMMIT never reached Postgres, which rolled back when its server process ended
        assert_error(response, 503, "shard_unavailable")
        assert _entries_noted(sql, org, note) == []
        response = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
        assert response.status_code == 201, response.text
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 5_000_000)]
    assert _balance(admin, org) == before + 5_000_000 == ledger_sum(sql, org)


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
    return orgs


@pytest.mark.parametrize("fault", [
    "shard-kill", "commit-cuts", "replica-kill", "haproxy-kill", "proxy-kill", "scheduler-kill",
    pytest.param("postgres-down", marks=pytest.mark.skipif(bool(os.environ.get("METERGATE_DATABASE_URL")),
                                                           reason="stops the embedded Postgres"))])
def test_traffic_through_a_fault_loses_and_doubles_nothing(service, admin, sql, busy_orgs, fault):
    """Ticks, keyed credits, leases and gate checks flow before, during and after the fault;
    callers retry what failed. Then: every acknowledged tick and credit exactly once, the
    balance equal to the ledger and to what was sent, no lease left, the gate right, and
    every failure a caller saw a 503 with Retry-After (or no connection at all)."""
    traffic, violations = through_fault(service, admin, sql, busy_orgs, fault, ADMIN_TOKEN, SERVICE_TOKEN)
    print(f"{fault}: fault lasted {traffic.fault_s:.1f} s, {traffic.summary()}, answers {dict(traffic.seen.answers)}")
    assert violations == [], violations[:10]
    if fault == "postgres-down":
        assert traffic.seen.answers[("usage", 503)] > 0, "callers were told to retry while Postgres was down"


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
        victim = scheduler_pid()
        os.kill(victim, signal.SIGKILL)  # while the receiver still holds the delivery
    finally:
        receiver.hold_s.pop(org, None)
    wait_for("every event delivered after the restart",
             lambda: sql.val("SELECT count(*) FROM outbox WHERE org_id = $1 AND status = 'delivered'", org) == events,
             90)
    assert wait_for("the scheduler in a new process", lambda: alive_pid(scheduler_pid) not in (None, victim), 60)
    ids = [m["svix_id"] for m in receiver.of_org(org, accepted_only=True)]
    assert len(set(ids)) == events, "every event reached the receiver"
    # The killed run's deliveries (the receiver was still holding them) were sent again.
    assert receiver.arrived[org] > events, receiver.arrived[org]


def _serves_haproxy_config(service):
    configs = list(haproxy_dir(service.settings).glob("*/haproxy.cfg"))
    assert len(configs) == 1, configs
    return configs[0]


def test_serves_haproxy_carries_metergate_outage_answers(service):
    """What Serve wrote for its HAProxy, as HAProxy runs it: the outage answers are
    metergate's (a Ray upgrade that changes Serve's template fails here, not in production)."""
    path = _serves_haproxy_config(service)
    config = path.read_text()
    assert f"{path.parent}/500.http" not in config and "not found. Ping" not in config  # Serve's answers
    assert "timeout http-request 5s" in config
    for status, code in (("502", "outcome_unknown"), ("503", "service_unavailable"), ("504", "outcome_unknown")):
        answer = (path.parent / f"metergate-{status}.http").read_bytes()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in head
        assert json.loads(body)["error"]["code"] == code
        assert f"errorfile {status} {path.parent}/metergate-{status}.http" in config
    assert 'http-request return status 503 content-type application/json string "{\\"error\\"' in config


def test_serves_haproxy_holds_no_tcp_port_but_the_http_port(service):
    """Serve binds HAProxy's stats page and Prometheus exporter to TCP ports of every interface.
    A port is free only until someone takes it: one taken while a killed HAProxy was being
    replaced (an outgoing connection's local port did, in CI) kept every later HAProxy from
    starting, and the HTTP port stayed closed. The front moves both to Unix sockets."""
    haproxies = haproxy_processes(service.settings)
    assert haproxies, "no HAProxy of this service runs"
    listening = {c.laddr.port for p in haproxies for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {service.settings.http_port}
    with socket.socket(socket.AF_UNIX) as sock:  # the stats page is still there, for an operator
        sock.settimeout(10)
        sock.connect(str(_serves_haproxy_config(service).parent / "stats.sock"))
        sock.sendall(b"GET /stats;csv HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0], answer[:200]
    assert b"http_frontend" in answer


def test_the_running_fronts_folder_and_sockets_are_the_service_users_alone(service):
    """Another local user can neither enter HAProxy's folder nor open its admin socket (issue
    26: it was 0755 in /tmp with a `mode 666` admin socket that could repoint the backends)."""
    config = _serves_haproxy_config(service)
    folder = haproxy_dir(service.settings)
    info = os.lstat(folder)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, stat.S_ISDIR(info.st_mode)) == (0o700, os.getuid(), True)
    sockets = [config.parent / name for name in ("admin.sock", "stats.sock", "prom.sock")]
    assert {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in sockets if path.exists()} == {
        "admin.sock": 0o600, "stats.sock": 0o600, "prom.sock": 0o600}


def test_the_front_says_so_when_serves_template_keeps_a_side_listener_on_a_tcp_port(tmp_path, capsys):
    """The rewrite depends on Serve's template: a listener it cannot move would bring back a
    port that can be taken while HAProxy is down. HAProxy must start all the same, but not in
    silence."""
    admin = f"    stats socket {tmp_path}/admin.sock mode 666 level admin\n"
    moved = rewrite(f"global\n{admin}defaults\nfrontend prometheus\n    bind :9101\nlisten stats\n  bind *:8404\n",
                    tmp_path)
    assert f"bind unix@{tmp_path}/prom.sock" in moved and f"bind unix@{tmp_path}/stats.sock" in moved
    assert ":9101" not in moved and ":8404" not in moved and capsys.readouterr().err == ""
    rewrite(f"global\n{admin}frontend prometheus\n    bind :9101\nlisten stats\n  bind 0.0.0.0:8404 ssl\n", tmp_path)
    assert "listen stats not moved to a Unix socket" in capsys.readouterr().err
