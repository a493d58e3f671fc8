"""The gate vectors (clients/vectors/gate_decisions.json) hold decide() and the written
protocol (docs/gate-protocol.md) to each other.

Four checks: decide() answers every vector exactly; a re-statement of the protocol's rules,
written below from the page and not from decide(), answers every vector too; the generator
run now writes the checked-in file byte for byte; every reason is in the vectors. A rule
changed in decide() alone fails the first and third; a page that no longer says what
decide() does fails the second once the re-statement follows the page.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from clients.vectors import generate
from metergate_client.decision import GateView, Reason, decide
from serve_app.bodies import ResourcesIn
from serve_app.views import STATUS_BY_REASON

VECTORS = json.loads(generate.VECTORS_PATH.read_text(encoding="utf-8"))
CASES = VECTORS["cases"]
NAMES = [case["name"] for case in CASES]


# ----- the protocol, re-stated from docs/gate-protocol.md (sections 3.2, 4, 5, 6) ---------------

SPEC_RESOURCE_DEFAULTS = {"memory_mb": 0, "cpu_count": 0, "disk_mb": 0, "machine_type": None,
                          "region": None, "quantity": 1}
SPEC_STATUS = {"ok": 200, "suspended": 402, "degraded": 402, "halted": 402, "no_payment_method": 402,
               "quota_exceeded": 402, "insufficient_balance": 402, "resource_limit": 403,
               "concurrency_limit": 429}


def spec_decision(action: str, body_resources: dict, v: dict) -> dict:
    r = {**SPEC_RESOURCE_DEFAULTS, **body_resources}
    reason, extra = spec_reason(action, r, v)
    return {"allowed": reason == "ok", "reason": reason, "status": SPEC_STATUS[reason],
            "balance_micros": v["balance_micros"], "active_leases": v["active_leases"],
            "max_concurrent": v["max_concurrent"], **extra}


def spec_reason(a: str, r: dict, v: dict) -> tuple[str, dict]:
    if v["suspended"]:
        return "suspended", {}
    if a == "purchase":
        return ("degraded" if v["degraded"] else "ok"), {}
    assert a in ("create", "wake", "ingest"), a
    if v["halted"] == "admin":
        return "halted", {}
    if not v["balance_micros"] + v["quota_remaining_micros"] > 0:
        card = a == "create" and v["needs_card"]
        if v["halted"] == "balance":
            return ("no_payment_method" if card else "halted"), {}
        if not v["overdraws"]:
            if card:
                return "no_payment_method", {}
            return ("quota_exceeded" if v["included_micros"] > 0 else "insufficient_balance"), {}
    if a == "ingest":
        return "ok", {}
    if r["disk_mb"] > v["max_disk_mb"]:
        return "resource_limit", {"limit": v["max_disk_mb"], "requested": r["disk_mb"], "resource": "disk_mb"}
    quotas = v["machine_quotas"] or {}
    if r["region"] is not None and r["machine_type"] is not None \
            and r["machine_type"] in quotas.get(r["region"], {}):
        limit = quotas[r["region"]][r["machine_type"]]
        in_use = ((v["machine_in_use"] or {}).get(r["region"]) or {}).get(r["machine_type"], 0)
        if in_use + r["quantity"] > limit:
            return "resource_limit", {"limit": limit, "requested": in_use + r["quantity"], "in_use": in_use,
                                      "resource": f"machine_type:{r['region']}/{r['machine_type']}"}
    if v["active_leases"] + r["quantity"] > v["max_concurrent"]:
        return "concurrency_limit", {}
    return "ok", {}


# ----- the checks -----------------------------------------------------------------------------

def decided(case: dict) -> dict:
    """What the server answers for the case: the body's resources decoded as POST /v1/gate decodes
    them, the view as a feed reader decodes it, the status from the edge's table."""
    resources = msgspec.convert(case["resources"], ResourcesIn).to_core()
    view = msgspec.convert(case["view"], GateView)
    decision = msgspec.to_builtins(decide(case["action"], resources, view))
    return {**decision, "status": STATUS_BY_REASON[Reason(decision["reason"])]}


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_decide_answers_every_vector_exactly(case):
    assert decided(case) == case["decision"]


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_the_protocol_as_written_answers_every_vector_exactly(case):
    assert spec_decision(case["action"], case["resources"], case["view"]) == case["decision"]


def test_every_view_is_what_a_view_record_carries():
    """Every field of a published view, nothing else: a port can decode each with its strict
    view type."""
    fields = set(GateView.__struct_fields__)
    for case in CASES:
        assert set(case["view"]) == fields, case["name"]
        assert msgspec.to_builtins(msgspec.convert(case["view"], GateView)) == case["view"], case["name"]


def test_the_written_defaults_and_statuses_are_the_servers():
    assert msgspec.to_builtins(msgspec.convert({}, ResourcesIn).to_core()) == SPEC_RESOURCE_DEFAULTS
    assert {reason.value: status for reason, status in STATUS_BY_REASON.items()} == SPEC_STATUS


def test_the_generator_writes_the_checked_in_file_byte_for_byte():
    checked_in = generate.VECTORS_PATH.read_bytes()
    assert generate.render().encode("utf-8") == checked_in, (
        "clients/vectors/gate_decisions.json is not what decide() answers now: if the rule change "
        "is meant, update docs/gate-protocol.md and run `python -m clients.vectors.generate`")


def test_every_reason_is_reached_several_ways_and_names_are_unique():
    by_reason = Counter(case["decision"]["reason"] for case in CASES)
    assert {reason.value for reason in Reason} == set(by_reason)
    assert min(by_reason.values()) >= 3, by_reason
    assert len(NAMES) == len(set(NAMES))


def test_every_action_is_in_the_vectors_and_allowed_means_ok():
    assert {case["action"] for case in CASES} == {"create", "wake", "ingest", "purchase"}
    for case in CASES:
        assert case["decision"]["allowed"] is (case["decision"]["reason"] == "ok"), case["name"]
