"""GateClient against the running service (real Serve, Ray, Postgres): changes reach its
local decisions within the staleness bound, a killed shard makes it resync, and with Serve
gone it stops answering from its views and follows each action's policy.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import msgspec
import pytest
import ray
from ray import serve

from actors.placement import NAMESPACE, shard_name
from metergate_client import GateClient, Resources
from metergate_client.client import Source
from tests.delaying_relay import DelayingRelay
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
    # Synced means every shard loaded and current (issue 18, finding 9), not a first heartbeat.
    assert all(client.projection.age_s(k) <= STALENESS_S for k in range(2)), client.counters()
    assert client.counters()["snapshots"] >= 2
    yield client
    client.close()


def server_decision(compute, org: str, action: str = "create", resources: dict | None = None) -> dict:
    body = {"org_id": org, "action": action, **({"resources": resources} if resources else {})}
    decision = compute.post("/v1/gate", json=body).json()
    decision.pop("status")
    assert 0 <= decision.pop("age_ms") <= 2_000, decision  # the view's age, at most the ingress's FRESH_S
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
    invoice = {"id": f"in_{uuid.uuid4().hex[:8]}", "object": "invoice", "billing_reason": "subscription_cycle",
               "metadata": {"org_id": org}}
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
    released = gate_client.release(org, "sbx_1")
    assert released["status"] == 200 and released["gate_view"]["view"]["active_leases"] == 0, released
    answer = gate_client.check(org, "create")  # no wait: the release's answer carried the view (finding 8)
    assert (answer.source, answer.decision.active_leases) == (Source.LOCAL, 0)
    assert compute.delete(f"/v1/leases/{org}/sbx_1").status_code == 204  # without Prefer: as API.md says


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
        launch.undeploy_ingress()
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


def _first_feed_line(service) -> dict:
    with httpx.stream("GET", f"{service.base_url}/v1/gate/feed", params={"heartbeat_s": 0.1},
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return msgspec.json.decode(next(response.iter_lines()))


def _status(service, path: str) -> int:
    with httpx.stream("GET", f"{service.base_url}{path}", params={"heartbeat_s": 0.1},
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=30) as response:
        return response.status_code


def test_the_feed_runs_on_replicas_of_its_own_or_with_feed_replicas_0_on_the_ingress(service):
    from serve_app import launch

    assert launch.FEED_APP_NAME in serve.status().applications  # the default: a replica of its own
    assert _first_feed_line(service)["type"] == "heartbeat"
    # HAProxy routes by the raw path: an encoded spelling reaches the ingress, which serves no feed.
    assert _status(service, "/v1/gate/fee%64") == 404
    default = service.settings
    service.settings = default.model_copy(update={"feed_replicas": 0})
    try:
        launch.deploy_ingress(service)
        assert launch.FEED_APP_NAME not in serve.status().applications
        assert _first_feed_line(service)["type"] == "heartbeat"  # the ingress's own route
        assert _status(service, "/v1/gate/fee%64") == 200
    finally:
        service.settings = default
        launch.deploy_ingress(service)
    assert launch.FEED_APP_NAME in serve.status().applications


def test_a_client_refuses_unknown_actions_in_its_policies(service):
    with pytest.raises(ValueError, match="no such action"):
        GateClient(service.base_url, SERVICE_TOKEN, policies={"launch": "open"}, start=False)


def test_the_feed_and_the_views_refuse_what_they_did_not_give(service, compute, admin):
    for bad in ("x", "1:2:3", "1:-4", ":", "1:1,"):
        response = compute.get("/v1/gate/feed", params={"after": bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor", bad
    # not base64 JSON; [x]; shard 9; a cursor of 1 shard for the 2-shard snapshot; of 3 shards
    for bad in ("x", "WyJ4Il0", "WyIxOjEsMToxIiw5LG51bGxd", "WyIxOjEiLDAsbnVsbCxmYWxzZV0",
                "WyIxOjEsMToxLDE6MSIsMCxudWxsLGZhbHNlXQ"):
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
    """A shard whose epoch the cursor does not know gets a resync of that shard alone, and the
    stream goes on; a cursor for another number of shards ends the stream with a resync of all."""
    cursor = compute.get("/v1/gate/views", params={"limit": 1}).json()["cursor"]
    positions = [part.split(":") for part in cursor.split(",")]
    assert _first_news(compute, cursor)["type"] in ("view", "heartbeat")
    older = ",".join(f"{int(epoch) + 1000}:{seq}" if k == 0 else f"{epoch}:{seq}"
                     for k, (epoch, seq) in enumerate(positions))  # shard 0 of no such epoch
    news = _first_news(compute, older)
    assert (news["type"], news["shard"], news["epoch"]) == ("resync", 0, int(positions[0][0])), news
    whole = _first_news(compute, cursor + ",1:1")  # one shard too many
    assert whole["type"] == "resync" and whole.get("shard") is None


def test_a_stream_without_a_cursor_asks_to_load_every_shard_and_heartbeats_each_shards_time(compute):
    lines = []
    with compute.stream("GET", "/v1/gate/feed", params={"heartbeat_s": 0.05}) as stream:
        for raw in stream.iter_lines():
            if raw:
                lines.append(msgspec.json.decode(raw))
            beats = [line for line in lines if line["type"] == "heartbeat"]
            if beats and all(a is not None for a in beats[-1]["as_of_us"]) or len(lines) > 200:
                break
    shards = len(beats[-1]["as_of_us"])
    assert sorted(line["shard"] for line in lines if line["type"] == "resync") == list(range(shards))
    beat = beats[-1]
    assert all(0 <= now - as_of < 2_000_000 for now, as_of in zip(beat["now_us"], beat["as_of_us"])), beat
    assert "-" not in beat["cursor"]


def test_check_takes_the_http_bodys_resources_or_says_what_it_expected(gate_client, new_org):
    org = new_org()
    local_until(gate_client, org, lambda d: True, "a new org")
    as_mapping = gate_client.check(org, "create", {"disk_mb": 10**9})
    assert as_mapping.decision == gate_client.check(org, "create", Resources(disk_mb=10**9)).decision
    assert as_mapping.reason == "resource_limit"
    with pytest.raises(TypeError, match="Resources or a mapping"):
        gate_client.check(org, "create", ["disk_mb", 1])
    with pytest.raises(TypeError, match="disk_mb"):
        gate_client.check(org, "create", {"disk_mb": "lots"})


def test_a_feed_held_on_the_way_is_old_not_fresh_and_the_client_answers_by_policy(service, new_org):
    """Issue 18, finding 1, black-box: a relay between client and service starts to hold every
    answer for 2 s. Heartbeats still arrive, each as the server wrote it: the client must count
    the 2 s as age, so past its bound (0.5 s) it answers by policy, never `local`; and a local
    answer never states an age over the bound. Once the relay lets go, local answers return."""
    org = new_org()
    bound = 0.5
    with DelayingRelay(service.base_url) as relay, GateClient(
            relay.url, SERVICE_TOKEN, max_staleness_s=bound, heartbeat_s=0.1, policies={"create": "closed"}) as client:
        assert client.wait_synced(60), client.counters()
        local_until(client, org, lambda d: d.allowed, "a new org")
        relay.delay_s = 2.0
        held = time.monotonic()
        answers = []
        while time.monotonic() - held < 5:
            answers.append((time.monotonic() - held, client.check(org, "create")))
            time.sleep(0.005)
        local = [(round(t, 3), a.age_s) for t, a in answers if a.source == Source.LOCAL]
        assert all(age <= bound for _, age in local), local
        late = [(t, age) for t, age in local if t > bound + 0.3]  # a heartbeat of before, and scheduling
        assert not late, late
        assert [a.source for t, a in answers if t > 1.0] == [Source.POLICY] * len([t for t, _ in answers if t > 1.0])
        relay.delay_s = 0.0
        local_until(client, org, lambda d: d.allowed, "local answers once the relay lets go")


def test_a_server_answer_states_its_views_age_and_keeps_to_the_callers_bound(compute, new_org):
    """Issue 18, finding 2: the ingress answers from its own views when they are fresh enough
    for it (up to 2 s); it says how old the view was, and a check that sends its own bound
    (max_age_ms) is decided from a view no older than that, else by the shard itself."""
    org = new_org()
    body = {"org_id": org, "action": "create"}
    wait_for("the ingress's own view", lambda: compute.post("/v1/gate", json=body).json()["age_ms"] > 0)
    assert compute.post("/v1/gate", json={**body, "max_age_ms": 0}).json()["age_ms"] == 0  # asked the shard
    bounded = compute.post("/v1/gate/batch", json={"checks": [{**body, "max_age_ms": 0}, body]}).json()
    assert [d["age_ms"] for d in bounded["decisions"]] == [0, 0]  # a batch keeps to its tightest bound
    for bad in (-1, 3_600_001, "1", 1.5):
        response = compute.post("/v1/gate", json={**body, "max_age_ms": bad})
        assert response.status_code == 422, (bad, response.text)


def test_one_shard_killed_under_traffic_leaves_the_other_shards_orgs_local(compute, org_id_on, new_org, gate_client):
    """Issue 18, finding 4: kill -9 one shard while checks run. Every check of an org on the
    other shard is answered locally throughout (counted); the killed shard's org is local again
    within seconds of its shard answering."""
    killed, kept = new_org(org_id=org_id_on(0)), new_org(org_id=org_id_on(1))
    for org in (killed, kept):
        local_until(gate_client, org, lambda d: d.allowed, "a new org")
    os.kill(shard_pid(0), signal.SIGKILL)
    started = time.monotonic()
    sources = {killed: [], kept: []}
    went_off = None
    while time.monotonic() - started < 90:
        for org in (killed, kept):
            sources[org].append(gate_client.check(org, "ingest").source)
        if went_off is None and sources[killed][-1] != Source.LOCAL:
            went_off = time.monotonic() - started
        elif went_off is not None and sources[killed][-1] == Source.LOCAL:
            break
        time.sleep(0.002)
    back = time.monotonic() - started
    assert went_off is not None, "the killed shard's org was never off local decisions"
    assert sources[killed][-1] == Source.LOCAL, f"not local again in {back:.0f} s: {gate_client.counters()}"
    assert set(sources[kept]) == {Source.LOCAL}, {s: sources[kept].count(s) for s in set(sources[kept])}
    assert len(sources[kept]) > 100  # checks ran all along
    wait_for("the shard to answer again", lambda: compute.post(
        "/v1/gate", json={"org_id": killed, "action": "create"}).status_code == 200, timeout_s=90)


@pytest.mark.time_travel
def test_a_dunning_deadline_denies_at_the_shard_the_ingress_and_a_client_without_the_sweep(
        admin, compute, org_id_on, new_org, gate_client):
    """Issue 18, finding 3: an unpaid invoice's suspension is a deadline in every view. With no
    sweep to commit it (only the shards' clocks are moved, the scheduler's is not), the shard,
    the ingress and a client all deny within 1 s of the deadline."""
    org = new_org(org_id=org_id_on(0), plan_id="hobby_weekly")
    local_until(gate_client, org, lambda d: d.allowed, "a new org")
    since_s = clock_us(admin) // 1_000_000
    failed = stripe_event("invoice.payment_failed", {"id": f"in_{uuid.uuid4().hex[:8]}", "object": "invoice",
                                                     "billing_reason": "subscription_cycle",
                                                     "metadata": {"org_id": org}}, created=since_s)
    assert stripe_deliver(compute, failed).status_code == 200
    deadline_us = (since_s + 3 * 86_400) * 1_000_000
    shards = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(2)]
    offset = deadline_us - 2_000_000 - time.time_ns() // 1_000  # the shards' time: 2 s before the deadline
    ray.get([h.set_clock.remote(offset) for h in shards], timeout=60)
    deadline_wall = time.time() + 2.0
    try:
        first_deny: dict[str, float] = {}
        shard = shards[0]
        while time.time() < deadline_wall + 3 and len(first_deny) < 3:
            at = time.time() - deadline_wall
            answers = {
                "shard": ray.get(shard.gate.remote([(org, "create", Resources())]), timeout=10)[0]["reason"],
                "ingress": compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()["reason"],
                "client": gate_client.check(org, "create").reason}
            for where, reason in answers.items():
                if reason == "suspended":
                    first_deny.setdefault(where, at)
                else:
                    assert where not in first_deny, (where, "allowed again after a deny", at)
                    assert at < 1.0, (where, reason, at)
            time.sleep(0.02)
        assert set(first_deny) == {"shard", "ingress", "client"}, first_deny
        assert all(-0.2 < at <= 1.0 for at in first_deny.values()), first_deny
    finally:
        advance(admin, 3 * 86_400 + 60)  # the whole service's clock past what the shards were given


def test_a_client_follows_only_the_orgs_it_is_told_to(service, new_org):
    """Issue 18, what to build 4: a prefix is filtered by the server (only those views come),
    a set of ids here; orgs not followed are answered by policy, never from a view."""
    prefix = f"sub{uuid.uuid4().hex[:6]}_"
    mine = [new_org(org_id=f"{prefix}{n}") for n in range(3)]
    other = new_org()
    with GateClient(service.base_url, SERVICE_TOKEN, heartbeat_s=0.1, orgs=prefix,
                    default_policy="closed") as by_prefix, \
            GateClient(service.base_url, SERVICE_TOKEN, heartbeat_s=0.1, orgs={mine[0], other},
                       default_policy="closed") as by_set:
        assert by_prefix.wait_synced(60) and by_set.wait_synced(60)
        for org in mine:
            local_until(by_prefix, org, lambda d: d.allowed, "a followed org")
        assert by_prefix.check(other, "create").source == Source.POLICY
        assert by_prefix.counters()["views"] == 3  # nothing else was sent or kept
        local_until(by_set, mine[0], lambda d: d.allowed, "a followed org")
        local_until(by_set, other, lambda d: d.allowed, "a followed org")
        assert by_set.check(mine[1], "create").source == Source.POLICY
        assert by_set.counters()["views"] == 2
    response = httpx.get(service.base_url + "/v1/gate/views", params={"prefix": "a b"},
                         headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
    assert response.status_code == 422, response.text
