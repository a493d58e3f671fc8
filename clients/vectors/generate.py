"""Writes clients/vectors/gate_decisions.json: gate decisions that every gateway port must give.

    python -m clients.vectors.generate        (or: python clients/vectors/generate.py)

Each case is a view, an action and the resources of a POST /v1/gate body; its expected
decision is what `decide()` answers, with the HTTP status of its reason. The cases are built
on purpose first (every reason several ways, every boundary of docs/gate-protocol.md section 4
from both sides), then drawn from a seeded random sample of the view space. The output is a
pure function of this file and `decide()`: tests/test_gate_vectors.py regenerates it and
requires the checked-in file to be the same bytes, so a rule cannot change without the
vectors changing with it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import msgspec

from metergate_client.decision import BadResources, GateView, Resources, decide, resources_from
from metergate_client.projection import UNREADABLE, read_feed_line
from serve_app.views import STATUS_BY_REASON

VECTORS_PATH = Path(__file__).resolve().parent / "gate_decisions.json"
SEED = 18  # issue 18: changing it rewrites every random case
RANDOM_CASES = 300
SHADOW_SEED = 22  # issue 22: the random sample of shadow views
RANDOM_SHADOW_CASES = 60

REGION = "us-central1"
OTHER_REGION = "europe-west4"
GPU = "a3-highgpu-8g"
CPU_TYPE = "n2-standard-4"

# A healthy prepaid org on a plan without quota: every case says only how it differs.
HEALTHY = {
    "balance_micros": 5_000_000, "quota_remaining_micros": 0, "included_micros": 0,
    "active_leases": 1, "max_concurrent": 5, "max_disk_mb": 20_480, "halted": None,
    "suspended": False, "degraded": False, "overdraws": False, "needs_card": False,
    "machine_quotas": None, "machine_in_use": None, "shadow": False,
}
BROKE = {"balance_micros": 0, "quota_remaining_micros": 0}
ON_QUOTA_PLAN = {"included_micros": 10_000_000}
GPU_QUOTA = {"machine_quotas": {REGION: {GPU: 2, CPU_TYPE: 0}, OTHER_REGION: {GPU: 4}},
             "machine_in_use": {REGION: {GPU: 1}, OTHER_REGION: {GPU: 3}}}
GPU_REQUEST = {"region": REGION, "machine_type": GPU}
CHECKED = ("create", "wake", "ingest")
HOLDING = ("create", "wake")  # the actions that check resources and concurrency


def case(name: str, action: str, resources: dict | None = None, **view_changes) -> dict:
    """One vector: the view as a view record carries it (every field, through GateView), the
    body's resources as given (absent fields are the body's defaults), the expected decision."""
    unknown = set(view_changes) - set(HEALTHY)
    assert not unknown, unknown
    # Decoded as a reader decodes a record (GateView(**...) would keep "admin" a str, not a HaltCause).
    view = msgspec.convert({**HEALTHY, **view_changes}, GateView)
    resources = dict(resources or {})
    decision = msgspec.to_builtins(decide(action, msgspec.convert(resources, Resources), view))
    decision["status"] = STATUS_BY_REASON[decision["reason"]]
    return {"name": name, "view": msgspec.to_builtins(view), "action": action,
            "resources": resources, "decision": decision}


def each(actions: tuple[str, ...], name: str, resources: dict | None = None, **view_changes) -> list[dict]:
    return [case(f"{name} ({action})", action, resources, **view_changes) for action in actions]


def suspended_cases() -> list[dict]:
    return [
        *each(CHECKED + ("purchase",), "suspended denies every action", suspended=True),
        case("suspended comes before degraded", "purchase", suspended=True, degraded=True),
        case("suspended comes before an admin halt", "create", suspended=True, halted="admin"),
        case("suspended comes before money", "create", suspended=True, needs_card=True, **BROKE),
        case("suspended comes before the disk limit", "wake", {"disk_mb": 40_960}, suspended=True),
        case("suspended even when postpaid with overage", "ingest", suspended=True, overdraws=True),
    ]


def purchase_cases() -> list[dict]:
    over_everything = {"disk_mb": 1 << 40, "quantity": 10_000, **GPU_REQUEST}
    return [
        case("purchase by a healthy org is ok", "purchase"),
        case("purchase while degraded is refused", "purchase", degraded=True),
        case("purchase while degraded and halted by an admin says degraded", "purchase", degraded=True,
             halted="admin"),
        case("purchase while degraded with no money is refused", "purchase", degraded=True, needs_card=True,
             **BROKE),
        case("purchase while halted by an admin is ok", "purchase", halted="admin"),
        case("purchase while halted for balance and broke is ok", "purchase", halted="balance", **BROKE),
        case("purchase with no money and no card is ok", "purchase", needs_card=True, **BROKE),
        case("purchase checks no resources", "purchase", over_everything, active_leases=5, **GPU_QUOTA),
        *each(CHECKED, "degraded does not deny other actions", degraded=True),
    ]


def halt_cases() -> list[dict]:
    return [
        *each(CHECKED, "admin halt denies though funded", halted="admin"),
        *each(CHECKED, "admin halt says halted, not no_payment_method", halted="admin", needs_card=True,
              **BROKE),
        case("admin halt denies a postpaid org with overage", "create", halted="admin", overdraws=True),
        *each(CHECKED, "balance halt with no money denies", halted="balance", **BROKE),
        *each(CHECKED, "balance halt with no money and no card", halted="balance", needs_card=True, **BROKE),
        case("balance halt with no money, no card, on a quota plan", "create", halted="balance",
             needs_card=True, **BROKE, **ON_QUOTA_PLAN),
        case("balance halt says halted, not quota_exceeded", "wake", halted="balance", **BROKE,
             **ON_QUOTA_PLAN),
        case("balance halt comes before overdraws", "create", halted="balance", overdraws=True,
             balance_micros=-3_000_000),
        *each(CHECKED, "balance halt is not enforced once 1 micro-USD is there", halted="balance",
              balance_micros=1),
        *each(CHECKED, "balance halt is not enforced once new quota is there", halted="balance",
              balance_micros=0, quota_remaining_micros=1, **ON_QUOTA_PLAN),
        case("balance halt is not enforced when debt is less than the quota left", "create",
             halted="balance", balance_micros=-999_999, quota_remaining_micros=1_000_000, **ON_QUOTA_PLAN),
        case("balance halt, funded, no card: the card is not asked for", "create", halted="balance",
             needs_card=True, balance_micros=1),
        case("balance halt, funded, still held to concurrency", "create", halted="balance",
             active_leases=5),
        case("balance halt, funded, still held to disk", "wake", {"disk_mb": 20_481}, halted="balance"),
    ]


def money_cases() -> list[dict]:
    quota = ON_QUOTA_PLAN
    return [
        *each(CHECKED, "balance 0 without quota is insufficient", **BROKE),
        *each(CHECKED, "balance 1 without quota is enough", balance_micros=1),
        *each(CHECKED, "debt without quota is insufficient", balance_micros=-5_000_000),
        *each(CHECKED, "balance 0 and quota used up on a quota plan is quota_exceeded", **BROKE, **quota),
        *each(CHECKED, "balance 0 and quota 1 left is enough", balance_micros=0, quota_remaining_micros=1,
              **quota),
        case("included 1 micro-USD is a quota plan", "create", **BROKE, included_micros=1),
        case("debt equal to the quota left sums to 0: not funded", "wake", balance_micros=-1,
             quota_remaining_micros=1, **quota),
        case("debt 1 under the quota left sums to 1: funded", "wake", balance_micros=-1,
             quota_remaining_micros=2, **quota),
        case("debt above the quota left on a quota plan is quota_exceeded", "ingest",
             balance_micros=-2_000_000, quota_remaining_micros=1_000_000, **quota),
        case("quota used up but balance left is enough", "create", balance_micros=1, **quota),
        case("money comes before the disk limit", "create", {"disk_mb": 40_960}, **BROKE),
        case("money comes before concurrency", "wake", active_leases=5, **BROKE, **quota),
        case("money comes before a machine quota", "create", {**GPU_REQUEST, "quantity": 2}, **BROKE,
             **GPU_QUOTA),
    ]


def card_cases() -> list[dict]:
    return [
        *each(CHECKED, "no money and no card", needs_card=True, **BROKE),
        *each(CHECKED, "no money and no card on a quota plan", needs_card=True, **BROKE, **ON_QUOTA_PLAN),
        case("no card, debt, create", "create", needs_card=True, balance_micros=-250_000),
        *each(CHECKED, "no card but money left is ok", needs_card=True, balance_micros=1),
        case("no card but quota left is ok", "create", needs_card=True, balance_micros=0,
             quota_remaining_micros=5, **ON_QUOTA_PLAN),
        case("no card, no money, postpaid with overage: not asked for a card", "create",
             needs_card=True, overdraws=True, **BROKE),
    ]


def overdraw_cases() -> list[dict]:
    debt = {"overdraws": True, "balance_micros": -1_000_000}
    return [
        *each(CHECKED, "postpaid with overage and debt is allowed", **debt),
        *each(CHECKED, "postpaid with overage at balance 0 on a quota plan", overdraws=True, **BROKE,
              **ON_QUOTA_PLAN),
        *each(HOLDING, "postpaid with overage and debt, concurrency full", active_leases=5, **debt),
        *each(HOLDING, "postpaid with overage and debt, disk too big", {"disk_mb": 20_481}, **debt),
        case("postpaid with overage and debt, machine quota full", "create", {**GPU_REQUEST, "quantity": 2},
             **debt, **GPU_QUOTA),
    ]


def disk_cases() -> list[dict]:
    return [
        *each(HOLDING, "disk == max_disk_mb is allowed", {"disk_mb": 20_480}),
        *each(HOLDING, "disk == max_disk_mb + 1 is a resource_limit", {"disk_mb": 20_481}),
        case("disk 0 with max_disk_mb 0 is allowed", "create", {"disk_mb": 0}, max_disk_mb=0),
        case("disk 1 with max_disk_mb 0 is a resource_limit", "create", {"disk_mb": 1}, max_disk_mb=0),
        case("no disk asked for (default 0) with max_disk_mb 0", "wake", {}, max_disk_mb=0),
        case("the largest disk a body may ask for", "create", {"disk_mb": 1 << 40}),
        case("disk comes before concurrency", "create", {"disk_mb": 20_481}, active_leases=5),
        case("disk comes before a machine quota", "create", {"disk_mb": 20_481, **GPU_REQUEST, "quantity": 2},
             **GPU_QUOTA),
        case("ingest checks no disk", "ingest", {"disk_mb": 20_481}),
    ]


def concurrency_cases() -> list[dict]:
    return [
        *each(HOLDING, "active + quantity == max_concurrent is allowed", {"quantity": 1}, active_leases=4),
        *each(HOLDING, "active + quantity == max_concurrent + 1 is a concurrency_limit", {"quantity": 1},
              active_leases=5),
        case("quantity 3 fills the last 3 slots", "create", {"quantity": 3}, active_leases=2),
        case("quantity 3 with 2 slots left", "create", {"quantity": 3}, active_leases=3),
        case("quantity defaults to 1: last slot", "create", {}, active_leases=4),
        case("quantity defaults to 1: no slot left", "wake", {}, active_leases=5),
        case("max_concurrent 0 refuses every create", "create", {}, active_leases=0, max_concurrent=0),
        case("active above max_concurrent (tier lowered)", "wake", {}, active_leases=7, max_concurrent=5),
        case("quantity 10000 with none active and max 10000", "create", {"quantity": 10_000},
             active_leases=0, max_concurrent=10_000),
        case("ingest checks no concurrency", "ingest", {"quantity": 3}, active_leases=5),
        case("memory and cpu are not limits", "create", {"memory_mb": 1 << 40, "cpu_count": 1024}),
    ]


def machine_cases() -> list[dict]:
    q = GPU_QUOTA
    return [
        *each(HOLDING, "in use + quantity == machine limit is allowed", {**GPU_REQUEST, "quantity": 1}, **q),
        *each(HOLDING, "in use + quantity == machine limit + 1 is a resource_limit",
              {**GPU_REQUEST, "quantity": 2}, **q),
        case("machine limit 0 refuses one machine", "create", {"region": REGION, "machine_type": CPU_TYPE}, **q),
        case("none in use in the region: limit reached exactly", "create",
             {"region": REGION, "machine_type": GPU, "quantity": 2}, machine_quotas=q["machine_quotas"],
             machine_in_use={}),
        case("none in use in the region: one over", "create",
             {"region": REGION, "machine_type": GPU, "quantity": 3}, machine_quotas=q["machine_quotas"],
             machine_in_use={}),
        case("type in use only in another region does not count", "create",
             {"region": REGION, "machine_type": GPU, "quantity": 2}, machine_quotas=q["machine_quotas"],
             machine_in_use={OTHER_REGION: {GPU: 4}}),
        case("another region's own limit: reached exactly", "wake",
             {"region": OTHER_REGION, "machine_type": GPU, "quantity": 1}, **q),
        case("another region's own limit: one over", "wake",
             {"region": OTHER_REGION, "machine_type": GPU, "quantity": 2}, **q),
        case("in use above the limit (quota lowered)", "create", {**GPU_REQUEST, "quantity": 1},
             machine_quotas={REGION: {GPU: 1}}, machine_in_use={REGION: {GPU: 3}}),
        case("no region in the request: no machine quota applies", "create",
             {"machine_type": GPU, "quantity": 4}, **q),
        case("no machine type in the request: no machine quota applies", "create",
             {"region": REGION, "quantity": 4}, **q),
        case("neither region nor machine type: no machine quota applies", "create", {"quantity": 4}, **q),
        case("region without quotas: no limit", "create",
             {"region": "asia-east1", "machine_type": GPU, "quantity": 4}, **q),
        case("machine type without a quota in its region: no limit", "create",
             {"region": OTHER_REGION, "machine_type": CPU_TYPE, "quantity": 4}, **q),
        case("null region and machine type given explicitly", "create",
             {"region": None, "machine_type": None, "quantity": 4}, **q),
        case("no machine quotas at all", "create", {**GPU_REQUEST, "quantity": 4}),
        case("empty machine quotas are no quotas", "create", {**GPU_REQUEST, "quantity": 4},
             machine_quotas={}, machine_in_use=None),
        case("region listed with no types: no limit", "create", {**GPU_REQUEST, "quantity": 4},
             machine_quotas={REGION: {}}, machine_in_use={}),
        case("machine quota comes before concurrency", "create", {**GPU_REQUEST, "quantity": 2},
             active_leases=5, **q),
        case("machine quota passes, then concurrency denies", "create", {**GPU_REQUEST, "quantity": 1},
             active_leases=5, **q),
        case("ingest checks no machine quota", "ingest", {**GPU_REQUEST, "quantity": 2}, **q),
        case("disk at max and machine quota at limit is allowed", "create",
             {"disk_mb": 20_480, **GPU_REQUEST, "quantity": 1}, **q),
    ]


def shadow_cases() -> list[dict]:
    """Billing-rules 2.12: a shadow view allows every check (reason ok, status 200) and says
    what the rules would decide in would_allow/would_reason; one or more per reason."""
    s = {"shadow": True}
    return [
        *each(CHECKED + ("purchase",), "shadow, healthy: would allow", **s),
        *each(CHECKED + ("purchase",), "shadow, suspended: allowed, would say suspended", suspended=True, **s),
        case("shadow, degraded purchase: allowed, would say degraded", "purchase", degraded=True, **s),
        *each(CHECKED, "shadow, admin halt: allowed, would say halted", halted="admin", **s),
        case("shadow, balance halt with no money: allowed, would say halted", "wake", halted="balance",
             **BROKE, **s),
        case("shadow, no money and no card: allowed, would say no_payment_method", "create", needs_card=True,
             **BROKE, **s),
        *each(CHECKED, "shadow, no money: allowed, would say insufficient_balance", **BROKE, **s),
        *each(CHECKED, "shadow, quota used up: allowed, would say quota_exceeded", **BROKE, **ON_QUOTA_PLAN, **s),
        case("shadow, debt: allowed, would say insufficient_balance", "create", balance_micros=-5_000_000, **s),
        *each(HOLDING, "shadow, disk too big: allowed, would say resource_limit (no limit fields)",
              {"disk_mb": 20_481}, **s),
        case("shadow, machine quota full: allowed, would say resource_limit (no limit fields)", "create",
             {**GPU_REQUEST, "quantity": 2}, **GPU_QUOTA, **s),
        *each(HOLDING, "shadow, concurrency full: allowed, would say concurrency_limit", active_leases=5, **s),
        case("shadow, far above concurrency: allowed, would say concurrency_limit", "create", {"quantity": 10_000},
             active_leases=50, max_concurrent=0, **s),
        case("shadow, postpaid with overage and debt: would allow", "ingest", overdraws=True,
             balance_micros=-1_000_000, **s),
        case("shadow, every limit broken at once: would say suspended", "create",
             {"disk_mb": 1 << 40, "quantity": 10_000, **GPU_REQUEST}, suspended=True, halted="admin",
             needs_card=True, active_leases=5, **BROKE, **GPU_QUOTA, **s),
    ]


def default_cases() -> list[dict]:
    return [
        *each(CHECKED + ("purchase",), "no resources at all (every default)", {}),
        case("every resource field given", "create",
             {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 20_480, "machine_type": GPU, "region": REGION,
              "quantity": 1}, **GPU_QUOTA),
    ]


def random_view(rng: random.Random) -> dict:
    """A view anywhere in the typed space the rules read, boundaries over-weighted."""
    included = rng.choice([0, 0, 1, 10_000_000])
    quota_remaining = rng.choice([0, 1, included, rng.randint(0, included)]) if included else 0
    balance = rng.choice([-2_000_000, -quota_remaining, -1, 0, 0, 1, 5_000_000, rng.randint(-10**7, 10**7)])
    max_concurrent = rng.choice([0, 1, 5, 5, 10])
    view = {
        "balance_micros": balance, "quota_remaining_micros": quota_remaining, "included_micros": included,
        "active_leases": rng.choice([0, max_concurrent - 1, max_concurrent, max_concurrent + 1, rng.randint(0, 12)]),
        "max_concurrent": max_concurrent, "max_disk_mb": rng.choice([0, 10_240, 20_480]),
        "halted": rng.choice([None, None, None, "balance", "admin"]),
        "suspended": rng.random() < 0.1, "degraded": rng.random() < 0.15,
        "overdraws": rng.random() < 0.25, "needs_card": rng.random() < 0.35, "shadow": False,
    }
    view["active_leases"] = max(0, view["active_leases"])
    if rng.random() < 0.5:
        quotas = {region: {kind: rng.randint(0, 3) for kind in (GPU, CPU_TYPE) if rng.random() < 0.7}
                  for region in (REGION, OTHER_REGION) if rng.random() < 0.8}
        in_use = {region: {kind: rng.randint(1, 4) for kind in (GPU, CPU_TYPE) if rng.random() < 0.5}
                  for region in (REGION, OTHER_REGION) if rng.random() < 0.6}
        view["machine_quotas"], view["machine_in_use"] = quotas, (in_use if quotas else None)
    else:
        view["machine_quotas"], view["machine_in_use"] = None, None
    return view


def random_resources(rng: random.Random, view: dict) -> dict:
    """A body's resources: each field present or left to its default."""
    resources = {}
    if rng.random() < 0.7:
        resources["disk_mb"] = rng.choice([0, view["max_disk_mb"], view["max_disk_mb"] + 1, rng.randint(0, 40_960)])
    if rng.random() < 0.7:
        resources["quantity"] = rng.choice([1, 1, 2, 3])
    if rng.random() < 0.6:
        resources["region"] = rng.choice([REGION, REGION, OTHER_REGION, "asia-east1"])
    if rng.random() < 0.6:
        resources["machine_type"] = rng.choice([GPU, GPU, CPU_TYPE, "t4"])
    if rng.random() < 0.2:
        resources["memory_mb"], resources["cpu_count"] = rng.choice([512, 4096]), rng.choice([1, 8])
    return resources


