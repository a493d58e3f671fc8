"""The relay (`metergate relay`, metergate_client/relay/) over real HTTP: the gate vectors
through its projection, and against the running service (real Serve, Ray, Postgres) the
server's refusals word for word, each kind of change (halt, resume, credit, tier, another
gateway's lease) within the bound, a killed shard's resync, forwarding with the server's
status, body and headers, and with the server unreachable each action's policy and never
`local` past the bound.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import msgspec
import pytest

from clients.vectors import generate
from metergate_client import GateClient, GateView, Verifier
from metergate_client.projection import ViewRecord, mono_us, read_feed_line
from metergate_client.relay import Relay, running
from metergate_client.relay.bodies import STATUS_BY_REASON as RELAY_STATUS_BY_REASON
from serve_app.views import STATUS_BY_REASON
from tests.delaying_relay import DelayingRelay
from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN, free_port, shard_pid, wait_for

STALENESS_S = 1.0
VECTORS = msgspec.json.decode(generate.VECTORS_PATH.read_bytes())
CASES = VECTORS["cases"]
AS_RELAY = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def relay_of(client: GateClient):
    return running(Relay(client, SERVICE_TOKEN), port=free_port())


@pytest.fixture(scope="module")
def relay(service):
    """(the relay's URL, its GateClient), following the service's feed."""
    client = GateClient(service.base_url, SERVICE_TOKEN, max_staleness_s=STALENESS_S, heartbeat_s=0.1)
    assert client.wait_synced(60), client.counters()
    with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
        yield http, client
    client.close()


def gate(http: httpx.Client, org: str, action: str = "create", **extra) -> dict:
    response = http.post("/v1/gate", json={"org_id": org, "action": action, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def local_until(http: httpx.Client, org: str, wanted, what: str, action: str = "create") -> tuple[dict, float]:
    started = time.monotonic()
    while time.monotonic() - started < 10:
        answer = gate(http, org, action)
        if answer["source"] == "local" and wanted(answer):
            return answer, time.monotonic() - started
        time.sleep(0.002)
    raise AssertionError(f"{what}: not answered locally in 10 s; last {gate(http, org, action)}")


def without_age(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("age_ms", "source", "age_s")}


# ----- the vectors, through a projection filled by hand -------------------------------------------

def test_every_gate_vector_is_answered_exactly_through_the_relay_singly_and_in_a_batch():
    """Each vector's view is put in the relay's projection as its own org's, current for the
    test's whole length; the relay's HTTP answer (single and batch) is the vector's decision,
    with the server's age_ms and the relay's source and age_s."""
    client = GateClient("http://127.0.0.1:9", SERVICE_TOKEN, max_staleness_s=3600, start=False)
    now = mono_us()
    client.projection.clock(0, now, now, now)  # a round trip that bounds shard 0's clock: offset 0
    client.projection.heard(0, now)
    client.projection.apply_all([
        ViewRecord(f"vector_{n}", 0, 1, n + 1, None, msgspec.convert(case["view"], GateView))
        for n, case in enumerate(CASES)])
    bodies = [{"org_id": f"vector_{n}", "action": case["action"], "resources": case["resources"]}
              for n, case in enumerate(CASES)]
    with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
        for case, body in zip(CASES, bodies):
            answer = http.post("/v1/gate", json=body).json()
            assert without_age(answer) == case["decision"], case["name"]
            assert answer["source"] == "local" and 0 <= answer["age_s"] < 3600 and answer["age_ms"] >= 0, answer
            assert list(answer)[:3] == ["allowed", "reason", "status"]  # the server's order
        batch = http.post("/v1/gate/batch", json={"checks": bodies}).json()["decisions"]
        assert [without_age(d) for d in batch] == [case["decision"] for case in CASES]
    assert client.counters()["local"] == 2 * len(CASES)


def test_the_relay_reads_or_refuses_each_resources_vector_and_never_decides_from_an_unreadable_view():
    """resource_readings: a refused one is 422 `invalid_request` (singly, and in its place in a
    batch), a read one a local decision; view_readings: an org whose record did not read is
    answered by the action's policy, never `local`."""
    readings = VECTORS["resource_readings"]
    client = GateClient("http://127.0.0.1:9", SERVICE_TOKEN, max_staleness_s=3600, start=False,
                        default_policy="closed")
    now = mono_us()
    client.projection.clock(0, now, now, now)
    client.projection.heard(0, now)
    for seq, reading in enumerate(VECTORS["view_readings"], 1):
        line = msgspec.json.encode({"type": "view", "org_id": f"read_{seq}", "shard": 0, "epoch": 1, "seq": seq,
                                    "valid_until_us": None, "view": reading["view"]})
        client.projection.apply(read_feed_line(line))
    bodies = [{"org_id": "read_1", "action": "create", "resources": r["resources"]} for r in readings]
    with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
        for reading, body in zip(readings, bodies):
            answer = http.post("/v1/gate", json=body)
            if reading["read"] is None:  # 422; a lone surrogate is no UTF-8 text: 400
                assert answer.status_code in (400, 422), (reading["name"], answer.text)
                assert answer.json()["error"]["code"] in ("invalid_request", "invalid_json"), answer.text
            else:
                assert answer.status_code in (200, 403) and answer.json()["source"] == "local", (reading["name"], answer.text)
        batch = http.post("/v1/gate/batch", json={"checks": bodies}).json()["decisions"]
        statuses = [d.get("status") or d["error"]["status"] for d in batch]
        assert [s in (400, 422) for s in statuses] == [r["read"] is None for r in readings], statuses
        assert [s for s, r in zip(statuses, readings) if r["read"] is not None] == [
            403 if r["name"] == "the largest of each" else 200 for r in readings if r["read"] is not None]
        for seq, reading in enumerate(VECTORS["view_readings"], 1):
            answer = http.post("/v1/gate", json={"org_id": f"read_{seq}", "action": "wake"}).json()
            assert answer["source"] == ("local" if reading["read"] is not None else "policy"), (reading["name"], answer)


def test_the_relays_status_table_is_the_servers():
    assert {reason.value: status for reason, status in STATUS_BY_REASON.items()} == \
        {reason.value: status for reason, status in RELAY_STATUS_BY_REASON.items()}


# ----- against the service ---------------------------------------------------------------------

BAD_GATE_BODIES = [
    b"", b"{", b"[]", b"null", b'{"org_id": "a"}', b'{"org_id": "a", "action": "launch"}',
    b'{"org_id": "a b", "action": "create"}', b'{"org_id": "a\\n", "action": "create"}',
    b'{"org_id": "' + b"x" * 129 + b'", "action": "create"}',
    b'{"org_id": "a", "action": "create", "resources": {"quantity": 0}}',
    b'{"org_id": "a", "action": "create", "resources": {"disk_mb": -1}}',
    b'{"org_id": "a", "action": "create", "resources": {"gpus": 1}}',
    b'{"org_id": "a", "action": "create", "resources": {"region": "eu\\u0000"}}',
    b'{"org_id": "a", "action": "create", "max_age_ms": 3600001}',
    b'{"org_id": "a", "action": "create", "extra": 1}', b'{"org_id": "a", "action": "create"} x',
    b'{"org_id": "\xff", "action": "create"}', b"[" * 40 + b"]" * 40,
]
BAD_BATCH_BODIES = [
    b"", b"{", b'{"checks": 1}', b'{"checks": [1, {"org_id": "a"}]}', b'{"checks": [], "x": 1}',
    b'{"checks": [{"org_id": "a b", "action": "create"}, {"org_id": "a", "action": "launch"}]}',
    b'{"checks": [' + b",".join([b'{"org_id": "a", "action": "ingest"}'] * 1001) + b"]}",
]


def test_bad_input_gets_the_servers_refusal_word_for_word(compute, relay):
    http, _ = relay
    for path, bodies in (("/v1/gate", BAD_GATE_BODIES), ("/v1/gate/batch", BAD_BATCH_BODIES)):
        for body in bodies:
            direct = compute.post(path, content=body, headers={"Content-Type": "application/json"})
            relayed = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert (relayed.status_code, relayed.json()) == (direct.status_code, direct.json()), (path, body[:80])
            assert relayed.status_code in (400, 413, 422) or path.endswith("batch"), (path, body[:80])
    # Too large, declared or not: 413 at once, as the server answers.
    for path, limit in (("/v1/gate", 64 * 1024), ("/v1/gate/batch", 8 * 1024 * 1024)):
        body = b'{"org_id": "' + b"a" * limit + b'", "action": "create"}'
        relayed = http.post(path, content=body, headers={"Content-Type": "application/json"})
        direct = compute.post(path, content=body, headers={"Content-Type": "application/json"})
        assert (relayed.status_code, relayed.json()) == (direct.status_code, direct.json()) and direct.status_code == 413
    chunked = http.post("/v1/gate", content=iter([b"x" * 40_000, b"x" * 40_000]))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large", chunked.text
    # Another token, or none: the server's own refusal, forwarded.
    for headers in ({"Authorization": "Bearer nope"}, {}):
        relayed = httpx.post(str(http.base_url) + "/v1/gate", json={"org_id": "a", "action": "create"}, headers=headers)
        direct = httpx.post(str(compute.base_url) + "/v1/gate", json={"org_id": "a", "action": "create"},
                            headers=headers)
        assert (relayed.status_code, relayed.json()) == (direct.status_code, direct.json()) == (
            401, direct.json()), headers
    # An unknown org: no view, so the server is asked; its 404 comes back as it is.
    unknown = http.post("/v1/gate", json={"org_id": "org_nobody_here", "action": "create"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_org", unknown.text


def test_each_kind_of_change_reaches_the_relays_local_answer_within_the_bound(admin, compute, new_org, relay):
    """An admin halt, a resume, a credit, a tier change and another gateway's lease: each is
    answered `local` by the relay within the bound, exactly as the server answers then."""
    http, _ = relay
    org = new_org()
    first, _ = local_until(http, org, lambda a: a["allowed"], "a new org")
    assert without_age(first) == without_age(compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json())
    balance = first["balance_micros"]
    changes = [
        ("an admin halt", lambda: admin.post(f"/v1/orgs/{org}/halt"), lambda a: a["reason"] == "halted"),
        ("a resume", lambda: admin.post(f"/v1/orgs/{org}/resume"), lambda a: a["allowed"]),
        ("a credit", lambda: admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 2_000_000}),
         lambda a: a["balance_micros"] == balance + 2_000_000),
        ("a tier change", lambda: admin.put(f"/v1/orgs/{org}/tier", json={"tier": "pro"}),
         lambda a: a["max_concurrent"] == 100),
        ("a lease taken by another gateway", lambda: compute.post("/v1/leases", json={"org_id": org, "lease_id": "l1"}),
         lambda a: a["active_leases"] == 1),
    ]
    for what, change, seen in changes:
        response = change()
        assert response.status_code in (200, 201), (what, response.text)
        answer, took_s = local_until(http, org, seen, what)
        assert took_s < STALENESS_S and answer["age_s"] <= STALENESS_S, (what, took_s, answer)
        direct = compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()
        assert without_age(answer) == without_age(direct), what


def test_a_killed_shard_makes_the_relay_resync_and_agree_again(admin, compute, org_id_on, new_org, relay):
    http, client = relay
    org = new_org(org_id=org_id_on(0))
    local_until(http, org, lambda a: True, "a new org")
    before = client.counters()["resyncs"]
    os.kill(shard_pid(0), signal.SIGKILL)
    wait_for("the relay to resync", lambda: client.counters()["resyncs"] > before, timeout_s=90)
    wait_for("the shard to answer again", lambda: compute.post(
        "/v1/gate", json={"org_id": org, "action": "create"}).status_code == 200, timeout_s=90)
    response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 3_000_000})
    assert response.status_code == 201, response.text
    balance = response.json()["balance_micros"]
    answer, _ = local_until(http, org, lambda a: a["balance_micros"] == balance, "a credit after the restart")
    assert without_age(answer) == without_age(compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json())
    metrics = http.get("/metrics").text
    assert f"metergate_relay_resyncs_total {client.counters()['resyncs']}" in metrics


