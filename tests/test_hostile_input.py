"""Input that Postgres or the core cannot hold is refused at the edge with a 4xx naming the
field, on every route, webhooks included; nothing a caller sends produces a 500.

Regressions of a black-box run: a NUL in a stored text field passed validation and failed a
whole group commit; invalid UTF-8 and deep nesting escaped the decoders as 500s.
"""

from __future__ import annotations


import pytest

from tests.helpers import assert_error, footprint, hour_tick, stripe_event, stripe_signed, svix_headers

INVALID_UTF8 = b"\xed\xa0\x80"  # a UTF-16 surrogate encoded as UTF-8: not valid UTF-8
DEEP = 1_200  # past Python's recursion limit, where a second, untyped decode used to blow up


@pytest.fixture
def org(new_org):
    return new_org()


def deep(inner: bytes) -> bytes:
    return b"[" * DEEP + inner + b"]" * DEEP


def hot_path_bodies(org: str) -> dict[str, list[bytes]]:
    bad_org = b'"' + org.encode() + INVALID_UTF8 + b'"'
    return {
        "/v1/gate": [b'{"org_id": ' + bad_org + b', "action": "create"}',
                     b'{"org_id": "' + org.encode() + b'", "action": "create", "resources": ' + deep(b"1") + b"}",
                     deep(b"{}")],
        "/v1/leases": [b'{"org_id": ' + bad_org + b', "lease_id": "l1"}',
                       b'{"org_id": ' + deep(b'"x"') + b', "lease_id": "l1"}'],
        "/v1/usage": [b'{"ticks": [{"tick_id": ' + bad_org + b"}]}",
                      b'{"ticks": ' + deep(b"{}") + b"}",
                      b'{"ticks": [' + deep(b"1") + b"]}"],
    }


def test_invalid_utf8_and_deep_nesting_are_400_on_the_hot_path(compute, sql, org):
    before = footprint(sql, org)
    for path, bodies in hot_path_bodies(org).items():
        for body in bodies:
            response = compute.post(path, content=body)
            if path == "/v1/usage" and response.status_code == 200:
                # One bad tick inside a good envelope is rejected alone, with its index.
                assert [r["index"] for r in response.json()["rejected"]] == [0], response.text
                continue
            assert_error(response, 400, "invalid_json")
    assert footprint(sql, org) == before


def test_invalid_utf8_and_deep_nesting_are_400_on_admin_routes(admin, sql, org):
    before = footprint(sql, org)
    for path in ("/v1/orgs", f"/v1/orgs/{org}/credits"):
        assert_error(admin.post(path, content=b'{"note": "' + INVALID_UTF8 + b'"}'), 400, "invalid_json")
        assert_error(admin.post(path, content=deep(b"{}")), 400, "invalid_json")
    assert footprint(sql, org) == before


def test_nul_and_control_characters_in_stored_text_are_422_naming_the_field(admin, compute, sql, org):
    before = footprint(sql, org)
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5, "note": "a\x00b"}),
                 422, "invalid_request", "note")
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5, "note": "\x1b[2J"}),
                 422, "invalid_request", "note")
    assert_error(admin.post("/v1/orgs", json={"org_id": "org_nul_email", "email": "a\x00b@example.com"}),
                 422, "invalid_request", "email")
    assert_error(admin.put(f"/v1/orgs/{org}/limits", json={"machine_quotas": {"us\x00": {"a3": 1}}}),
                 422, "invalid_request", "machine_quotas")
    assert_error(compute.post("/v1/gate", json={"org_id": org, "action": "create",
                                                 "resources": {"region": "us\x00", "machine_type": "a3"}}),
                 422, "invalid_request", "region")
    usage = compute.post("/v1/usage", json={"ticks": [{**hour_tick(org, "nul-unit"), "units": {"a\x00": 1}}]}).json()
    assert (usage["accepted"], [r["index"] for r in usage["rejected"]]) == (0, [0])
    assert_error(admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5},
                            headers={"Idempotency-Key": b"k\xe9y"}), 400, "invalid_idempotency_key")
    # A note may still hold ordinary text, tabs and new lines.
    ok = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5, "note": "a\tb\nc é"})
    assert ok.status_code == 201, ok.text
    assert footprint(sql, org) != before


