"""The gate vectors (clients/vectors/gate_decisions.json) hold decide() and the written
protocol (docs/gate-protocol.md) to each other.

Four checks: decide() answers every vector exactly; a re-statement of the protocol's rules,
written below from the page and not from decide(), answers every vector too; the generator
run now writes the checked-in file byte for byte; every reason is in the vectors. A rule
changed in decide() alone fails the first and third; a page that no longer says what
decide() does fails the second once the re-statement follows the page.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import msgspec
import pytest

from clients.vectors import generate
from metergate_client.client import GateClient
from metergate_client.decision import BadResources, GateView, Reason, Resources, decide
from metergate_client.projection import UNREADABLE, mono_us, read_feed_line, read_page
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
    if v["shadow"]:  # section 4, step 0: allowed, the rules' answer in would_allow/would_reason only
        return {"allowed": True, "reason": "ok", "status": 200, "balance_micros": v["balance_micros"],
                "active_leases": v["active_leases"], "max_concurrent": v["max_concurrent"],
                "would_allow": reason == "ok", "would_reason": reason}
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


def test_a_shadow_view_is_always_allowed_and_says_every_reason_it_would_give():
    """Billing-rules 2.12: every shadow case is allowed (ok, 200) with would_allow/would_reason;
    every reason is reached as a would_reason, each action is asked in shadow, and no enforced
    case carries the two fields."""
    shadow = [case for case in CASES if case["view"]["shadow"]]
    assert len(shadow) >= 60
    for case in CASES:
        decision = case["decision"]
        if case["view"]["shadow"]:
            assert (decision["allowed"], decision["reason"], decision["status"]) == (True, "ok", 200), case["name"]
            assert decision["would_allow"] is (decision["would_reason"] == "ok"), case["name"]
        else:
            assert "would_allow" not in decision and "would_reason" not in decision, case["name"]
    assert {reason.value for reason in Reason} == {case["decision"]["would_reason"] for case in shadow}
    assert {case["action"] for case in shadow} == {"create", "wake", "ingest", "purchase"}


# ----- reading views and resources (docs/gate-protocol.md 2, 3.2 and 8.1) -----------------------

VIEW_READINGS = VECTORS["view_readings"]
RESOURCE_READINGS = VECTORS["resource_readings"]
SPEC_INTEGERS = ("balance_micros", "quota_remaining_micros", "included_micros", "active_leases",
                 "max_concurrent", "max_disk_mb")
SPEC_BOOLEANS = ("suspended", "degraded", "overdraws", "needs_card")


def spec_read_view(view: object) -> dict | None:
    """Section 2, re-stated: the view a reader takes from a record, or None (unreadable)."""
    def integer(value: object) -> bool:
        return type(value) is int

    def counts(value: object) -> bool:
        return value is None or isinstance(value, dict) and all(
            isinstance(types, dict) and all(integer(n) for n in types.values()) for types in value.values())

    if not isinstance(view, dict) or not all(integer(view.get(name)) for name in SPEC_INTEGERS):
        return None
    if not all(type(view.get(name)) is bool for name in SPEC_BOOLEANS):
        return None
    if "halted" not in view or view["halted"] not in (None, "balance", "admin"):
        return None
    shadow = view.get("shadow", False)  # absent: false (a view of an older server)
    if type(shadow) is not bool:
        return None
    quotas, in_use = view.get("machine_quotas"), view.get("machine_in_use")
    if not counts(quotas) or not counts(in_use):
        return None
    return {**{name: view[name] for name in (*SPEC_INTEGERS, *SPEC_BOOLEANS, "halted")},
            "machine_quotas": quotas, "machine_in_use": in_use, "shadow": shadow}


def spec_read_resources(body: dict) -> dict | None:
    """Section 3.2, re-stated: a body's resources with defaults, or None (refused)."""
    def integer(value: object, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    def name(value: object) -> bool:
        return value is None or isinstance(value, str) and 1 <= len(value) <= 64 and not any(
            ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value)

    if set(body) - set(SPEC_RESOURCE_DEFAULTS):
        return None
    r = {**SPEC_RESOURCE_DEFAULTS, **body}
    ok = (integer(r["memory_mb"], 0, 1 << 40) and integer(r["cpu_count"], 0, 1024) and integer(r["disk_mb"], 0, 1 << 40)
          and integer(r["quantity"], 1, 10_000) and name(r["machine_type"]) and name(r["region"]))
    return r if ok else None


def _record_line(view: object, seq: int = 1, org: str = "org_1") -> bytes:
    return json.dumps({"type": "view", "org_id": org, "shard": 0, "epoch": 1, "seq": seq,
                       "valid_until_us": None, "view": view}).encode()


@pytest.mark.parametrize("reading", VIEW_READINGS, ids=[r["name"] for r in VIEW_READINGS])
def test_a_feed_line_and_a_snapshot_page_read_each_view_as_the_protocol_says(reading):
    assert spec_read_view(reading["view"]) == reading["read"]
    from_line = read_feed_line(_record_line(reading["view"]))
    page = read_page(b'{"cursor": "1:1", "views": [' + _record_line(reading["view"]) + b", "
                     + _record_line(VIEW_READINGS[0]["view"], org="org_2") + b"]}")
    for record in (from_line, page.views[0]):
        assert record.org_id == "org_1" and (record.epoch, record.seq) == (1, 1)
        if reading["read"] is None:
            assert record.valid_until_us == UNREADABLE
        else:
            assert record.valid_until_us is None and msgspec.to_builtins(record.view) == reading["read"]
    assert page.views[1].org_id == "org_2" and page.views[1].valid_until_us is None  # the others are read


@pytest.mark.parametrize("reading", RESOURCE_READINGS, ids=[r["name"] for r in RESOURCE_READINGS])
def test_resources_are_read_or_refused_as_the_protocol_and_the_server_say(reading):
    assert spec_read_resources(reading["resources"]) == reading["read"]
    try:
        server = msgspec.to_builtins(msgspec.json.decode(json.dumps(reading["resources"]), type=ResourcesIn).to_core())
    except (msgspec.ValidationError, msgspec.DecodeError):  # 422, or 400 for text no UTF-8 body holds
        server = None
    assert server == reading["read"]


def test_the_readings_reach_both_outcomes_and_every_field():
    assert {r["read"] is None for r in VIEW_READINGS} == {True, False}
    assert {r["read"] is None for r in RESOURCE_READINGS} == {True, False}
    named = " ".join(r["name"] for r in VIEW_READINGS)
    assert all(name in named for name in (*SPEC_INTEGERS, *SPEC_BOOLEANS, "halted", "machine_quotas", "machine_in_use",
                                          "shadow"))


def test_an_unreadable_record_is_never_decided_from_nor_the_one_before_it_and_a_later_one_is():
    """8.1: a record this reader cannot read (a newer server's halt cause) replaces the org's
    record as one that is never current: the client answers by policy, not from the older view;
    the next readable record is decided from again; other orgs are not touched."""
    client = GateClient("http://127.0.0.1:9", "t" * 20, max_staleness_s=3600, start=False, default_policy="closed")
    now = mono_us()
    client.projection.clock(0, now, now, now)
    client.projection.heard(0, now)
    healthy = VIEW_READINGS[0]["view"]
    for seq, org in ((1, "org_1"), (2, "org_2")):
        client.projection.apply(read_feed_line(_record_line(healthy, seq, org)))
    assert client.check("org_1", "create").source == "local"
    client.projection.apply(read_feed_line(_record_line({**healthy, "halted": "fraud"}, seq=3)))
    answer = client.check("org_1", "create")
    assert (answer.source, answer.allowed) == ("policy", False), answer
    assert client.check("org_2", "create").source == "local"
    client.projection.apply(read_feed_line(_record_line(healthy, seq=2)))  # older than the unreadable one: ignored
    assert client.check("org_1", "create").source == "policy"
    client.projection.apply(read_feed_line(_record_line(healthy, seq=4)))
    assert client.check("org_1", "create").source == "local"
    client.close()


def test_a_line_whose_record_itself_is_broken_still_breaks_the_stream():
    for line in (b'{"type": "view", "org_id": 5, "shard": 0, "epoch": 1, "seq": 1, "view": {}}',
                 b'{"type": "view", "shard": 0}', b'{"type": "heartbeat", "cursor": 1}', b'{"type": "other"}', b"{"):
        with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
            read_feed_line(line)


def test_the_client_refuses_resources_no_request_could_carry():
    """As a mapping or as a Resources instance: BadResources (a TypeError and a ValueError)."""
    client = GateClient("http://127.0.0.1:9", "t" * 20, max_staleness_s=3600, start=False)
    now = mono_us()
    client.projection.clock(0, now, now, now)
    client.projection.heard(0, now)
    client.projection.apply(read_feed_line(_record_line(VIEW_READINGS[0]["view"])))
    for reading in RESOURCE_READINGS:
        if reading["read"] is None:
            with pytest.raises(BadResources):
                client.check("org_1", "create", reading["resources"])
        else:
            assert client.check("org_1", "create", reading["resources"]).source == "local"
    for bad in (Resources(quantity=0), Resources(disk_mb=-1), Resources(region=""), Resources(machine_type="a\n")):
        with pytest.raises(BadResources):
            client.check("org_1", "create", bad)
        with pytest.raises(ValueError):
            asyncio.run(client.acheck("org_1", "wake", bad))
    assert client.check("org_1", "create", Resources(quantity=2, region="us")).source == "local"
    # Text no UTF-8 body can carry (a lone surrogate: not in the vectors, which many JSON readers
    # refuse to parse) is refused too, as the server refuses such a body.
    for bad in ({"region": "us\ud800"}, Resources(machine_type="\udfff")):
        with pytest.raises(BadResources):
            client.check("org_1", "create", bad)
    assert client.check("org_1", "create", {"region": "\U0001F600" * 64}).source == "local"  # a pair is one character
    # An instance equal to one checked and decided before, but with True or 1.0 where the server
    # wants an integer (True == 1 == 1.0 in Python), is checked on its own, and refused.
    assert client.check("org_1", "create", Resources(quantity=1, memory_mb=512)).source == "local"
    for bad in (Resources(quantity=True, memory_mb=512), Resources(quantity=1, memory_mb=512.0)):
        with pytest.raises(BadResources):
            client.check("org_1", "create", bad)
    client.close()


def test_no_policy_answers_resources_that_no_request_could_carry():
    """Without a current view the policy answers; never for resources the server would refuse."""
    client = GateClient("http://127.0.0.1:9", "t" * 20, start=False, default_policy="open")
    assert client.check("org_unknown", "create", Resources(quantity=1)).source == "policy"
    with pytest.raises(BadResources):
        client.check("org_unknown", "create", Resources(quantity=0))
    with pytest.raises(BadResources):
        asyncio.run(client.acheck("org_unknown", "create", Resources(disk_mb=-1)))
    client.close()


def test_a_lease_answers_view_that_does_not_read_stands_in_the_orgs_order():
    """8.1 on a lease answer's gate_view: unreadable, it replaces the org's older record as one
    that is never current (the lease's own answer is returned); an envelope that does not read
    is not applied."""
    client = GateClient("http://127.0.0.1:9", "t" * 20, max_staleness_s=3600, start=False, default_policy="closed")
    now = mono_us()
    client.projection.clock(0, now, now, now)
    client.projection.heard(0, now)
    client.projection.apply(read_feed_line(_record_line(VIEW_READINGS[0]["view"])))
    assert client.check("org_1", "create").source == "local"
    newer = json.loads(_record_line({**VIEW_READINGS[0]["view"], "halted": "fraud"}, seq=2))
    body = client._leased(httpx.Response(201, json={"lease_id": "l1", "gate_view": newer}))
    assert body["lease_id"] == "l1" and client.check("org_1", "create").source == "policy"
    broken = {**newer, "seq": "x", "view": VIEW_READINGS[0]["view"]}
    assert client._leased(httpx.Response(201, json={"lease_id": "l2", "gate_view": broken}))["lease_id"] == "l2"
    assert client.check("org_1", "create").source == "policy"
    with pytest.raises(msgspec.ValidationError):  # a line without its type is no record: the stream breaks
        read_feed_line(b'{"org_id": "o", "shard": 0, "epoch": 1, "seq": 1, "valid_until_us": null}')
    client.close()