def test_leases_usage_and_idempotent_calls_are_forwarded_with_the_servers_status_body_and_headers(
        compute, admin, new_org, relay):
    http, _ = relay
    org = new_org()
    lease = {"org_id": org, "lease_id": "sbx_1", "ttl_s": 600, "resources": {"memory_mb": 512}}
    taken = http.post("/v1/leases", json=lease)
    assert taken.status_code == 201 and taken.json()["lease_id"] == "sbx_1", taken.text
    again_relayed, again_direct = http.post("/v1/leases", json=lease), compute.post("/v1/leases", json=lease)
    assert again_relayed.status_code == again_direct.status_code == 200
    assert again_relayed.json()["lease_id"] == again_direct.json()["lease_id"] == "sbx_1"
    assert again_relayed.headers["content-type"] == again_direct.headers["content-type"]
    tick = {"tick_id": f"t_{uuid.uuid4().hex[:8]}", "org_id": org, "lease_id": "sbx_1", "duration_ms": 1000,
            "memory_mb": 512, "cpu_count": 1, "started_at": "2026-01-01T00:00:00Z"}
    usage = http.post("/v1/usage", json={"ticks": [tick]})
    assert usage.status_code == compute.post("/v1/usage", json={"ticks": [tick]}).status_code
    assert usage.json().keys() == {"accepted", "duplicates", "rejected"}, usage.text
    released = http.delete(f"/v1/leases/{org}/sbx_1", headers={"Prefer": "return=representation"})
    assert released.status_code == 200 and released.json()["released"] is True, released.text
    gone = http.delete(f"/v1/leases/{org}/sbx_1")
    assert (gone.status_code, gone.content) == (204, b"")
    # The caller's Authorization and Idempotency-Key reach the server: the admin's credit, once.
    as_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": f"relay-{uuid.uuid4().hex}"}
    credit = {"kind": "grant", "amount_micros": 1_000_000}
    first = http.post(f"/v1/orgs/{org}/credits", json=credit, headers=as_admin)
    second = http.post(f"/v1/orgs/{org}/credits", json=credit, headers=as_admin)
    assert first.status_code == second.status_code == 201 and first.json() == second.json(), second.text
    other = http.post(f"/v1/orgs/{org}/credits", json={**credit, "amount_micros": 2}, headers=as_admin)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict", other.text
    # The feed, streamed: its first line arrives through the relay as the server wrote it.
    with http.stream("GET", "/v1/gate/feed", params={"heartbeat_s": 0.1}) as feed:
        assert feed.status_code == 200 and msgspec.json.decode(next(feed.iter_lines()))["type"] in (
            "heartbeat", "resync")


