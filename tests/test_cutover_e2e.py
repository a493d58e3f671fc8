"""Shadow mode and per-org cutover through the real service (issue 22 parts 1 and 4,
billing-rules 2.12): PUT /v1/orgs/{id}/enforcement, an import's `enforcement`, `metergate
cutover` (one org, --undo, --file), and the Stripe meter: no hour of a shadow org is sent, after
a cutover at T the hours before T never are and those from T on are, once; an undo is refused
once something was sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import ray

from actors.timeutil import us_to_rfc3339
from tests.helpers import ADMIN_TOKEN, advance, clock_us, outbox, stripe_client, wait_for

METERGATE = Path(sys.executable).parent / "metergate"
US = 1_000_000
HOUR_US = 3_600 * US


def cli(service, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update({"METERGATE_URL": service.base_url, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"})
    return subprocess.run([str(METERGATE), *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def import_one(admin, line: dict) -> dict:
    response = admin.post("/v1/import", json={"orgs": [line]})
    assert response.status_code == 200, response.text
    answer = response.json()["orgs"][0]
    assert answer["status"] == "created", answer
    return answer


def enforcement_row(sql, org_id: str):
    row = sql.fetch("SELECT shadow, cutover FROM org_enforcement WHERE org_id = $1", org_id)
    return (row[0]["shadow"], row[0]["cutover"]) if row else None


def hour_of(us: int) -> str:
    return us_to_rfc3339(us // HOUR_US * HOUR_US)


def test_the_enforcement_body_is_strict_and_a_cutover_is_at_a_whole_hour(admin, new_org):
    org = new_org()
    assert admin.get(f"/v1/orgs/{org}").json()["enforcement"] == "enforce"
    put = lambda body: admin.put(f"/v1/orgs/{org}/enforcement", json=body)  # noqa: E731
    odd = put({"mode": "enforce", "at": "2030-01-01T10:30:00Z"})
    assert odd.status_code == 422 and "whole UTC hour" in odd.json()["error"]["message"], odd.text
    assert put({"mode": "enforce", "at": "2030-01-01T10:00:00Z", "why": 1}).status_code == 422
    assert put({"mode": "enforce", "undo": True}).status_code == 422
    assert put({"mode": "shadow", "at": "2030-01-01T10:00:00Z"}).status_code == 422
    assert put({"mode": "later"}).status_code == 422
    assert admin.put("/v1/orgs/org_nobody_here/enforcement", json={"mode": "shadow"}).status_code == 404
    # Shadow, then a cutover at the next whole hour (no `at`), with an Idempotency-Key.
    shadow = put({"mode": "shadow"}).json()
    assert (shadow["enforcement"], shadow["cutover_at"]) == ("shadow", None)
    headers = {"Idempotency-Key": f"cut-{org}"}
    first = admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "enforce"}, headers=headers)
    assert first.status_code == 200, first.text
    now = clock_us(admin)
    assert first.json()["enforcement"] == "shadow"  # until the next hour
    assert first.json()["cutover_at"] in (hour_of(now + HOUR_US), hour_of(now))
    again = admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "enforce"}, headers=headers)
    assert again.json() == first.json()
    other = admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "shadow"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert admin.get(f"/v1/orgs/{org}").json()["cutover_at"] == first.json()["cutover_at"]


def test_a_shadow_prepaid_org_with_no_money_is_allowed_asks_no_charge_and_is_halted_for_real_after_its_cutover(
        admin, compute, sql):
    prefix = f"shd{uuid.uuid4().hex[:6]}"
    broke = f"{prefix}_broke"
    import_one(admin, {"org_id": broke, "email": f"{broke}@example.com", "balance_micros": 0,
                       "billing_mode": "prepaid", "enforcement": "shadow"})
    state = admin.get(f"/v1/orgs/{broke}").json()
    assert (state["enforcement"], state["cutover_at"], state["is_halted"]) == ("shadow", None, True)
    assert enforcement_row(sql, broke) == (True, None)

    gate = compute.post("/v1/gate", json={"org_id": broke, "action": "create"})
    assert gate.status_code == 200, gate.text
    assert (gate.json()["allowed"], gate.json()["would_allow"]) == (True, False), gate.json()
    lease = compute.post("/v1/leases", json={"org_id": broke, "lease_id": "shadow_1", "ttl_s": 600})
    assert lease.status_code == 201, lease.text
    assert lease.json().get("would_allow") is False, lease.json()
    assert outbox(sql, broke, "org.halted.shadow") and not outbox(sql, broke, "org.halted")

    # A card on file and auto-recharge under its threshold: a shadow org asks for no charge, an
    # enforced one with the same line does.
    card = {"balance_micros": 100_000, "billing_mode": "prepaid", "card_on_file": True,
            "auto_recharge": {"enabled": True, "threshold_micros": 1_000_000, "amount_micros": 5_000_000}}
    shadow_card, enforced_card = f"{prefix}_card_s", f"{prefix}_card_e"
    import_one(admin, {"org_id": shadow_card, "email": f"{shadow_card}@example.com", **card,
                       "enforcement": "shadow"})
    import_one(admin, {"org_id": enforced_card, "email": f"{enforced_card}@example.com", **card,
                       "enforcement": "enforce"})
    asked = admin.get(f"/v1/orgs/{enforced_card}").json()["auto_recharge"]
    assert asked["pending"] is not None or asked["last_charge_at"] is not None, asked
    quiet = admin.get(f"/v1/orgs/{shadow_card}").json()
    assert quiet["enforcement"] == "shadow"
    assert (quiet["auto_recharge"]["pending"], quiet["auto_recharge"]["last_charge_at"],
            quiet["auto_recharge"]["charges_today"]) == (None, None, 0), quiet["auto_recharge"]
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'auto_recharge'", shadow_card) == 0
    # Cut over now, it asks for its charge as the enforced one did; an undo is then refused by
    # the org (a charge since the cutover), and the meter's row is put back as it was.
    hour = hour_of(clock_us(admin))
    cut = admin.put(f"/v1/orgs/{shadow_card}/enforcement", json={"mode": "enforce", "at": hour}).json()
    assert cut["enforcement"] == "enforce" and (
        cut["auto_recharge"]["pending"] is not None or cut["auto_recharge"]["last_charge_at"] is not None), cut
    refused = admin.put(f"/v1/orgs/{shadow_card}/enforcement", json={"mode": "shadow", "undo": True})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "cutover_charged", refused.text
    assert enforcement_row(sql, shadow_card) == (False, datetime.fromisoformat(hour.replace("Z", "+00:00")))
    assert admin.get(f"/v1/orgs/{shadow_card}").json()["enforcement"] == "enforce"

    # The cutover at this hour (past): enforced now, denied as an enforced org is.
    this_hour = hour_of(clock_us(admin))
    cut = admin.put(f"/v1/orgs/{broke}/enforcement", json={"mode": "enforce", "at": this_hour})
    assert cut.status_code == 200, cut.text
    assert (cut.json()["enforcement"], cut.json()["cutover_at"], cut.json()["is_halted"]) == (
        "enforce", this_hour, True)
    assert enforcement_row(sql, broke) == (False, datetime.fromisoformat(this_hour.replace("Z", "+00:00")))
    denied = compute.post("/v1/gate", json={"org_id": broke, "action": "create"})
    assert denied.json()["allowed"] is False and denied.json()["reason"] != "ok", denied.text
    assert "would_allow" not in denied.json()
    assert compute.post("/v1/leases", json={"org_id": broke, "lease_id": "shadow_2", "ttl_s": 600}).status_code == 402


def test_a_cutover_of_an_org_halted_in_shadow_tells_the_compute_plane(admin, sql):
    org = f"shd{uuid.uuid4().hex[:6]}_halted"
    import_one(admin, {"org_id": org, "email": f"{org}@example.com", "balance_micros": 0,
                       "billing_mode": "prepaid", "enforcement": "shadow"})
    assert outbox(sql, org, "org.halted.shadow")
    this_hour = hour_of(clock_us(admin))
    assert admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "enforce", "at": this_hour}).status_code == 200
    assert outbox(sql, org, "org.halted")


@pytest.mark.time_travel
def test_a_postpaid_cutover_sends_only_the_hours_from_it_once_and_an_undo_is_refused_once_sent(
        service, admin, compute, sql):
    from actors.jobs import SchedulerActor
    from actors.placement import NAMESPACE

    api = service.settings.stripe_api_base
    org = f"cut{uuid.uuid4().hex[:8]}"
    customer = stripe_client(service).v1.customers.create(params={"email": f"{org}@example.com"}).id
    import_one(admin, {"org_id": org, "email": f"{org}@example.com", "balance_micros": 0,
                       "billing_mode": "postpaid", "enforcement": "shadow", "stripe_customer_id": customer})
    assert sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org) == customer
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "m", "ttl_s": 86_400}).status_code == 201
    into_hour = clock_us(admin) % HOUR_US
    if not 5 * 60 * US <= into_hour <= 50 * 60 * US:  # usage lands in the hour it arrives: away from the edges
        advance(admin, (HOUR_US - into_hour) // US + 10 * 60)
    ticks = iter(range(1_000))

    def usage() -> int:
        """One tick now; the hour it is billed in."""
        now = clock_us(admin)
        tick = {"tick_id": f"t{next(ticks)}", "org_id": org, "lease_id": "m", "started_at": us_to_rfc3339(now),
                "duration_ms": 60_000, "memory_mb": 4096, "cpu_count": 2, "disk_mb": 0}
        answer = compute.post("/v1/usage", json={"ticks": [tick]}).json()
        assert answer["accepted"] == 1, answer
        return now // HOUR_US * HOUR_US

    def events() -> dict[int, list[tuple[str, str, int]]]:
        found: dict[int, list] = {}
        for r in sql.fetch("SELECT identifier, hour, status, value FROM meter_events WHERE org_id = $1"
                           " ORDER BY created_at, identifier", org):
            found.setdefault(int(r["hour"].timestamp()) * US, []).append((r["identifier"], r["status"], r["value"]))
        return found

    def statuses() -> dict[int, list[str]]:
        return {h: [s for _, s, _ in rows] for h, rows in events().items()}

    def sent_to_stripe() -> list[dict]:
        return [e for e in httpx.get(f"{api}/_fake/meter_events", timeout=10).json()
                if e["payload"]["stripe_customer_id"] == customer and e["status"] == 200]

    settings = service.settings.model_copy(update={"jobs_enabled": False, "stripe_meter_shadow": False})
    sender = ray.remote(SchedulerActor).options(num_cpus=0.01, namespace=NAMESPACE).remote(
        settings.model_dump_json(), service.slot_map)
    # A scheduler that rolls up and releases but sends nothing (no Stripe key): events wait 'pending'.
    holder = ray.remote(SchedulerActor).options(num_cpus=0.01, namespace=NAMESPACE).remote(
        settings.model_copy(update={"stripe_secret_key": None}).model_dump_json(), service.slot_map)
    try:
        h0 = usage()
        advance(admin, 3_600)
        h1 = usage()
        # In shadow: its closed hour is kept 'shadow', nothing goes to Stripe.
        ray.get(sender.meter_rollup.remote())
        assert statuses() == {h0: ["shadow"]}
        assert sent_to_stripe() == []

        # Cut over (the CLI, no --at): at the next whole hour; shadow until then.
        result = cli(service, "cutover", org, "--json")
        assert result.returncode == 0, (result.stdout, result.stderr)
        cutover = h1 + HOUR_US
        answer = json.loads(result.stdout)
        assert answer["results"] == [{"org_id": org, "ok": True, "enforcement": "shadow",
                                      "cutover_at": us_to_rfc3339(cutover)}]
        assert answer["summary"] == {"orgs": 1, "done": 1, "failed": 0, "cutover_at": us_to_rfc3339(cutover)}
        advance(admin, 3_600)
        h2 = usage()
        assert h2 == cutover
        assert admin.get(f"/v1/orgs/{org}").json()["enforcement"] == "enforce"
        advance(admin, 2 * 3_600)
        wait_for("the usage in the ledger", lambda: sql.val(
            "SELECT count(DISTINCT date_trunc('hour', usage_minute)) FROM ledger WHERE org_id = $1"
            " AND invoiced_micros > 0", org) == 3)
        ray.get(holder.meter_rollup.remote())
        assert statuses() == {h0: ["consumed"], h1: ["consumed"], h2: ["pending"]}

        # Undo before anything was sent: shadow again, the pending event back to 'shadow'.
        undo = cli(service, "cutover", org, "--undo")
        assert undo.returncode == 0, (undo.stdout, undo.stderr)
        assert "1 of 1 org(s) back in shadow; 0 failed" in undo.stdout
        state = admin.get(f"/v1/orgs/{org}").json()
        assert (state["enforcement"], state["cutover_at"]) == ("shadow", None)
        assert enforcement_row(sql, org) == (True, None)
        assert statuses()[h2] == ["shadow"]
        ray.get(sender.meter_rollup.remote())
        assert sent_to_stripe() == []
        assert "shadow (no cutover set)" in cli(service, "orgs", "show", org).stdout

        # Cut over again at T (past now): the hour from T is sent, once; nothing before T ever.
        again = admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "enforce", "at": us_to_rfc3339(cutover)})
        assert again.status_code == 200 and again.json()["enforcement"] == "enforce", again.text
        ray.get(sender.meter_rollup.remote())
        ray.get(sender.meter_rollup.remote())
        assert statuses() == {h0: ["consumed"], h1: ["consumed"], h2: ["sent"]}
        seen = sent_to_stripe()
        assert [(e["identifier"], int(e["timestamp"])) for e in seen] == [(events()[h2][0][0], h2 // US)], seen
        assert "enforce (cut over at" in cli(service, "orgs", "show", org).stdout

        # An undo now is refused: the hour from T is at Stripe. Nothing changes.
        refused = admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "shadow", "undo": True})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "cutover_charged", refused.text
        state = admin.get(f"/v1/orgs/{org}").json()
        assert (state["enforcement"], state["cutover_at"]) == ("enforce", us_to_rfc3339(cutover))
        assert enforcement_row(sql, org)[0] is False
        by_cli = cli(service, "cutover", org, "--undo")
        assert by_cli.returncode == 1 and "cutover_charged" in by_cli.stderr, (by_cli.stdout, by_cli.stderr)

        # Usage after: its hour is sent too, once.
        h4 = usage()
        advance(admin, 2 * 3_600)
        wait_for("the later usage in the ledger", lambda: sql.val(
            "SELECT count(DISTINCT date_trunc('hour', usage_minute)) FROM ledger WHERE org_id = $1"
            " AND invoiced_micros > 0", org) == 4)
        ray.get(sender.meter_rollup.remote())
        ray.get(sender.meter_rollup.remote())
        assert statuses() == {h0: ["consumed"], h1: ["consumed"], h2: ["sent"], h4: ["sent"]}
        seen = sent_to_stripe()
        assert sorted((e["identifier"], int(e["timestamp"])) for e in seen) == sorted(
            [(events()[h2][0][0], h2 // US), (events()[h4][0][0], h4 // US)]), seen
    finally:
        ray.kill(sender)
        ray.kill(holder)


def test_the_bulk_cutover_reads_a_file_reports_each_org_and_a_summary(service, admin, new_org, tmp_path):
    shadow_orgs = [new_org(), new_org()]
    for org in shadow_orgs:
        assert admin.put(f"/v1/orgs/{org}/enforcement", json={"mode": "shadow"}).status_code == 200
    listed = tmp_path / "wave1.txt"
    listed.write_text(f"# wave 1\n{shadow_orgs[0]}\n\n{shadow_orgs[1]}\norg_nobody_{uuid.uuid4().hex[:6]}\n")
    at = us_to_rfc3339((clock_us(admin) // HOUR_US + 1) * HOUR_US)
    result = cli(service, "cutover", "--file", str(listed), "--at", at)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "2 of 3 org(s) cut over at" in result.stdout and "1 failed" in result.stdout, result.stdout
    assert "unknown_org" in result.stderr or "not_found" in result.stderr, result.stderr
    for org in shadow_orgs:
        assert f"{org}: shadow until" in result.stdout
        state = admin.get(f"/v1/orgs/{org}").json()
        assert (state["enforcement"], state["cutover_at"]) == ("shadow", at)
    odd = cli(service, "cutover", shadow_orgs[0], "--at", at.replace(":00:00Z", ":30:00Z"))
    assert odd.returncode == 2 and "whole UTC hour" in odd.stderr, odd.stderr
    assert cli(service, "cutover").returncode == 2
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text("ok_org\nnot an id\n")
    bad = cli(service, "cutover", "--file", str(bad_file))
    assert bad.returncode == 2 and ":2:" in bad.stderr, bad.stderr
