"""POST /webhooks/svix: signed compute-plane events, applied once, bad deliveries refused."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from svix.webhooks import Webhook

from config.settings import Settings
from tests.helpers import HOUR_TICK_MICROS, SIGNUP_MICROS, SVIX_SECRET, hour_tick, ledger_sum, svix_signed


def deliver(client, payload: dict, **kwargs):
    body, headers = svix_signed(payload, **kwargs)
    return client.post("/webhooks/svix", content=body, headers=headers)


def test_sandbox_lifecycle_and_usage_arrive_by_webhook(admin, compute, sql, new_org):
    org = new_org()
    started = deliver(compute, {"type": "sandbox.started",
                                "data": {"org_id": org, "lease_id": "sbx_w", "ttl_s": 600}})
    assert started.status_code == 200, started.text
    assert started.json()["result"]["lease_id"] == "sbx_w"
    assert admin.get(f"/v1/orgs/{org}").json()["active_leases"] == 1

    usage = deliver(compute, {"type": "usage.batch", "data": {"ticks": [hour_tick(org, "w1", "sbx_w")]}})
    assert usage.json()["result"] == {"accepted": 1, "duplicates": 0, "rejected": []}

    stopped = deliver(compute, {"type": "sandbox.stopped", "data": {"org_id": org, "lease_id": "sbx_w"}})
    assert stopped.status_code == 200
    state = admin.get(f"/v1/orgs/{org}").json()
    assert state["active_leases"] == 0
    assert state["balance_micros"] == SIGNUP_MICROS - HOUR_TICK_MICROS == ledger_sum(sql, org)
    ignored = deliver(compute, {"type": "sandbox.paused", "data": {}})
    assert ignored.status_code == 200 and ignored.json()["result"] == {"ignored": True}


def test_the_same_message_twice_at_once_and_again_later_has_one_effect(service, admin, compute, sql, new_org):
    org = new_org()
    body, headers = svix_signed({"type": "usage.batch", "data": {"ticks": [hour_tick(org, "once", "l")]}})
    answers = []

    def send() -> None:
        answers.append(compute.post("/webhooks/svix", content=body, headers=headers).status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    later = compute.post("/webhooks/svix", content=body, headers=headers)
    assert answers == [200, 200, 200] and later.status_code == 200
    assert later.json()["duplicate"] is True
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS - HOUR_TICK_MICROS
    assert sql.val("SELECT sum(ticks)::int8 FROM usage_rollups WHERE org_id = $1", org) == 1


@pytest.mark.parametrize("case", ["bad_signature", "wrong_secret", "old", "future", "missing_header",
                                  "malformed_signature", "not_json"])
def test_bad_deliveries_are_400_and_change_nothing(compute, sql, new_org, case):
    org = new_org()
    payload = {"type": "usage.batch", "data": {"ticks": [hour_tick(org, f"bad-{case}", "l")]}}
    other_secret = "whsec_" + "b3RoZXItc2VjcmV0LW9mLWVub3VnaC1sZW5ndGgh"
    now = datetime.now(timezone.utc)
    if case == "wrong_secret":
        body, headers = svix_signed(payload, secret=other_secret)
    elif case == "old":
        body, headers = svix_signed(payload, at=int((now - timedelta(seconds=600)).timestamp()))
    elif case == "future":
        body, headers = svix_signed(payload, at=int((now + timedelta(seconds=600)).timestamp()))
    else:
        body, headers = svix_signed(payload)
    if case == "bad_signature":
        body = body.replace(b"bad-", b"BAD-")
    elif case == "missing_header":
        del headers["svix-signature"]
    elif case == "malformed_signature":
        headers["svix-signature"] = "v1,@@not-base64"
    elif case == "not_json":
        body, headers = b"not json at all", svix_signed(payload)[1]
        headers["svix-signature"] = Webhook(SVIX_SECRET).sign(headers["svix-id"], now, body.decode())
    response = compute.post("/webhooks/svix", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_signature", "invalid_json")
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'usage'", org) == 0


def test_a_secret_that_is_not_a_svix_secret_is_refused_at_start():
    with pytest.raises(ValueError, match="whsec_"):
        Settings(svix_webhook_secret="not base64 !!")