def test_a_check_asking_for_a_capability_token_gets_the_servers_token_through_the_relay(
        service, admin, compute, new_org, relay):
    """Only the server signs capability tokens: a check with `"token": true` is asked of it
    (the relay holding a current view or not), and comes back with its token; a check without
    one is still answered locally, and a `token` of another type gets the server's refusal."""
    http, _ = relay
    org = new_org()
    local_until(http, org, lambda a: a["allowed"], "a new org")
    offset_s = admin.get("/v1/test-clock").json()["offset_s"]
    verifier = Verifier(httpx.get(service.base_url + "/.well-known/metergate-keys", timeout=30).json(),
                        clock=lambda: time.time() + offset_s)
    asked = {"org_id": org, "action": "ingest", "token": True}
    direct, relayed = compute.post("/v1/gate", json=asked), http.post("/v1/gate", json=asked)
    assert relayed.status_code == direct.status_code == 200, relayed.text
    answer = relayed.json()
    assert answer["source"] == "server" and answer.keys() - {"source", "age_s"} == direct.json().keys(), answer
    assert verifier.verify(answer["capability_token"], org, "ingest").claims.lease_id is None
    decisions = http.post("/v1/gate/batch", json={"checks": [asked, {"org_id": org, "action": "ingest"}]}).json()[
        "decisions"]
    assert decisions[0]["source"] == "server" and verifier.verify(decisions[0]["capability_token"], org, "ingest")
    assert decisions[1]["source"] == "local" and "capability_token" not in decisions[1], decisions
    for path, body in (("/v1/gate", {**asked, "token": "yes"}),
                       ("/v1/gate/batch", {"checks": [{**asked, "token": 1}]})):
        direct, relayed = compute.post(path, json=body), http.post(path, json=body)
        assert (relayed.status_code, relayed.json()) == (direct.status_code, direct.json()), (path, relayed.text)


