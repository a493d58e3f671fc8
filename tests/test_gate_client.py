"""GateClient against the running service (real Serve, Ray, Postgres): changes reach its
local decisions within the staleness bound, a killed shard makes it resync, and with Serve
gone it stops answering from its views and follows each action's policy.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import msgspec
import pytest
from ray import serve

from metergate_client import GateClient, Resources
from metergate_client.client import Source
from tests.helpers import (
    SERVICE_TOKEN,
    advance,
    clock_us,
    shard_pid,
    stripe_deliver,
    stripe_event,
    wait_for,
)

STALENESS_S = 1.0


@pytest.fixture(scope="module")
def gate_client(service):
    client = GateClient(service.base_url, SERVICE_TOKEN, max_staleness_s=STALENESS_S, heartbeat_s=0.1)
    assert client.wait_synced(60), client.counters()
    yield client
    client.close()


def server_decision(compute, org: str, action: str = "create", resources: dict | None = None) -> dict:
    body = {"org_id": org, "action": action, **({"resources": resources} if resources else {})}
    decision = compute.post("/v1/gate", json=body).json()
    decision.pop("status")
    return decision


def local_until(client: GateClient, org: str, wanted, what: str, action: str = "create",
                resources: Resources | None = None) -> tuple[dict, float]:
    """(the first local decision that satisfies `wanted`, seconds it took); fails past 10 s."""
    started = time.monotonic()
    while time.monotonic() - started < 10:
        answer = client.check(org, action, resources)
        if answer.source == Source.LOCAL and wanted(answer.decision):
            return msgspec.to_builtins(answer.decision), time.monotonic() - started
        time.sleep(0.002)
    raise AssertionError(f"{what}: not seen locally in 10 s; last {client.check(org, action, resources)}, "
                         f"{client.counters()}")


def test_each_kind_of_change_reaches_the_local_decision_within_the_bound(admin, compute, new_org, gate_client):
    org = new_org()
    first, _ = local_until(gate_client, org, lambda d: True, "a new org")
    assert first == server_decision(compute, org)
    balance = first["balance_micros"]

    changes = [
        ("a credit", lambda: admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 2_000_000}),
         lambda d: d.balance_micros == balance + 2_000_000),
        ("an admin halt", lambda: admin.post(f"/v1/orgs/{org}/halt"), lambda d: d.reason == "halted"),
        ("a resume", lambda: admin.post(f"/v1/orgs/{org}/resume"), lambda d: d.allowed),
        ("a tier change", lambda: admin.put(f"/v1/orgs/{org}/tier", json={"tier": "pro"}),
         lambda d: d.max_concurrent == 100),
        ("a lease taken by another gateway", lambda: compute.post("/v1/leases", json={"org_id": org, "lease_id": "l1"}),
         lambda d: d.active_leases == 1),
    ]
    for what, change, seen in changes:
        response = change()
        assert response.status_code in (200, 201), (what, response.text)
        decision, took = local_until(gate_client, org, seen, what)
        assert took <= STALENESS_S, (what, took)
        assert decision == server_decision(compute, org), what  # and exactly the server's answer


@pytest.mark.time_travel
def test_a_suspension_reaches_the_local_decision(admin, compute, new_org, gate_client):
    """An unpaid invoice, then three days of the test clock: the scheduler suspends the org."""
    org = new_org(plan_id="hobby_weekly")
    local_until(gate_client, org, lambda d: d.allowed, "a new org")
    invoice = {"id": f"in_{uuid.uuid4().hex[:8]}", "object": "invoice", "metadata": {"org_id": org}}
    failed = stripe_event("invoice.payment_failed", invoice, created=clock_us(admin) // 1_000_000)
    assert stripe_deliver(compute, failed).status_code == 200
    advance(admin, 3 * 86_400)
    decision, took = local_until(gate_client, org, lambda d: d.reason == "suspended", "a suspension")
    assert took <= STALENESS_S
    assert decision == server_decision(compute, org)


def test_a_lease_answer_updates_the_local_view_at_once(compute, new_org, gate_client):
    org = new_org()
    local_until(gate_client, org, lambda d: True, "a new org")
    lease = gate_client.lease(org, "sbx_1", Resources(memory_mb=512), ttl_s=120)
    assert lease["status"] == 201, lease
    answer = gate_client.check(org, "create")  # no wait: the lease's answer carried the view
    assert (answer.source, answer.decision.active_leases) == (Source.LOCAL, 1)
    assert gate_client.release(org, "sbx_1")["status"] == 204
    local_until(gate_client, org, lambda d: d.active_leases == 0, "a release")


def test_a_killed_shard_makes_the_client_resync_and_agree_again(admin, compute, org_id_on, new_org, gate_client):
    org = new_org(org_id=org_id_on(0))
    local_until(gate_client, org, lambda d: True, "a new org")
    before = gate_client.counters()["resyncs"]
    os.kill(shard_pid(0), signal.SIGKILL)
    wait_for("the client to resync", lambda: gate_client.counters()["resyncs"] > before, timeout_s=90)
    wait_for("the shard to answer again", lambda: compute.post(
        "/v1/gate", json={"org_id": org, "action": "create"}).status_code == 200, timeout_s=90)
    response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 3_000_000})
    assert response.status_code == 201, response.text
    balance = response.json()["balance_micros"]
    decision, _ = local_until(gate_client, org, lambda d: d.balance_micros == balance, "a credit after the restart")
    assert decision == server_decision(compute, org)


def test_with_serve_gone_the_client_follows_each_actions_policy(service, new_org):
    org = new_org()
    with GateClient(service.base_url, SERVICE_TOKEN, max_staleness_s=STALENESS_S, heartbeat_s=0.1,
                    policies={"ingest": "open", "create": "closed", "wake": "server"}) as client:
        assert client.wait_synced(60)
        local_until(client, org, lambda d: d.allowed, "a new org")
        from serve_app import launch

        gone = time.monotonic()
        serve.delete(launch.APP_NAME)
        try:
            wait_for("the views to go stale", lambda: client.check(org, "create").source == Source.POLICY,
                     timeout_s=10)
            assert time.monotonic() - gone >= STALENESS_S * 0.8  # not before the bound (heartbeats: 0.1 s)
            assert client.check(org, "create").allowed is False  # closed
            assert client.check(org, "ingest").allowed is True  # open
            wake = client.check(org, "wake")  # asks the server, which is not there: denied
            assert (wake.source, wake.allowed, wake.reason) == (Source.POLICY, False, "unavailable")
            counts = client.counters()
            assert counts["policy_open"] >= 1 and counts["policy_closed"] >= 2 and counts["feed_errors"] >= 1
        finally:
            launch.deploy_ingress(service)
        wait_for("the client to follow the feed again",
                 lambda: client.check(org, "create").source == Source.LOCAL, timeout_s=60)


def test_a_client_refuses_unknown_actions_in_its_policies(service):
    with pytest.raises(ValueError, match="no such action"):
        GateClient(service.base_url, SERVICE_TOKEN, policies={"launch": "open"}, start=False)


def test_the_feed_and_the_views_refuse_what_they_did_not_give(service, compute, admin):
    for bad in ("x", "1:2:3", "1:-4", ":", "1:1,"):
        response = compute.get("/v1/gate/feed", params={"after": bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor", bad
    for bad in ("x", "WyJ4Il0", "WyIxOjEsMToxIiw5LG51bGxd"):  # not base64 JSON; [x]; shard 9
        response = compute.get("/v1/gate/views", params={"page": bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_page", bad
    assert compute.get("/v1/gate/views", params={"limit": 0}).status_code == 422
    org = admin.post("/v1/orgs", json={"org_id": f"org_{uuid.uuid4().hex[:10]}", "email": "a@example.com"}).json()
    token = admin.post(f"/v1/orgs/{org['org_id']}/tokens", json={}).json()["token"]
    as_org = compute.get("/v1/gate/views", headers={"Authorization": f"Bearer {token}"})
    assert as_org.status_code == 403  # views of every org are for the compute plane only


def _first_news(compute, after: str) -> dict:
    """The stream's first line that is not a heartbeat (a resumed stream heartbeats at once
    from its own cursor, before it has heard from the shards), or its last heartbeat after 3 s."""
    line = None
    with compute.stream("GET", "/v1/gate/feed", params={"after": after, "heartbeat_s": 0.1}) as stream:
        assert stream.status_code == 200
        started = time.monotonic()
        for raw in stream.iter_lines():
            if raw:
                line = msgspec.json.decode(raw)
                if line["type"] != "heartbeat" or time.monotonic() - started > 3:
                    return line
    assert line is not None, "the feed ended without a line"
    return line


def test_a_cursor_of_another_epoch_or_shard_count_gets_resync(compute):
    cursor = compute.get("/v1/gate/views", params={"limit": 1}).json()["cursor"]
    positions = [part.split(":") for part in cursor.split(",")]
    assert _first_news(compute, cursor)["type"] in ("view", "heartbeat")
    older = ",".join(f"{int(epoch) + 1000}:{seq}" for epoch, seq in positions)  # no such epoch
    assert _first_news(compute, older)["type"] == "resync"
    assert _first_news(compute, cursor + ",1:1")["type"] == "resync"  # one shard too many
