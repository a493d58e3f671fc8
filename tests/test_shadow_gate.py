"""A shadow org (billing-rules 2.12, issue 22) at the edges, against the running service (real
Serve, Ray, Postgres): with no money it is allowed by POST /v1/gate, by a GateClient's local
decision and by the relay, each with would_allow false; its lease answer says what an enforced
org would get; the billing page says "Preview" with its payment buttons off, and the Checkout
routes (JSON and the page's forms) refuse it with 409 org_in_shadow before reaching Stripe.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from actors import commands as cmd
from metergate_client import GateClient
from metergate_client.client import Source
from metergate_client.relay import Relay, running
from tests.helpers import SERVICE_TOKEN, fake_sessions, free_port, hour_tick

STALENESS_S = 1.0
NO_CARD = "no_payment_method"  # a new org's free credit used up, no card: what create would get


def set_shadow(service, org: str) -> None:
    """SetEnforcement("shadow") through a router of the test's own (PUT /v1/orgs/{id}/enforcement
    is another part of issue 22)."""
    from actors.routing import ShardRouter

    async def run() -> dict:
        return await ShardRouter(service.slot_map).command(org, cmd.SetEnforcement("shadow"))

    answer = asyncio.run(run())
    assert "error" not in answer, answer


@pytest.fixture(scope="module")
def gate_client(service):
    client = GateClient(service.base_url, SERVICE_TOKEN, max_staleness_s=STALENESS_S, heartbeat_s=0.1)
    assert client.wait_synced(60), client.counters()
    yield client
    client.close()


@pytest.fixture
def broke(service, admin, compute, new_org):
    """(a shadow org, an enforced one), both with their free credit used up and no card."""
    orgs = new_org(), new_org()
    set_shadow(service, orgs[0])
    for org in orgs:
        big = {**hour_tick(org, "big", lease_id="sbx_big"), "memory_mb": 4096 * 96}  # 6.32 USD in one hour
        assert compute.post("/v1/usage", json={"ticks": [big]}).json()["accepted"] == 1
        assert admin.get(f"/v1/orgs/{org}").json()["is_halted"] is True  # billed as any inside metergate
    return orgs


def local_until(check, wanted, what: str):
    started = time.monotonic()
    while time.monotonic() - started < 10:
        answer = check()
        if wanted(answer):
            return answer
        time.sleep(0.005)
    raise AssertionError(f"{what}: not seen in 10 s; last {check()}")


def test_a_shadow_org_with_no_money_is_allowed_by_the_gate_a_client_and_the_relay_with_would_allow_false(
        compute, gate_client, broke):
    shadow, enforced = broke
    server = compute.post("/v1/gate", json={"org_id": shadow, "action": "create"}).json()
    assert (server["allowed"], server["reason"], server["status"]) == (True, "ok", 200), server
    assert (server["would_allow"], server["would_reason"]) == (False, NO_CARD), server
    denied = compute.post("/v1/gate", json={"org_id": enforced, "action": "create"}).json()
    assert (denied["allowed"], denied["reason"]) == (False, NO_CARD) and "would_allow" not in denied, denied

    local = local_until(lambda: gate_client.check(shadow, "create"),
                        lambda a: a.source == Source.LOCAL and a.decision.would_allow is not None, "the client")
    assert (local.allowed, local.reason) == (True, "ok")
    assert (local.decision.would_allow, local.decision.would_reason) == (False, NO_CARD)
    assert gate_client.check(shadow, "wake").decision.would_reason == "halted"
    other = local_until(lambda: gate_client.check(enforced, "create"),
                        lambda a: a.source == Source.LOCAL and not a.allowed, "the client, enforced")
    assert other.reason == NO_CARD and other.decision.would_allow is None

    with running(Relay(gate_client, SERVICE_TOKEN), port=free_port()) as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=30) as http:
        relayed = http.post("/v1/gate", json={"org_id": shadow, "action": "create"}).json()
        assert relayed["source"] == "local", relayed
        assert (relayed["allowed"], relayed["reason"], relayed["status"]) == (True, "ok", 200), relayed
        assert (relayed["would_allow"], relayed["would_reason"]) == (False, NO_CARD), relayed
        batch = http.post("/v1/gate/batch", json={"checks": [{"org_id": shadow, "action": "create"},
                                                             {"org_id": enforced, "action": "create"}]})
        first, second = batch.json()["decisions"]
        assert (first["allowed"], first["would_allow"]) == (True, False), first
        assert (second["allowed"], second["reason"]) == (False, NO_CARD) and "would_allow" not in second, second


def test_a_shadow_orgs_lease_is_granted_and_says_what_an_enforced_org_would_get(compute, broke):
    shadow, enforced = broke
    taken = compute.post("/v1/leases", json={"org_id": shadow, "lease_id": "sbx_shadow"})
    assert taken.status_code == 201, taken.text
    assert (taken.json()["would_allow"], taken.json()["would_reason"]) == (False, NO_CARD), taken.json()
    again = compute.post("/v1/leases", json={"org_id": shadow, "lease_id": "sbx_shadow"})
    assert again.status_code == 200 and "would_allow" not in again.json(), again.text  # the same lease: no gate
    refused = compute.post("/v1/leases", json={"org_id": enforced, "lease_id": "sbx_enforced"})
    assert refused.status_code == 402 and refused.json()["reason"] == NO_CARD, refused.text


def test_a_shadow_orgs_billing_page_is_a_preview_and_no_checkout_is_made_for_it(service, admin, new_org):
    shadow, enforced = new_org(), new_org()
    set_shadow(service, shadow)
    page = admin.get(f"/billing/{shadow}")
    assert page.status_code == 200, page.text
    assert 'class="banner preview"' in page.text and "<b>Preview</b>: billing of this account is not live yet" \
        in page.text
    assert '<button type="submit" class="primary" disabled>Top up</button>' in page.text, page.text
    assert '<button type="submit" class="primary" disabled>Add a card</button>' in page.text
    plain = admin.get(f"/billing/{enforced}").text
    assert "Preview" not in plain and '<button type="submit" class="primary">Top up</button>' in plain

    for path, body in (("topup", {"amount_micros": 10_000_000}), ("setup", {}), ("tier", {"tier": "pro"})):
        refused = admin.post(f"/v1/orgs/{shadow}/checkout/{path}", json=body)
        assert refused.status_code == 409, (path, refused.text)
        assert refused.json()["error"]["code"] == "org_in_shadow", refused.text
    assert admin.post(f"/v1/orgs/{enforced}/checkout/topup", json={"amount_micros": 10_000_000}).status_code == 200
    assert fake_sessions(service, shadow) == []  # nothing reached Stripe