def test_with_the_server_unreachable_the_relay_follows_each_actions_policy_never_local_past_the_bound(
        service, new_org):
    """The relay reaches the service through a loopback TCP relay that is then closed: the feed
    and every request to the server fail. Past the bound no answer is `local`; `create` is
    closed, `ingest` open, and `wake` asks the server, which cannot answer: denied."""
    org = new_org()
    bound = 0.5
    with DelayingRelay(service.base_url) as path:
        client = GateClient(path.url, SERVICE_TOKEN, max_staleness_s=bound, heartbeat_s=0.1,
                            policies={"ingest": "open", "create": "closed", "wake": "server"})
        try:
            assert client.wait_synced(60), client.counters()
            with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
                local_until(http, org, lambda a: a["allowed"], "a new org")
                path.close()
                cut = time.monotonic()
                answers = []
                while time.monotonic() - cut < bound + 1.0:
                    answers.append((time.monotonic() - cut, gate(http, org, "create")))
                    time.sleep(0.005)
                local = [(round(t, 3), a["age_s"]) for t, a in answers if a["source"] == "local"]
                assert all(age <= bound for _, age in local), local
                late = [(t, age) for t, age in local if t > bound + 0.2]  # the last heartbeat, and scheduling
                assert not late, late
                assert answers[-1][1] == {"allowed": False, "reason": "unavailable", "status": 503,
                                          "source": "policy", "age_s": answers[-1][1]["age_s"]}
                assert answers[-1][1]["age_s"] is None or answers[-1][1]["age_s"] > bound
                ingest, wake = gate(http, org, "ingest"), gate(http, org, "wake")
                assert (ingest["source"], ingest["allowed"], ingest["status"]) == ("policy", True, 200), ingest
                assert (wake["source"], wake["allowed"], wake["reason"]) == ("policy", False, "unavailable"), wake
                batch = http.post("/v1/gate/batch", json={"checks": [
                    {"org_id": org, "action": a} for a in ("create", "ingest", "wake")]}).json()["decisions"]
                assert [(d["source"], d["allowed"]) for d in batch] == [("policy", False), ("policy", True),
                                                                          ("policy", False)], batch
                lease = http.post("/v1/leases", json={"org_id": org, "lease_id": "l", "ttl_s": 60})
                assert lease.status_code == 503 and lease.json()["error"]["code"] == "server_unreachable", lease.text
                metrics = http.get("/metrics").text
                assert 'metergate_relay_checks_total{source="policy_open"}' in metrics
                counts = client.counters()
                assert counts["policy_open"] >= 2 and counts["policy_closed"] >= 3 and counts["feed_errors"] >= 1
        finally:
            client.close()


