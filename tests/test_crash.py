"""kill -9 of a shard's process while ticks stream in: nothing acknowledged is lost or doubled."""

from __future__ import annotations

import os
import signal
import threading

import httpx

from tests.helpers import (
    SERVICE_TOKEN,
    TICK_MICROS,
    TICKS_PER_REQUEST,
    ledger_sum,
    send_until_acknowledged,
    shard_pid,
    tick_batch,
)

REQUESTS = 60


def test_every_acknowledged_tick_is_billed_exactly_once_across_a_shard_kill(
        service, admin, sql, org_id_on, new_org):
    orgs = [new_org(org_id=org_id_on(0, "crash")) for _ in range(4)]
    for org in orgs:  # plenty of credit: nothing halts, every tick is a plain debit
        admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 100_000_000})
    start_balance = {org: admin.get(f"/v1/orgs/{org}").json()["balance_micros"] for org in orgs}
    victim = shard_pid(0)

    acknowledged: list[int] = []
    failed: list[int] = []
    killed = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30,
                          headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
            for request_no in range(REQUESTS):
                if request_no == REQUESTS // 3:
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
                try:
                    response = client.post("/v1/usage", json=tick_batch(orgs, request_no))
                    (acknowledged if response.status_code == 200 else failed).append(request_no)
                except httpx.HTTPError:
                    failed.append(request_no)

    streamer = threading.Thread(target=stream)
    streamer.start()
    streamer.join(timeout=300)
    assert not streamer.is_alive()
    assert killed.is_set()
    assert shard_pid(0) != victim, "the shard was restarted in a new process"

    def billed_ticks() -> int:
        return sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = ANY($1)", orgs)

    # Before any retry: every acknowledged tick is billed, a failed one at most once.
    billed = billed_ticks()
    print(f"kill -9 during streaming: {len(acknowledged)} requests acknowledged, {len(failed)} failed")
    assert len(acknowledged) * TICKS_PER_REQUEST <= billed <= REQUESTS * TICKS_PER_REQUEST

    # The caller retries what failed: then every tick is billed exactly once.
    with httpx.Client(base_url=service.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
        for request_no in failed:
            send_until_acknowledged(client, tick_batch(orgs, request_no))
    assert billed_ticks() == REQUESTS * TICKS_PER_REQUEST

    for org in orgs:
        ticks_of_org = sum(1 for no in range(REQUESTS) for t in tick_batch(orgs, no)["ticks"] if t["org_id"] == org)
        state = admin.get(f"/v1/orgs/{org}").json()
        assert state["balance_micros"] == start_balance[org] - ticks_of_org * TICK_MICROS
        assert ledger_sum(sql, org) == state["balance_micros"]
