"""Faults while traffic flows: whatever breaks, every acknowledged change is in Postgres exactly
once, balance = credits - debits, callers are told 503 with Retry-After while the fault
lasts, and no decision after it is wrong.

The connection to Postgres is cut with tests/pgproxy.py, which the test service reaches
Postgres through: at the worst moment, after the COMMIT went out and before its answer came
back.
"""

from __future__ import annotations

import uuid

import pytest

from tests.helpers import assert_error, hour_tick, ledger_sum, wait_for


def _entries_noted(sql, org: str, note: str) -> list:
    return sql.fetch("SELECT kind, amount_micros FROM ledger WHERE org_id = $1 AND note = $2", org, note)


def _balance(admin, org: str) -> int:
    return admin.get(f"/v1/orgs/{org}").json()["balance_micros"]


def test_a_credit_whose_commit_answer_was_lost_is_found_committed_and_answered_once(service, admin, sql, new_org):
    """No Idempotency-Key: a 503 here would make the caller credit twice on retry."""
    org = new_org()
    before = _balance(admin, org)
    note = f"cut-after-{uuid.uuid4().hex[:8]}"
    cut = service.pg_proxy.cut(note, "after_commit")
    response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000, "note": note})
    assert _cut_done(service, cut)
    assert response.status_code == 201, response.text
    assert response.json()["amount_micros"] == 1_000_000
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 1_000_000)]
    assert _balance(admin, org) == before + 1_000_000 == ledger_sum(sql, org)


def test_a_credit_whose_commit_never_reached_postgres_is_503_and_its_retry_lands_once(service, admin, sql, new_org):
    org = new_org()
    before = _balance(admin, org)
    note = f"cut-before-{uuid.uuid4().hex[:8]}"
    key = {"Idempotency-Key": f"retry-{note}"}
    cut = service.pg_proxy.cut(note, "before_commit")
    body = {"kind": "grant", "amount_micros": 2_000_000, "note": note}
    refused = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert _cut_done(service, cut)
    assert_error(refused, 503, "shard_unavailable")
    assert refused.headers["Retry-After"] == "1"
    assert _entries_noted(sql, org, note) == []
    assert _balance(admin, org) == before == ledger_sum(sql, org)
    # Postgres said it rolled back, so the key was given back: the retry runs at once.
    retried = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert retried.status_code == 201, retried.text
    again = admin.post(f"/v1/orgs/{org}/credits", json=body, headers=key)
    assert again.json() == retried.json()
    assert [tuple(r) for r in _entries_noted(sql, org, note)] == [("grant", 2_000_000)]
    assert _balance(admin, org) == before + 2_000_000 == ledger_sum(sql, org)


@pytest.mark.parametrize("when", ["after_commit", "before_commit"])
def test_ticks_whose_commit_connection_is_cut_are_billed_exactly_once(service, admin, compute, sql, new_org, when):
    org = new_org()
    before = _balance(admin, org)
    lease = f"sbx-cut-{uuid.uuid4().hex[:8]}"  # a lease id appears in the usage rollup the commit writes
    ticks = {"ticks": [hour_tick(org, f"{lease}-{n}", lease) for n in range(3)]}
    cut = service.pg_proxy.cut(lease, when)
    first = compute.post("/v1/usage", json=ticks)
    assert _cut_done(service, cut)
    if when == "after_commit":
        assert first.status_code == 200, first.text
        assert first.json()["accepted"] == 3
    else:
        assert_error(first, 503, "shard_unavailable")
    resent = compute.post("/v1/usage", json=ticks)
    assert resent.status_code == 200, resent.text
    assert resent.json()["accepted"] + resent.json()["duplicates"] == 3
    assert resent.json()["duplicates"] == (3 if when == "after_commit" else 0)
    billed = sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = $1", org)
    assert billed == 3
    assert _balance(admin, org) == before - 3 * 165_600 == ledger_sum(sql, org)


def _cut_done(service, cut_id: int) -> bool:
    return wait_for(f"cut {cut_id}", lambda: next(c["done"] for c in service.pg_proxy.status()["cuts"]
                                                   if c["id"] == cut_id), timeout_s=30)