def random_cases(seed: int = SEED, count: int = RANDOM_CASES, shadow: bool = False) -> list[dict]:
    """The seeded sample; `shadow`: the same space with every view in shadow (its own seed, so
    the enforced sample's cases stay as they were)."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        view = {**random_view(rng), "shadow": shadow}
        action = rng.choice(("create", "create", "wake", "ingest", "purchase"))
        name = f"random shadow {index:03d}" if shadow else f"random {index:03d}"
        cases.append(case(name, action, random_resources(rng, view), **view))
    return cases


def view_readings() -> list[dict]:
    """Raw views a reader meets on the wire and what it reads from each: the whole view, or
    null for a view it must not decide from (docs/gate-protocol.md 8.1: the org's record is
    then unreadable, never current). Read by the Python client's own reader."""
    def without(*names: str) -> dict:
        return {k: v for k, v in HEALTHY.items() if k not in names}

    raw = [
        ("every field", dict(HEALTHY)),
        ("an unknown field is ignored", {**HEALTHY, "burn_micros_per_s": 12}),
        ("no machine_quotas or machine_in_use reads them as null", without("machine_quotas", "machine_in_use")),
        ("machine quotas as published", {**HEALTHY, **GPU_QUOTA}),
        ("an empty machine_quotas", {**HEALTHY, "machine_quotas": {}, "machine_in_use": None}),
        ("a debt", {**HEALTHY, "balance_micros": -5_000_000}),
        ("halted for balance", {**HEALTHY, "halted": "balance"}),
        ("in shadow", {**HEALTHY, "shadow": True}),
        ("no shadow reads it as false (a view of an older server)", without("shadow")),
        ("not an object: null", None), ("not an object: an array", [HEALTHY]), ("not an object: a string", "ok"),
        *[(f"no {name}", without(name)) for name in (
            "balance_micros", "quota_remaining_micros", "included_micros", "active_leases", "max_concurrent",
            "max_disk_mb", "halted", "suspended", "degraded", "overdraws", "needs_card")],
        ("balance_micros with a fraction", {**HEALTHY, "balance_micros": 1.5}),
        ("balance_micros as a string", {**HEALTHY, "balance_micros": "5000000"}),
        ("balance_micros as a boolean", {**HEALTHY, "balance_micros": True}),
        ("balance_micros null", {**HEALTHY, "balance_micros": None}),
        ("max_concurrent with a fraction", {**HEALTHY, "max_concurrent": 2.5}),
        ("suspended as a number", {**HEALTHY, "suspended": 0}),
        ("suspended as a string", {**HEALTHY, "suspended": "false"}),
        ("suspended null", {**HEALTHY, "suspended": None}),
        ("needs_card as a number", {**HEALTHY, "needs_card": 1}),
        ("shadow as a number", {**HEALTHY, "shadow": 1}),
        ("shadow as a string", {**HEALTHY, "shadow": "true"}),
        ("shadow null", {**HEALTHY, "shadow": None}),
        ("halted with a cause this reader does not know", {**HEALTHY, "halted": "fraud"}),
        ("halted as an empty string", {**HEALTHY, "halted": ""}),
        ("halted as a boolean", {**HEALTHY, "halted": False}),
        ("machine_quotas as an array", {**HEALTHY, "machine_quotas": []}),
        ("machine_quotas with a count for a region", {**HEALTHY, "machine_quotas": {REGION: 2}}),
        ("machine_quotas with a fractional count", {**HEALTHY, "machine_quotas": {REGION: {GPU: 1.5}}}),
        ("machine_quotas with a string count", {**HEALTHY, "machine_quotas": {REGION: {GPU: "2"}}}),
        ("machine_in_use with a null count", {**HEALTHY, **GPU_QUOTA, "machine_in_use": {REGION: {GPU: None}}}),
    ]
    readings = []
    for name, view in raw:
        record = read_feed_line(json.dumps({"type": "view", "org_id": "org_1", "shard": 0, "epoch": 1, "seq": 1,
                                            "valid_until_us": None, "view": view}).encode())
        read = None if record.valid_until_us == UNREADABLE else msgspec.to_builtins(record.view)
        readings.append({"name": name, "view": view, "read": read})
    return readings