def test_every_rejected_tick_carries_its_index_whichever_layer_rejected_it(compute, org):
    ticks = [hour_tick(org, "good-0"),
             {**hour_tick(org, "bad-time"), "started_at": 12},              # the edge
             hour_tick("org_that_does_not_exist", "ghost"),                  # the shard: unknown_org
             {**hour_tick(org, "unit"), "units": {"teleports": 1}},          # the shard: unknown_unit
             hour_tick(org, "good-1")]
    body = compute.post("/v1/usage", json={"ticks": ticks}).json()
    assert body["accepted"] == 2
    rejected = {r["index"]: r for r in body["rejected"]}
    assert sorted(rejected) == [1, 2, 3]
    assert rejected[2]["error"] == "unknown_org" and rejected[2]["tick_id"] == "ghost"
    assert rejected[3]["error"].startswith("unknown_unit") and rejected[3]["tick_id"] == "unit"


def test_webhooks_refuse_invalid_utf8_and_deep_nesting_even_when_signed(service, sql, org):
    import httpx

    before = footprint(sql, org)
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        deep_event = b'{"type": "usage.batch", "data": ' + deep(b"1") + b"}"
        response = client.post("/webhooks/svix", content=deep_event, headers=svix_headers(deep_event, message_id="msg_deep"))
        assert response.status_code in (400, 422), response.text
        assert "Traceback" not in response.text
        for body in (b'{"id": "evt_x", "type": "' + INVALID_UTF8 + b'"}', b'{"id": "evt_y", "data": ' + deep(b"1") + b"}"):
            response = client.post("/webhooks/stripe", content=body,
                                   headers={"Stripe-Signature": "t=1,v1=00", "Content-Type": "application/json"})
            assert_error(response, 400, response.json()["error"]["code"])
        nested: object = 1
        for _ in range(40):  # deeper than any Stripe event, far short of a recursion limit
            nested = [nested]
        body, headers = stripe_signed({"id": "evt_deep", "type": "charge.refunded", "data": {"object": nested}})
        assert_error(client.post("/webhooks/stripe", content=body, headers=headers), 400, "invalid_json")
        body, headers = stripe_signed({"id": "evt_\x00nul", "type": "charge.refunded", "data": {"object": {}}})
        assert_error(client.post("/webhooks/stripe", content=body, headers=headers), 422, "invalid_request", "id")
    assert footprint(sql, org) == before


def test_signed_stripe_events_with_impossible_fields_are_dead_letters_not_500(service, sql, new_org):
    import httpx

    org = new_org()
    before = footprint(sql, org)
    session = {"id": "cs_hostile", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
               "payment_intent": "pi_hostile", "client_reference_id": org, "metadata": {"org_id": org}}
    cases = [{**session, "amount_total": "lots"}, {**session, "amount_total": 10**20}, {**session, "amount_total": 0},
             {**session, "amount_total": 100, "metadata": {"org_id": org, "credit_expires_at": 10**30}},
             {k: v for k, v in session.items() if k != "id"}]
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        for obj in cases:
            body, headers = stripe_signed(stripe_event("checkout.session.completed", obj))
            # Verified, so answered 200 (a 4xx makes Stripe retry and disable the endpoint),
            # recorded as not applied.
            response = client.post("/webhooks/stripe", content=body, headers=headers)
            assert response.status_code == 200, (obj, response.text)
            assert response.json()["outcome"] == "dead_letter" and response.json()["applied"] == [], response.text
    assert footprint(sql, org) == before
