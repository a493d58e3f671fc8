"""The restore runbook (docs/operations/restore.md), end to end, under the running service.

A backup is taken (pg_dump) while traffic flows. After it, acknowledged work the restore will
lose: a Checkout top-up, an auto-recharge charge made in Stripe, outbound events delivered.
The database is then dropped and restored from the backup under the running shards, and the
runbook's commands run: `metergate restore begin`, `metergate inbound reconcile --since`.

What must hold: the shards find the restore and keep nothing from before it in memory (each
balance equals its ledger); the top-up and the charge Stripe made are credited once (nothing
lost); the usage a gateway sends again brings the org under its threshold once more, and the
charge it asks for is not made a second time (one PaymentIntent, one credit); outbound message
ids stay unique although the outbox's sequence rewound. Runs last: it replaces the session's
database with its own backup (tests/conftest.py orders it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import pgserver
import pytest
import ray

from actors.placement import NAMESPACE, shard_name
from actors.timeutil import us_to_rfc3339
from tests.helpers import (
    ADMIN_TOKEN,
    HOUR_TICK_MICROS,
    STRIPE_WEBHOOK_SECRET,
    URLS,
    clock_us,
    database_url_named,
    fake_sessions,
    hour_tick,
    ledger_sum,
    wait_for,
)

pytestmark = pytest.mark.restores_database

US = 1_000_000
BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"
METERGATE = Path(sys.executable).parent / "metergate"
EVENTS = ["checkout.session.completed", "payment_intent.succeeded", "payment_intent.payment_failed"]


def _pg(tool: str, *args: str) -> None:
    done = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _metergate(service, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update({"METERGATE_URL": service.base_url, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"})
    done = subprocess.run([str(METERGATE), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, (done.stdout, done.stderr)
    return done


def _on_server(url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(database_url_named(url, "template1"))  # the service may use "postgres"
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def _complete(service, session_id: str) -> dict:
    response = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{session_id}/complete", json={},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _epochs() -> list[int | None]:
    found = []
    for k in range(2):
        try:
            found.append(ray.get(ray.get_actor(shard_name(k), namespace=NAMESPACE).ready.remote(), timeout=10)["epoch"])
        except Exception:  # noqa: BLE001 - restarting
            found.append(None)
    return found


def _balance(admin, org: str) -> int | None:
    try:
        response = admin.get(f"/v1/orgs/{org}")
    except httpx.HTTPError:
        return None
    return response.json()["balance_micros"] if response.status_code == 200 else None


def _tick(admin, org: str, tick_id: str, lease_id: str) -> dict:
    """An hour tick started at the service's now (the clock-moving tests ran before this one)."""
    return hour_tick(org, tick_id, lease_id) | {"started_at": us_to_rfc3339(clock_us(admin) // US * US)}


def _stripe_events_about(service, org: str) -> set[str]:
    """Ids of Stripe's events (the kinds the endpoint takes) whose object names the org."""
    listed = httpx.get(f"{service.settings.stripe_api_base}/v1/events", params={"limit": 100},
                       headers={"Authorization": "Bearer sk_test_restore"}, timeout=10).json()["data"]
    return {e["id"] for e in listed if e["type"] in EVENTS and org in json.dumps(e["data"]["object"])}


def _recharge_intents(service, org: str) -> list[str]:
    keys = httpx.get(f"{service.settings.stripe_api_base}/_fake/payment_intents/keys", timeout=10).json()
    return sorted({intent["id"] for key, intent in keys.items() if f":{org}:" in key and ":auto_recharge:" in key})


@pytest.fixture
def stripe_webhooks(service):
    api = service.settings.stripe_api_base
    hook = {"url": f"{service.base_url}/webhooks/stripe", "secret": STRIPE_WEBHOOK_SECRET, "events": EVENTS}
    assert httpx.post(f"{api}/_config/webhooks/metergate", json=hook, timeout=10).status_code == 200
    yield
    httpx.post(f"{api}/_config/webhooks/metergate", json={**hook, "events": []}, timeout=10)


def test_the_restore_runbook_loses_no_credit_charges_no_card_twice_and_repeats_no_message_id(
        service, stripe_webhooks, admin, compute, sql, receiver, new_org, org_id_on, tmp_path):
    url = service.settings.database_url
    name = url.rpartition("/")[2].split("?")[0]
    card, other = new_org(org_id=org_id_on(0, "restored")), new_org(org_id=org_id_on(1, "restored"))  # both shards
    assert admin.post(f"/v1/orgs/{card}/checkout/setup", json=URLS).status_code == 200
    (setup,) = [s for s in fake_sessions(service, card) if s["mode"] == "setup"]
    _complete(service, setup["id"])
    wait_for("the card on file", lambda: admin.get(f"/v1/orgs/{card}").json()["has_payment_method"])
    start = _balance(admin, card)  # 5 USD: auto-recharge of 10 USD under 4.5 USD, not due yet
    state = admin.put(f"/v1/orgs/{card}/auto-recharge", json={
        "enabled": True, "threshold_micros": start - 500_000, "amount_micros": 10 * US, "max_per_day": 3})
    assert state.status_code == 200 and state.json()["auto_recharge"]["pending"] is None, state.text
    assert compute.post("/v1/leases", json={"org_id": card, "lease_id": "sbx_r", "ttl_s": 3600}).status_code == 201

    # The backup, while another org's usage flows.
    flowing, stop = [], threading.Event()

    def traffic() -> None:
        n = 0
        while not stop.is_set() and n < 200:
            tick = _tick(admin, other, f"flow_{n}", "sbx_flow")
            if compute.post("/v1/usage", json={"ticks": [tick]}).status_code == 200:
                flowing.append(tick)
            n += 1

    compute.post("/v1/leases", json={"org_id": other, "lease_id": "sbx_flow", "ttl_s": 3600})
    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(0.3)
    restore_point = int(time.time()) - 1
    dump = tmp_path / "backup.dump"
    _pg("pg_dump", "-Fc", "-f", str(dump), "-d", url)
    stop.set()
    worker.join(60)
    outbox_max = sql.val("SELECT COALESCE(max(id), 0)::int8 FROM outbox")

    # After the backup, acknowledged: a top-up, usage that makes auto-recharge charge the card,
    # outbound events delivered.
    topup = admin.post(f"/v1/orgs/{card}/checkout/topup", json={"amount_micros": 20 * US, **URLS}).json()
    _complete(service, topup["session_id"])
    wait_for("the top-up", lambda: _balance(admin, card) == start + 20 * US)
    spend = [_tick(admin, card, f"spend_{n}", "sbx_r") for n in range(3)]
    assert compute.post("/v1/usage", json={"ticks": spend}).json()["accepted"] == 3
    # 25 USD - 0.50 USD: above the threshold. Then an operator's debit takes it under it.
    assert admin.post(f"/v1/orgs/{card}/credits", json={"kind": "adjustment", "amount_micros": -21 * US}).status_code == 201
    charged = start + 20 * US - 3 * HOUR_TICK_MICROS - 21 * US + 10 * US
    wait_for("the auto-recharge credit", lambda: _balance(admin, card) == charged, timeout_s=60)
    (intent,) = _recharge_intents(service, card)
    assert admin.post(f"/v1/orgs/{other}/halt").status_code == 200
    assert admin.post(f"/v1/orgs/{other}/resume").status_code == 200
    lost = wait_for("the events after the backup, delivered", lambda: (
        rows := sql.fetch("SELECT id, message_id FROM outbox WHERE id > $1 AND status = 'delivered'", outbox_max))
        and len(rows) >= 2 and rows)
    delivered_ids = {m["svix_id"] for m in receiver.received}
    # Stripe's own events about the org (localstripe sends them a second late) are applied before
    # the backup is restored: one arriving after would rightly credit what it reports.
    wait_for("Stripe's events about the org, applied", lambda: (
        about := _stripe_events_about(service, card)) and about <= {
            r["event_id"] for r in sql.fetch("SELECT event_id FROM inbound_webhooks WHERE source = 'stripe'")},
        timeout_s=30)
    epochs = _epochs()

    # The restore, under the running service.
    _on_server(url, f'DROP DATABASE "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    _pg("pg_restore", "--single-transaction", "-d", url, str(dump))

    # The shards find it by themselves: a new claim each, memory dropped, charges held.
    wait_for("both shards to claim again", lambda: all(
        e is not None and e > old for e, old in zip(_epochs(), epochs)), timeout_s=60)
    assert {r["name"] for r in sql.fetch("SELECT name FROM service_holds")} == {"charges", "meters"}
    for org in (card, other):
        assert _balance(admin, org) == ledger_sum(sql, org)
    assert _balance(admin, card) == start  # the top-up and the charge are gone with the restore

    # The runbook: fence what ran before, then read Stripe's record back.
    begun = subprocess.run([str(METERGATE), "restore", "begin", "--database-url", url, "--json"],
                           env={k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")},
                           capture_output=True, text=True, timeout=120)
    assert begun.returncode == 0, begun.stderr
    read_back_from = json.loads(begun.stdout)["read_back_from"]
    assert read_back_from <= restore_point
    # A gateway sends its usage again (the restore lost its tick ids too): the org goes under
    # its threshold again and asks for a charge, which the hold keeps from Stripe.
    def resent() -> bool:
        try:
            answer = compute.post("/v1/usage", json={"ticks": spend})
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json()["accepted"] + answer.json()["duplicates"] == 3

    wait_for("the usage sent again", resent, timeout_s=90)
    # The operator's debit was lost too; a smaller one takes the org under its threshold.
    wait_for("a debit", lambda: admin.post(
        f"/v1/orgs/{card}/credits", json={"kind": "adjustment", "amount_micros": -1 * US},
        headers={"Idempotency-Key": f"again-{card}"}).status_code == 201, timeout_s=60)
    assert admin.get(f"/v1/orgs/{card}").json()["auto_recharge"]["pending"] is not None
    time.sleep(2)
    assert _recharge_intents(service, card) == [intent]  # held: no second charge went out

    # Read back from too late an instant (events the restore lost may be older): applied, but the
    # holds stay on, and the command says from when to read.
    too_late = _metergate(service, "inbound", "reconcile", "--since", str(restore_point), "--json", expect=1)
    assert f"--since {read_back_from}" in too_late.stderr
    assert sql.val("SELECT count(*) FROM service_holds") == 2
    assert _recharge_intents(service, card) == [intent]
    reconciled = _metergate(service, "inbound", "reconcile", "--since", str(read_back_from), "--json")
    assert json.loads(reconciled.stdout)["holds_released"] is True
    assert sql.val("SELECT count(*) FROM service_holds") == 0
    # The top-up and the charge Stripe made are credited, once each; the charge the org asked
    # for again was that one (ar_1 again): settled by it, never made.
    expected = start - 3 * HOUR_TICK_MICROS - 1 * US + 20 * US + 10 * US
    wait_for("the credits read back", lambda: _balance(admin, card) == expected, timeout_s=30)
    again = _metergate(service, "inbound", "reconcile", "--since", str(read_back_from), "--json")
    assert json.loads(again.stdout)["applied"] == 0
    time.sleep(3)
    assert _recharge_intents(service, card) == [intent]
    kinds = sql.fetch("SELECT kind, count(*) AS n FROM ledger WHERE org_id = $1 AND kind IN ('topup', 'auto_recharge')"
                      " GROUP BY kind ORDER BY kind", card)
    assert [(r["kind"], r["n"]) for r in kinds] == [("auto_recharge", 1), ("topup", 1)]
    assert admin.get(f"/v1/orgs/{card}").json()["auto_recharge"]["pending"] is None
    for org in (card, other):
        assert _balance(admin, org) == ledger_sum(sql, org)

    # Outbound ids: the outbox's sequence rewound (new events reuse the lost rows' numbers),
    # their message ids did not.
    assert admin.post(f"/v1/orgs/{other}/halt").status_code == 200
    fresh = wait_for("new events delivered", lambda: (
        rows := sql.fetch("SELECT id, message_id FROM outbox WHERE id > $1 AND status = 'delivered'", outbox_max))
        and rows)
    assert {r["id"] for r in fresh} & {r["id"] for r in lost}, "the sequence did not rewind: the test shows nothing"
    assert not {r["message_id"] for r in fresh} & delivered_ids