def test_the_relay_listens_on_a_unix_socket_and_its_metrics_are_prometheus_text(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    client = GateClient("http://127.0.0.1:9", SERVICE_TOKEN, start=False, default_policy="closed")
    path = str(tmp_path / "relay.sock")
    with running(Relay(client, SERVICE_TOKEN), uds=path):
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://relay", headers=AS_RELAY) as http:
            answer = http.post("/v1/gate", json={"org_id": "org_a", "action": "create"}).json()
            http.post("/v1/gate", content=b"{")
            metrics = http.get("/metrics")
    assert answer == {"allowed": False, "reason": "unavailable", "status": 503, "source": "policy", "age_s": None}
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.text) for s in family.samples}
    assert samples[("metergate_relay_checks_total", (("source", "policy_closed"),))] == 1
    assert samples[("metergate_relay_checks_total", (("source", "local"),))] == 0
    assert samples[("metergate_relay_refused_total", ())] == 1
    assert samples[("metergate_relay_gate_requests_total", ())] == 2  # the refused one too: the relay answered it


async def _cookie_and_header_echo(scope, receive, send) -> None:
    """A stand-in server: sets a session cookie on every answer and echoes the Cookie header and
    the header a Connection header named, as a server sees them."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = dict(scope["headers"])
    body = msgspec.json.encode({"cookie": headers.get(b"cookie", b"").decode(),
                                "x_hop": headers.get(b"x-hop", b"").decode(), "path": scope["path"]})
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"set-cookie", b"mg_billing=mgo_SECRET; Path=/; HttpOnly")]})
    await send({"type": "http.response.body", "body": body})


def test_the_relay_keeps_no_cookie_between_callers_and_forwards_only_paths_and_end_to_end_headers():
    """One client forwards for every caller: a cookie the server set for one (the billing page's
    session) must never go with another's request; a target that is not a path is refused (it
    could name another host); headers a Connection header names stay on their hop."""
    with running(_cookie_and_header_echo, port=free_port()) as upstream:
        client = GateClient(upstream, SERVICE_TOKEN, start=False)
        with relay_of(client) as url, httpx.Client(base_url=url, timeout=10) as http:
            first = http.get("/billing/org_a", params={"token": "mgo_x"})
            assert first.status_code == 200 and "mg_billing=mgo_SECRET" in first.headers["set-cookie"]
            other = httpx.get(f"{url}/billing/org_a", timeout=10)  # another caller, no cookie of its own
            assert other.json()["cookie"] == ""  # not A's session
            own = httpx.get(f"{url}/billing/org_b", headers={"cookie": "mine=1"}, timeout=10)
            assert own.json()["cookie"] == "mine=1"  # a caller's own cookie goes as it came
            hop = httpx.get(f"{url}/x", headers={"connection": "close, x-hop", "x-hop": "1"}, timeout=10)
            assert hop.json()["x_hop"] == ""
        # `GET @evil.example/x`: httptools refuses that request line itself, h11 passes it on (a
        # relay installed without uvicorn[standard]); the relay must refuse it either way.
        answers: list[dict] = []

        async def send(message: dict) -> None:
            answers.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "path": "@evil.example/x", "raw_path": b"@evil.example/x",
                 "query_string": b"", "headers": [(b"host", b"127.0.0.1")]}
        import asyncio

        asyncio.run(Relay(client, SERVICE_TOKEN)(scope, receive, send))
        assert answers[0]["status"] == 400, answers
        client.close()


def test_asking_for_a_fresher_view_never_loosens_the_relays_answer():
    """A caller's tighter max_age_ms with a view only the relay's own bound holds: the server is
    asked whatever the action's policy, and without a server the relay's own view answers; an
    `open` policy's allow for a halted org would loosen the answer the caller asked to tighten."""
    client = GateClient("http://127.0.0.1:9", SERVICE_TOKEN, max_staleness_s=60, start=False,
                        policies={"create": "open"})
    now = mono_us()
    client.projection.clock(0, now, now, now)
    client.projection.heard(0, now - 2_000_000)  # heard 2 s ago: current for the relay (60 s), not for 100 ms
    client.projection.apply_all([ViewRecord("org_halted", 0, 1, 1, None, msgspec.convert({
        "balance_micros": 0, "quota_remaining_micros": 0, "included_micros": 0, "active_leases": 0,
        "max_concurrent": 5, "max_disk_mb": 20_480, "halted": "admin", "suspended": False, "degraded": False,
        "overdraws": False, "needs_card": False}, GateView))])
    with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
        plain = http.post("/v1/gate", json={"org_id": "org_halted", "action": "create"}).json()
        assert (plain["allowed"], plain["reason"], plain["source"]) == (False, "halted", "local"), plain
        fresher = http.post("/v1/gate", json={"org_id": "org_halted", "action": "create", "max_age_ms": 100}).json()
        assert fresher["allowed"] is False and fresher["reason"] == "halted", fresher  # no server at :9
        (batched,) = http.post("/v1/gate/batch", json={"checks": [
            {"org_id": "org_halted", "action": "create", "max_age_ms": 100}]}).json()["decisions"]
        assert batched["allowed"] is False and batched["reason"] == "halted", batched


async def _odd_decision(scope, receive, send) -> None:
    """A stand-in server whose gate answer has a reason this client does not know."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"allowed": true, "reason": "new_reason", "status": 200}'})


def test_a_server_decision_the_relay_cannot_read_gets_the_policy_not_a_500(monkeypatch):
    with running(_odd_decision, port=free_port()) as upstream:
        client = GateClient(upstream, SERVICE_TOKEN, start=False, policies={"create": "server"})
        with relay_of(client) as url, httpx.Client(base_url=url, headers=AS_RELAY, timeout=30) as http:
            answer = http.post("/v1/gate", json={"org_id": "org_x", "action": "create"})
            assert answer.status_code == 200, answer.text
            assert (answer.json()["allowed"], answer.json()["source"]) == (False, "policy"), answer.json()
        client.close()
    from metergate_client.relay import run

    monkeypatch.setenv(run.TOKEN_ENV, SERVICE_TOKEN)
    assert run.main(["--url", "http://127.0.0.1:9", "--max-staleness-s", "7200"]) == 2  # above max_age_ms's hour