def resource_readings() -> list[dict]:
    """Bodies' `resources` at and past the bounds of docs/gate-protocol.md 3.2: the resources a
    port reads from each (defaults filled in), or null where it must refuse them, as the server
    refuses such a body with 422 and the Python client raises BadResources."""
    raw = [
        ("none: every default", {}), ("every field", {"memory_mb": 4096, "cpu_count": 8, "disk_mb": 10_240,
                                                     "machine_type": GPU, "region": REGION, "quantity": 3}),
        ("null names are the default", {"machine_type": None, "region": None}),
        ("the largest of each", {"memory_mb": 1 << 40, "cpu_count": 1024, "disk_mb": 1 << 40, "quantity": 10_000}),
        ("memory_mb past its bound", {"memory_mb": (1 << 40) + 1}), ("disk_mb past its bound", {"disk_mb": (1 << 40) + 1}),
        ("cpu_count past its bound", {"cpu_count": 1025}), ("quantity past its bound", {"quantity": 10_001}),
        ("quantity 0", {"quantity": 0}), ("a negative quantity", {"quantity": -1}),
        ("a negative disk", {"disk_mb": -1}), ("a negative memory", {"memory_mb": -1}), ("a negative cpu_count", {"cpu_count": -1}),
        ("a fractional memory", {"memory_mb": 1.5}), ("memory as a string", {"memory_mb": "4096"}),
        ("quantity as a boolean", {"quantity": True}), ("quantity null", {"quantity": None}),
        ("an empty region", {"region": ""}), ("an empty machine_type", {"machine_type": ""}),
        ("a region of 64 characters", {"region": "r" * 64}), ("a region of 65 characters", {"region": "r" * 65}),
        ("64 characters outside the BMP count as 64", {"region": "\U0001F600" * 64}),
        ("65 characters outside the BMP count as 65", {"region": "\U0001F600" * 65}),
        ("a region with a newline at its end", {"region": REGION + "\n"}),
        ("a region with a control character", {"region": "us\x01central"}),
        ("a region with DEL", {"region": "us\x7f"}),
        ("a machine_type as a number", {"machine_type": 7}),
        ("an unknown field", {"gpus": 1}),
    ]
    readings = []
    for name, resources in raw:
        try:
            read = msgspec.to_builtins(resources_from(resources))
        except BadResources:
            read = None
        readings.append({"name": name, "resources": resources, "read": read})
    return readings


def build() -> dict:
    cases = [*suspended_cases(), *purchase_cases(), *halt_cases(), *money_cases(), *card_cases(),
             *overdraw_cases(), *disk_cases(), *concurrency_cases(), *machine_cases(), *default_cases(),
             *random_cases(), *shadow_cases(), *random_cases(SHADOW_SEED, RANDOM_SHADOW_CASES, shadow=True)]
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    return {
        "about": "Gate decisions every gateway port must give exactly: for each case, decide(action, "
                 "resources, view) is `decision` (status included). Generated; do not edit by hand.",
        "spec": "docs/gate-protocol.md",
        "generator": "clients/vectors/generate.py",
        "seed": SEED,
        "cases": cases,
        "view_readings": view_readings(),
        "resource_readings": resource_readings(),
    }


def render() -> str:
    """The file's exact text: sorted keys, indent 1, one trailing newline."""
    return json.dumps(build(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    text = render()
    VECTORS_PATH.write_text(text, encoding="utf-8")
    print(f"{VECTORS_PATH}: {len(json.loads(text)['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
