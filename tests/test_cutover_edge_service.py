"""The shadow/cutover edge through the real service (billing-rules 2.12): the meter's row after
a create or an import (a stale shadow row goes; an import's chunk is written in one go), the
billing portal of a shadow org, and the capability token of a shadow org's lease. The pure
checks of the same fixes are in tests/test_cutover_edge.py."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from metergate_client.captoken import unb64
from serve_app.captokens import GATE_TOKEN_TTL_S
from tests.helpers import clock_us

HOUR_US = 3_600 * 1_000_000


def row(sql, org_id: str):
    found = sql.fetch("SELECT shadow, cutover FROM org_enforcement WHERE org_id = $1", org_id)
    return (found[0]["shadow"], found[0]["cutover"]) if found else None


def stale_shadow_row(sql, org_id: str) -> None:
    """What a create or import in shadow that crashed (or was refused) after its row left."""
    sql._run("execute", "INSERT INTO org_enforcement (org_id, shadow) VALUES ($1, true) ON CONFLICT (org_id)"
             " DO UPDATE SET shadow = true, cutover = NULL", org_id)


def test_a_create_or_import_of_an_org_enforced_drops_a_stale_shadow_row_and_an_import_writes_each_orgs_row(
        admin, sql):
    created, imported, shadow = (f"org_{uuid.uuid4().hex[:12]}" for _ in range(3))
    stale_shadow_row(sql, created)
    answer = admin.post("/v1/orgs", json={"org_id": created, "email": f"{created}@example.com"})
    assert answer.status_code == 201 and answer.json()["enforcement"] == "enforce", answer.text
    assert row(sql, created) is None

    stale_shadow_row(sql, imported)
    lines = [{"org_id": imported, "email": "i@example.com", "balance_micros": 0, "enforcement": "enforce"},
             {"org_id": shadow, "email": "s@example.com", "balance_micros": 0, "enforcement": "shadow"}]
    answer = admin.post("/v1/import", json={"orgs": lines})
    assert [o["status"] for o in answer.json()["orgs"]] == ["created", "created"], answer.text
    assert row(sql, imported) is None and row(sql, shadow) == (True, None)

    # Cut over at this hour (past), a stale shadow row, the same import again: the cutover's row.
    t = clock_us(admin) // HOUR_US * HOUR_US
    cut = admin.put(f"/v1/orgs/{shadow}/enforcement",
                    json={"mode": "enforce", "at": datetime.fromtimestamp(t / 1e6, UTC).isoformat().replace("+00:00", "Z")})
    assert cut.status_code == 200 and cut.json()["enforcement"] == "enforce", cut.text
    stale_shadow_row(sql, shadow)
    again = admin.post("/v1/import", json={"orgs": lines})
    assert [o["status"] for o in again.json()["orgs"]] == ["unchanged", "unchanged"], again.text
    assert row(sql, shadow) == (False, datetime.fromtimestamp(t / 1e6, UTC))
    assert row(sql, imported) is None


def test_a_shadow_orgs_portal_is_refused_and_its_lease_token_is_short(admin, compute):
    org = f"org_{uuid.uuid4().hex[:12]}"
    made = admin.post("/v1/import", json={"orgs": [{"org_id": org, "email": "p@example.com", "balance_micros": 5_000_000,
                                                    "enforcement": "shadow"}]})
    assert made.json()["orgs"][0]["status"] == "created", made.text
    refused = admin.post(f"/v1/orgs/{org}/portal", json={})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "org_in_shadow", refused.text
    lease = compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_short", "ttl_s": 3_600,
                                             "resources": {"memory_mb": 1024, "cpu_count": 1}})
    assert lease.status_code == 201, lease.text
    claims = json.loads(unb64(lease.json()["capability_token"].split(".")[1]))
    assert claims["exp"] - claims["iat"] <= GATE_TOKEN_TTL_S, claims
    renewed = compute.post(f"/v1/leases/{org}/sbx_short/renew")
    assert renewed.status_code == 200, renewed.text
    claims = json.loads(unb64(renewed.json()["capability_token"].split(".")[1]))
    assert claims["exp"] - claims["iat"] <= GATE_TOKEN_TTL_S, claims
