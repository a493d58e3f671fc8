"""Hand-computed scenarios of the reference model itself (tests/model/reference.py).

Every expected number is worked out by hand from docs/concepts/billing-rules.md in the
comment next to it, so a bug of the model is caught on its own, before any differential run.
"""

from __future__ import annotations

import tomllib
from datetime import datetime

from tests.model.reference import UTC, RefCatalog, RefOrg, calendar_period, dt_to_us, rfc3339

S = 1_000_000          # µs per second
MIN = 60 * S
HOUR = 3600 * S
DAY = 86400 * S


def at(*args) -> int:
    return dt_to_us(datetime(*args, tzinfo=UTC))


T0 = at(2026, 3, 2)    # a Monday (2026-01-01 is a Thursday; +60 days = Monday), ISO week 10

CATALOG = """
signup_grant_micros = 5_000_000
default_max_disk_mb = 20480
default_tier = "base"

[tiers]
base = 5
pro = 100

[[plans]]
id = "payg"
version = 1
effective_from = "2026-01-01T00:00:00Z"
period = "month"
included_micros = 0
overage = true
memory_nanos_per_gib_s = 4_500
cpu_nanos_per_vcpu_s = 14_000
disk_nanos_per_gib_s = 30
[plans.unit_nanos]
op = 1_000            # 1 µUSD per op: a tick of `op: n` costs exactly n µUSD
gpu_s = 500_000

[[plans]]
id = "hobby_weekly"
version = 1
effective_from = "2026-01-01T00:00:00Z"
period = "week"
included_micros = 5_000_000
overage = true
memory_nanos_per_gib_s = 4_500
cpu_nanos_per_vcpu_s = 14_000
disk_nanos_per_gib_s = 30
[plans.unit_nanos]
op = 1_000

[[plans]]
id = "free"
version = 1
effective_from = "2026-01-01T00:00:00Z"
period = "week"
included_micros = 1_000_000
overage = false
memory_nanos_per_gib_s = 4_500
cpu_nanos_per_vcpu_s = 14_000
disk_nanos_per_gib_s = 30
[plans.unit_nanos]
op = 1_000

[[plans]]
id = "metered"
version = 1
effective_from = "2026-01-01T00:00:00Z"
effective_until = "2026-04-01T00:00:00Z"
period = "month"
included_micros = 0
overage = true
memory_nanos_per_gib_s = 4_500
cpu_nanos_per_vcpu_s = 14_000
disk_nanos_per_gib_s = 30
[plans.unit_nanos]
op = 1_000

[[plans]]
id = "metered"
version = 2
effective_from = "2026-04-01T00:00:00Z"
period = "month"
included_micros = 0
overage = true
memory_nanos_per_gib_s = 5_000
cpu_nanos_per_vcpu_s = 14_000
disk_nanos_per_gib_s = 30
[plans.unit_nanos]
op = 2_000
"""


def catalog(**overrides) -> RefCatalog:
    raw = tomllib.loads(CATALOG)
    raw.update(overrides)
    return RefCatalog(raw)


def org(plan="payg", prepaid=True, now=T0, **overrides) -> RefOrg:
    o = RefOrg(catalog(**overrides), "org_a", plan, prepaid, now)
    return o


def ops(o: RefOrg, now: int, n: int, tick_id: str, lease_id: str = "") -> dict:
    """A usage command of one tick costing exactly n µUSD (op = 1,000 nano on payg)."""
    return o.apply(now, {"type": "usage", "ticks": [
        {"tick_id": tick_id, "lease_id": lease_id, "duration_ms": 0, "memory_mb": 0, "cpu_count": 0,
         "disk_mb": 0, "units": {"op": n}}]})


def credit(kind, amount, expires=None, payment_id=None) -> dict:
    return {"type": "credit", "kind": kind, "amount_micros": amount, "expires_at_us": expires,
            "payment_id": payment_id}


def debit(kind, amount) -> dict:
    return {"type": "debit", "kind": kind, "amount_micros": amount}


RES = {"memory_mb": 1024, "cpu_count": 1, "disk_mb": 1024, "machine_type": "cpu", "region": "eu", "quantity": 1}


# ---------------------------------------------------------------------------------------- time

def test_calendar_keys():
    # 2027-01-01 is a Friday of ISO week 53 of 2026 (2026 starts on a Thursday: 53 weeks);
    # that week runs Monday 2026-12-28 to Monday 2027-01-04.
    assert calendar_period("week", at(2027, 1, 1, 12)) == ("2026-W53", at(2026, 12, 28), at(2027, 1, 4))
    # T0 = Monday 2026-03-02 00:00 is the first instant of week 10.
    assert calendar_period("week", T0) == ("2026-W10", T0, T0 + 7 * DAY)
    # December rolls into January of the next year.
    assert calendar_period("month", at(2026, 12, 31, 23, 59)) == ("2026-12", at(2026, 12, 1), at(2027, 1, 1))
    # Rule 10: microseconds only when not zero.
    assert rfc3339(at(2026, 3, 2, 9)) == "2026-03-02T09:00:00Z"
    assert rfc3339(at(2026, 3, 2, 9) + 5) == "2026-03-02T09:00:00.000005Z"


def test_creation():
    # Signup grant of 5,000,000 credited as gr_1; period = calendar month of T0; tier base (5).
    o = org()
    fx = o.take_effects()
    assert fx["ledger"] == [("signup_grant", 5_000_000, "gr_1", None, 0)]
    assert fx["events"] == []
    ob = o.observe()
    assert ob["balance_micros"] == 5_000_000
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("2026-03", at(2026, 3, 1), at(2026, 4, 1))
    assert (ob["tier"], ob["max_concurrent"], ob["max_disk_mb"]) == ("base", 5, 20480)
    assert ob["halted"] is None and ob["low_balance_armed"] is True
    # 4.5: a prepaid org without a signup grant is checked at once: balance 0 + quota 0 → halted.
    o2 = org(signup_grant_micros=0)
    assert o2.take_effects()["events"] == [("org.halted", {"reason": "balance", "lease_ids": [], "balance_micros": 0})]
    # ... but a postpaid one is never halted for balance.
    o3 = org(prepaid=False, signup_grant_micros=0)
    assert o3.take_effects()["events"] == [] and o3.observe()["halted"] is None


def test_same_now_twice_changes_nothing():
    o = org()
    o.apply(T0 + 40 * DAY, {"type": "advance"})
    first = o.take_effects()
    assert len(first["periods"]) == 1
    before = o.observe()
    o.apply(T0 + 40 * DAY, {"type": "advance"})
    assert o.take_effects() == {"ledger": [], "events": [], "charges": [], "periods": []}
    assert o.observe() == before


# ---------------------------------------------------------------------------------------- cost

def test_cost_memory_gib_hour():
    # 1,024 MB for 3,600,000 ms = 1 GiB-hour = 3,600 GiB-s × 4,500 nano = 16,200,000 nano = 16,200 µUSD.
    # scaled = 4,500 × (1,024 × 3,600,000) = 16,588,800,000,000; / 1,024,000,000 = 16,200 rest 0.
    o = org()
    o.take_effects()
    r = o.apply(T0 + S, {"type": "usage", "ticks": [
        {"tick_id": "t1", "lease_id": "", "duration_ms": 3_600_000, "memory_mb": 1024, "cpu_count": 0,
         "disk_mb": 0, "units": None}]})
    assert r == {"accepted": 1, "duplicates": 0, "rejected": [], "spent_micros": 16_200}
    assert o.take_effects()["ledger"] == [("usage", -16_200, None, None, 0)]
    assert o.observe()["balance_micros"] == 5_000_000 - 16_200
    assert o.observe()["remainder_scaled"] == 0


def test_cost_cpu_remainder_carries():
    # 1 vCPU × 71 ms: scaled = 14,000 × 71 × 1,024 = 1,017,856,000 < 1,024,000,000 → 0 µUSD spent.
    o = org()
    o.take_effects()
    tick = {"lease_id": "", "memory_mb": 0, "cpu_count": 1, "disk_mb": 0, "units": None}
    r = o.apply(T0 + S, {"type": "usage", "ticks": [dict(tick, tick_id="c1", duration_ms=71)]})
    assert r["spent_micros"] == 0 and o.observe()["remainder_scaled"] == 1_017_856_000
    assert o.take_effects()["ledger"] == []          # no spend, no entry
    # + 1 ms: 14,000 × 1 × 1,024 = 14,336,000; total 1,032,192,000 → 1 µUSD, remainder 8,192,000.
    r = o.apply(T0 + 2 * S, {"type": "usage", "ticks": [dict(tick, tick_id="c2", duration_ms=1)]})
    assert r["spent_micros"] == 1 and o.observe()["remainder_scaled"] == 8_192_000
    assert o.take_effects()["ledger"] == [("usage", -1, None, None, 0)]


def test_cost_disk_and_units():
    # disk 1,024 MB × 1,000 ms = 1 GiB-s × 30 nano: scaled 30 × 1,024,000 = 30,720,000.
    # gpu_s: 2 × 500,000 nano = 1,000,000 nano = 1,000 µUSD: scaled 500,000 × 2 × 1,024,000 = 1,024,000,000,000.
    # total 1,024,030,720,000 → 1,000 µUSD, remainder 30,720,000.
    o = org()
    r = o.apply(T0 + S, {"type": "usage", "ticks": [
        {"tick_id": "d1", "lease_id": "", "duration_ms": 1000, "memory_mb": 0, "cpu_count": 0,
         "disk_mb": 1024, "units": {"gpu_s": 2}}]})
    assert r["spent_micros"] == 1_000
    assert o.observe()["remainder_scaled"] == 30_720_000


def test_unknown_unit_rejected_alone_and_duplicates():
    o = org()
    base = {"lease_id": "", "duration_ms": 0, "memory_mb": 0, "cpu_count": 0, "disk_mb": 0}
    r = o.apply(T0 + S, {"type": "usage", "ticks": [
        dict(base, tick_id="a", units={"op": 10}),
        dict(base, tick_id="b", units={"op": 5, "nope": 1}),     # unpriced unit → rejected alone
        dict(base, tick_id="a", units={"op": 10}),               # same id in the same command
    ]})
    # only a is billed: 10 µUSD.
    assert r == {"accepted": 1, "duplicates": 1, "rejected": ["b"], "spent_micros": 10}
    # b was not remembered: resent with a priced unit it is billed; a is a duplicate.
    r = o.apply(T0 + 2 * S, {"type": "usage", "ticks": [dict(base, tick_id="b", units={"op": 7}),
                                                        dict(base, tick_id="a", units={"op": 10})]})
    assert r == {"accepted": 1, "duplicates": 1, "rejected": [], "spent_micros": 7}
    assert o.observe()["balance_micros"] == 5_000_000 - 17


# ---------------------------------------------------------------------------------------- credit

def test_burn_order_and_spend():
    o = org()
    o.apply(T0, credit("topup", 1_000_000))                       # gr_2 purchased, no expiry
    o.apply(T0, credit("grant", 1_000_000, T0 + 10 * DAY))        # gr_3 promo, +10 d
    o.apply(T0, credit("topup", 1_000_000, T0 + 5 * DAY))         # gr_4 purchased, +5 d
    o.apply(T0, credit("adjustment", 1_000_000, T0 + 5 * DAY))    # gr_5 purchased, +5 d
    o.apply(T0, credit("grant", 1_000_000, T0 + 5 * DAY))         # gr_6 promo, +5 d
    # 2.4: expiring first (soonest first); within +5 d promo (gr_6) before purchased (gr_4, gr_5
    # in making order); then +10 d gr_3; then no expiry: promo gr_1, purchased gr_2.
    assert [g[0] for g in o.observe()["grants"]] == ["gr_6", "gr_4", "gr_5", "gr_3", "gr_1", "gr_2"]
    o.take_effects()
    # spend 2,500,000: gr_6 gives 1,000,000 (removed), gr_4 1,000,000 (removed), gr_5 500,000.
    ops(o, T0 + S, 2_500_000, "t")
    assert [(g[0], g[2]) for g in o.observe()["grants"]] == [
        ("gr_5", 500_000), ("gr_3", 1_000_000), ("gr_1", 5_000_000), ("gr_2", 1_000_000)]
    assert o.take_effects()["ledger"] == [("usage", -2_500_000, None, None, 0)]


def test_clawback_order_and_debt():
    o = org()
    o.apply(T0, credit("topup", 1_000_000))                       # gr_2
    o.apply(T0, credit("grant", 1_000_000, T0 + DAY))             # gr_3 promo expiring
    o.apply(T0, credit("topup", 1_000_000, T0 + 2 * DAY))         # gr_4 purchased expiring
    o.take_effects()
    # 2.5: purchased in burn order: gr_4 (expiring) then gr_2; then the rest: gr_3, gr_1.
    # 2,500,000 = gr_4 1,000,000 + gr_2 1,000,000 + gr_3 500,000.
    r = o.apply(T0 + S, debit("refund", 2_500_000))
    assert r == {"entry": ("refund", -2_500_000, None, None)}
    assert [(g[0], g[2]) for g in o.observe()["grants"]] == [("gr_3", 500_000), ("gr_1", 5_000_000)]
    # Take 6,000,000 more: grants give 5,500,000, 500,000 becomes debt; balance −500,000;
    # prepaid and not funded (quota 0) → halted for balance.
    o.apply(T0 + 2 * S, debit("adjustment", 6_000_000))
    ob = o.observe()
    assert (ob["balance_micros"], ob["debt_micros"], ob["grants"], ob["halted"]) == (-500_000, 500_000, [], "balance")
    fx = o.take_effects()
    assert fx["ledger"] == [("refund", -2_500_000, None, None, 0), ("adjustment", -6_000_000, None, None, 0)]
    assert fx["events"] == [("org.halted", {"reason": "balance", "lease_ids": [], "balance_micros": -500_000})]


def test_credit_pays_debt_first_and_counts():
    o = org()
    o.apply(T0, debit("adjustment", 6_000_000))                   # debt 1,000,000, halted
    o.take_effects()
    # A credit of 400,000 all goes to debt: counter → gr_2, no grant; debt 600,000; still halted.
    r = o.apply(T0 + S, credit("topup", 400_000))
    assert r == {"entry": ("topup", 400_000, "gr_2", None)}
    ob = o.observe()
    assert (ob["debt_micros"], ob["grants"], ob["halted"], ob["paid_credit"]) == (600_000, [], "balance", True)
    # 1,000,000 more: gr_3, 600,000 to debt, grant of 400,000; funded → org.resumed (credit).
    o.apply(T0 + 2 * S, credit("topup", 1_000_000))
    ob = o.observe()
    assert (ob["debt_micros"], ob["grants"], ob["halted"]) == (0, [("gr_3", "topup", 400_000, None, None)], None)
    fx = o.take_effects()
    assert fx["events"] == [("org.resumed", {"reason": "credit", "balance_micros": 400_000})]


def test_credit_already_expired_shows_both():
    o = org()
    o.take_effects()
    o.apply(T0 + HOUR, credit("grant", 1_000_000, T0 + HOUR))     # expiry ≤ now
    assert o.take_effects()["ledger"] == [("grant", 1_000_000, "gr_2", T0 + HOUR, 0),
                                          ("expiration", -1_000_000, "gr_2", T0 + HOUR, 0)]
    assert o.observe()["balance_micros"] == 5_000_000


def test_expiry_at_advance_halts():
    o = org(signup_grant_micros=0)                                # halted at creation
    o.apply(T0, credit("grant", 1_000_000, T0 + HOUR))            # gr_1, lift (credit)
    fx = o.take_effects()
    assert fx["events"][-1] == ("org.resumed", {"reason": "credit", "balance_micros": 1_000_000})
    # the gate at T0 + HOUR decides as of then (rule 1.1): the grant expired, the org halted.
    # halted for balance, needs a card → create: no_payment_method; wake: halted.
    assert o.apply(T0 + HOUR, {"type": "gate", "action": "create", "resources": RES}) == {"reason": "no_payment_method"}
    assert o.apply(T0 + HOUR, {"type": "gate", "action": "wake", "resources": RES}) == {"reason": "halted"}
    assert o.observe()["halted"] is None                          # the gate applied nothing
    o.apply(T0 + HOUR, {"type": "advance"})
    fx = o.take_effects()
    assert fx["ledger"] == [("expiration", -1_000_000, "gr_1", T0 + HOUR, 0)]
    assert fx["events"] == [("org.halted", {"reason": "balance", "lease_ids": [], "balance_micros": 0})]


def test_too_many_grants():
    o = org()
    for i in range(999):                                          # signup + 999 = 1,000 grants
        o.apply(T0, credit("grant", 1))
    r = o.apply(T0, credit("grant", 1))
    assert r == {"refused": "too_many_grants"}
    assert len(o.observe()["grants"]) == 1000
    # the refused credit did not count: the next accepted one (after usage frees a grant) is gr_1001.
    # burn order: all promo, no expiry → making order: gr_1 (5,000,000) then gr_2 (1) are used up.
    ops(o, T0 + S, 5_000_001, "x")
    assert len(o.observe()["grants"]) == 998
    assert o.apply(T0 + S, credit("grant", 5))["entry"][2] == "gr_1001"
    # money paid is never refused, at the cap or past it (rule 2.3)
    o.apply(T0 + S, credit("grant", 1))
    o.apply(T0 + S, credit("grant", 1))
    assert o.apply(T0 + S, credit("grant", 1)) == {"refused": "too_many_grants"}
    assert o.apply(T0 + S, credit("topup", 7))["entry"][:2] == ("topup", 7)
    assert len(o.observe()["grants"]) == 1001


def test_low_balance_alert():
    o = org(low_balance_micros=2_000_000)
    assert o.take_effects()["events"] == []                       # 5,000,000 ≥ 2,000,000
    o.apply(T0 + S, debit("adjustment", 3_500_000))               # 1,500,000 < 2,000,000 → alert, disarm
    assert o.take_effects()["events"] == [("balance.threshold_crossed",
                                           {"threshold_micros": 2_000_000, "balance_micros": 1_500_000})]
    o.apply(T0 + 2 * S, debit("adjustment", 100_000))             # disarmed: nothing
    assert o.take_effects()["events"] == [] and o.observe()["low_balance_armed"] is False
    o.apply(T0 + 3 * S, credit("topup", 1_000_000))               # 2,400,000 ≥ 2,000,000 → re-arm
    assert o.take_effects()["events"] == [] and o.observe()["low_balance_armed"] is True
    o.apply(T0 + 4 * S, {"type": "set_alerts", "low_balance_micros": 3_000_000})   # 2,400,000 < 3,000,000
    assert o.take_effects()["events"] == [("balance.threshold_crossed",
                                           {"threshold_micros": 3_000_000, "balance_micros": 2_400_000})]


# ---------------------------------------------------------------------------------------- refunds

def refund(rid, pid, amount) -> dict:
    return {"type": "stripe_refund", "refund_id": rid, "payment_id": pid, "amount_micros": amount}


def test_stripe_refund_claws_only_its_payment():
    o = org()
    o.apply(T0, credit("topup", 2_000_000, None, "pi_1"))         # gr_2
    o.take_effects()
    assert o.apply(T0 + S, refund("re_1", "pi_1", 500_000)) == {"clawed_micros": 500_000}
    assert o.apply(T0 + S, refund("re_1", "pi_1", 500_000)) == {"duplicate": True}
    # R 5,000,000 > remaining 1,500,000: takes 1,500,000, never the signup grant, no debt.
    assert o.apply(T0 + 2 * S, refund("re_2", "pi_1", 5_000_000)) == {"clawed_micros": 1_500_000}
    assert o.apply(T0 + 3 * S, refund("re_3", "pi_1", 1)) == {"clawed_micros": 0}
    assert o.take_effects()["ledger"] == [("refund", -500_000, "gr_2", None, 0),
                                          ("refund", -1_500_000, "gr_2", None, 0)]
    ob = o.observe()
    assert (ob["balance_micros"], ob["debt_micros"]) == (5_000_000, 0)


def test_refund_before_its_credit_waits_30_days():
    o = org()
    o.take_effects()
    assert o.apply(T0, refund("re_9", "pi_9", 300_000)) == {"clawed_micros": 0}
    o.apply(T0 + DAY, credit("topup", 1_000_000, None, "pi_9"))   # gr_2 reduced at once: 700,000 left
    assert o.take_effects()["ledger"] == [("topup", 1_000_000, "gr_2", None, 0),
                                          ("refund", -300_000, "gr_2", None, 0)]
    assert ("gr_2", "topup", 700_000, None, "pi_9") in o.observe()["grants"]
    # a refund waiting more than 30 days stops waiting: the credit is not reduced.
    o.apply(T0 + DAY, refund("re_8", "pi_8", 300_000))
    o.apply(T0 + 32 * DAY, credit("topup", 1_000_000, None, "pi_8"))
    assert [e[0] for e in o.take_effects()["ledger"]] == ["topup"]


def test_a_refund_takes_its_share_of_a_taxed_credit():
    """Rule 3.0's example: 1,000¢ of credit paid 1,100¢ with 100¢ tax."""
    o = org()
    o.apply(T0, {**credit("topup", 10_000_000, None, "pi_1"), "paid_micros": 11_000_000})
    o.take_effects()
    facts = {"credited_micros": 10_000_000, "paid_micros": 11_000_000}
    assert o.apply(T0 + S, {**refund("re_1", "pi_1", 5_500_000), **facts}) == {"clawed_micros": 5_000_000}
    assert o.apply(T0 + S, {**refund("re_2", "pi_1", 1_000_000), **facts}) == {"clawed_micros": 909_090}
    # The org remembers the credit's A and P: a refund naming none (the edge read the ledger
    # before the credit was in it) still takes its share.
    # (with the earlier refunds: ⌊7,500,000 × 10/11⌋ − ⌊6,500,000 × 10/11⌋ = 909,091)
    assert o.apply(T0 + S, refund("re_3", "pi_1", 1_000_000)) == {"clawed_micros": 909_091}
    # Not knowing what was paid at all, a refund takes what it names.
    o.apply(T0 + S, credit("topup", 2_000_000, None, "pi_2"))
    assert o.apply(T0 + S, refund("re_5", "pi_2", 1_000_000)) == {"clawed_micros": 1_000_000}
    # One before its credit takes its share of the credit when it comes.
    o.apply(T0 + S, refund("re_4", "pi_4", 11_000_000))
    o.apply(T0 + 2 * S, {**credit("topup", 10_000_000, None, "pi_4"), "paid_micros": 11_000_000})
    assert o.take_effects()["ledger"][-1] == ("refund", -10_000_000, "gr_4", None, 0)


def test_partial_refunds_of_a_payment_round_down_once():
    """Rule 3.0: 1,230,000 µUSD paid for 1,000,000 of credit, refunded as 610,000 + 620,000."""
    o = org()
    o.apply(T0, {**credit("topup", 1_000_000, None, "pi_1"), "paid_micros": 1_230_000})
    assert o.apply(T0 + S, refund("re_1", "pi_1", 610_000)) == {"clawed_micros": 495_934}
    assert o.apply(T0 + S, refund("re_2", "pi_1", 620_000)) == {"clawed_micros": 504_066}
    # Refunds waiting for their credit count in arrival order too.
    o.apply(T0 + S, refund("re_3", "pi_3", 610_000))
    o.apply(T0 + S, refund("re_4", "pi_3", 620_000))
    o.apply(T0 + 2 * S, {**credit("topup", 1_000_000, None, "pi_3"), "paid_micros": 1_230_000})
    assert [e[1] for e in o.take_effects()["ledger"] if e[0] == "refund"][-2:] == [-495_934, -504_066]


def test_runway_low_once_per_crossing():
    """Rule 2.10: an hour of RES is 1 GiB-h of memory (16,200 µUSD), 1 vCPU-h (50,400) and 1
    GiB-h of disk (108): 66,708 µUSD an hour a lease."""
    o = org()
    for lid in ("l1", "l2"):
        o.apply(T0, {"type": "acquire", "lease_id": lid, "resources": RES, "ttl_s": 3_600})
    burn = 2 * 66_708
    balance = o.observe()["balance_micros"]
    ops(o, T0 + S, balance - burn, "t1")          # exactly an hour left: not under 3,600 s
    assert [e for e in o.take_effects()["events"] if e[0] == "balance.runway_low"] == []
    ops(o, T0 + 2 * S, 1, "t2")
    assert o.take_effects()["events"] == [("balance.runway_low", {
        "threshold_s": 3_600, "runway_s": 3_599, "burn_micros_per_hour": burn, "balance_micros": burn - 1,
        "lease_ids": ["l1", "l2"]})]
    ops(o, T0 + 3 * S, 70_000, "t3")              # still under (63,415 left): nothing
    assert o.take_effects()["events"] == []
    o.apply(T0 + 4 * S, {"type": "release", "lease_id": "l2"})  # l1 alone: 3,422 s, still under
    o.apply(T0 + 4 * S, {"type": "release", "lease_id": "l1"})
    assert o.observe()["runway_armed"] is False    # nothing runs: no runway, still disarmed
    o.apply(T0 + 5 * S, {"type": "acquire", "lease_id": "l3", "resources": RES, "ttl_s": 3_600})
    assert o.take_effects()["events"] == []        # low again at once: no new crossing
    o.apply(T0 + 6 * S, credit("grant", 1_000_000))  # 15 hours at l3's burn: re-armed
    assert o.observe()["runway_armed"] is True


# ---------------------------------------------------------------------------------------- periods

def test_month_rollover_archives_once():
    o = org(now=at(2026, 3, 10))
    ops(o, at(2026, 3, 10, 1), 1_000, "u1")
    o.take_effects()
    o.apply(at(2026, 5, 2), {"type": "advance"})                  # April passed with nothing: not archived
    fx = o.take_effects()
    assert fx["periods"] == [("2026-03", at(2026, 3, 1), at(2026, 4, 1), 1_000, 0, "payg", 1)]
    ob = o.observe()
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"], ob["period_usage_micros"]) == (
        "2026-05", at(2026, 5, 1), at(2026, 6, 1), 0)


def test_quota_first_then_credit_and_thresholds():
    o = org(plan="hobby_weekly")                                  # quota 5,000,000 per ISO week
    o.take_effects()
    # 4,000,000 all from quota: 4,000,000 × 100 ≥ 80 × 5,000,000 → 80 % event; m = 0: no ledger entry.
    ops(o, T0 + S, 4_000_000, "a")
    fx = o.take_effects()
    assert fx["ledger"] == []
    assert fx["events"] == [("quota.threshold_crossed", {"percent": 80, "period": "2026-W10",
                                                          "quota_micros": 5_000_000, "used_micros": 4_000_000})]
    # 2,000,000: q = 1,000,000 from quota, m = 1,000,000 from credit → balance 4,000,000; 100 %.
    ops(o, T0 + 2 * S, 2_000_000, "b")
    fx = o.take_effects()
    assert fx["ledger"] == [("usage", -1_000_000, None, None, 0)]
    assert fx["events"] == [("quota.threshold_crossed", {"percent": 100, "period": "2026-W10",
                                                          "quota_micros": 5_000_000, "used_micros": 5_000_000})]
    ob = o.observe()
    assert (ob["balance_micros"], ob["quota_used_micros"], ob["period_usage_micros"]) == (4_000_000, 5_000_000, 6_000_000)
    # next ISO week: archived, fresh quota.
    o.apply(T0 + 7 * DAY, {"type": "advance"})
    assert o.take_effects()["periods"] == [("2026-W10", T0, T0 + 7 * DAY, 6_000_000, 5_000_000, "hobby_weekly", 1)]
    assert o.observe()["quota_used_micros"] == 0


def test_postpaid_invoices_what_credit_does_not_cover():
    # payg postpaid with signup 5,000,000: spend 7,000,000 → 5,000,000 from grants, 2,000,000 invoiced.
    o = org(prepaid=False)
    o.take_effects()
    ops(o, T0 + S, 7_000_000, "p")
    assert o.take_effects()["ledger"] == [("usage", -5_000_000, None, None, 2_000_000)]
    ob = o.observe()
    assert (ob["balance_micros"], ob["debt_micros"], ob["halted"]) == (0, 0, None)
    # more usage with no grants: (usage, 0, invoiced 300).
    ops(o, T0 + 2 * S, 300, "q")
    assert o.take_effects()["ledger"] == [("usage", 0, None, None, 300)]


def test_plan_version_succession_at_new_period():
    o = org(plan="metered", now=at(2026, 3, 15))
    assert (o.observe()["plan_id"], o.observe()["plan_version"]) == ("metered", 1)
    assert o.catalog.plan_in_effect("metered", at(2026, 4, 1)) == ("metered", 2)
    o.apply(at(2026, 4, 5), {"type": "advance"})
    # v1's effective_until (Apr 1) ≤ the new period's start (Apr 1) → v2; the archive says v1.
    assert o.take_effects()["periods"] == [("2026-03", at(2026, 3, 1), at(2026, 4, 1), 0, 0, "metered", 1)]
    assert o.observe()["plan_version"] == 2
    # v2 prices op at 2,000 nano: 10 ops = 20 µUSD.
    assert ops(o, at(2026, 4, 5, 1), 10, "m")["spent_micros"] == 20


def test_plan_change_period_kind_keeps_start():
    o = org(now=at(2026, 3, 4))                                   # payg: month [Mar 1, Apr 1)
    o.apply(at(2026, 3, 4, 12), {"type": "set_plan", "plan_id": "hobby_weekly", "plan_version": 1})
    ob = o.observe()
    # the ISO week containing Wed Mar 4 ends Mon Mar 9; its key is 2026-W10; the start stays Mar 1.
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("2026-W10", at(2026, 3, 1), at(2026, 3, 9))
    assert (ob["quota_micros"], ob["quota_used_micros"]) == (5_000_000, 0)


def test_subscription_periods():
    o = org()                                                     # period 2026-03 [Mar 1, Apr 1)
    sp = lambda a, e: {"type": "subscription_period", "start_us": a, "end_us": e}
    # first report [Mar 5, Apr 5) at Mar 6: grid = cycle of 31 days; step 4: end → Apr 5.
    o.apply(at(2026, 3, 6), sp(at(2026, 3, 5), at(2026, 4, 5)))
    ob = o.observe()
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("2026-03", at(2026, 3, 1), at(2026, 4, 5))
    o.take_effects()
    # Apr 5 00:00:01: advance → grid period of the cycle: k = 1 → [Apr 5, May 6), key sub-2026-04-05.
    now = at(2026, 4, 5, 0, 0, 1)
    o.apply(now, sp(at(2026, 4, 5), at(2026, 5, 5)))
    assert o.take_effects()["periods"] == [("2026-03", at(2026, 3, 1), at(2026, 4, 5), 0, 0, "payg", 1)]
    # the report's start (Apr 5) is not after the running start (Apr 5): step 4, end → May 5.
    ob = o.observe()
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("sub-2026-04-05", at(2026, 4, 5), at(2026, 5, 5))
    ops(o, at(2026, 4, 10), 700, "s")
    # a report starting later than the running period (Apr 20) cuts it now (Apr 20 10:00).
    now = at(2026, 4, 20, 10)
    o.apply(now, sp(at(2026, 4, 20), at(2026, 5, 20)))
    assert o.take_effects()["periods"] == [("sub-2026-04-05", at(2026, 4, 5), now, 700, 0, "payg", 1)]
    ob = o.observe()
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"], ob["period_usage_micros"]) == (
        "sub-2026-04-20", now, at(2026, 5, 20), 0)
    # an older or equal report changes nothing.
    o.apply(now + S, sp(at(2026, 4, 20), at(2026, 6, 1)))
    assert o.observe()["period_end_us"] == at(2026, 5, 20)
    # the grid is now the 30-day cycle from Apr 20: at May 21 the period is [May 20, Jun 19).
    o.apply(at(2026, 5, 21), {"type": "advance"})
    ob = o.observe()
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("sub-2026-05-20", at(2026, 5, 20), at(2026, 6, 19))


# ---------------------------------------------------------------------------------------- gate, leases

def test_gate_reasons_by_funding():
    # prepaid, no signup grant: halted for balance; no card → create says no_payment_method, wake halted.
    o = org(signup_grant_micros=0)
    assert o.apply(T0, {"type": "gate", "action": "create", "resources": RES}) == {"reason": "no_payment_method"}
    assert o.apply(T0, {"type": "gate", "action": "wake", "resources": RES}) == {"reason": "halted"}
    assert o.apply(T0, {"type": "gate", "action": "purchase", "resources": {}}) == {"reason": "ok"}
    o.apply(T0, {"type": "set_card", "present": True})
    assert o.apply(T0, {"type": "gate", "action": "create", "resources": RES}) == {"reason": "halted"}
    # postpaid on free (no overage): quota used up → not funded, never halted → quota_exceeded.
    f = org(plan="free", prepaid=False, signup_grant_micros=0)
    assert f.apply(T0, {"type": "gate", "action": "wake", "resources": RES}) == {"reason": "ok"}
    ops(f, T0 + S, 1_000_000, "f")
    assert f.apply(T0 + S, {"type": "gate", "action": "wake", "resources": RES}) == {"reason": "quota_exceeded"}
    assert f.apply(T0 + S, {"type": "gate", "action": "ingest", "resources": {}}) == {"reason": "quota_exceeded"}
    assert f.apply(T0 + S, {"type": "gate", "action": "create", "resources": RES}) == {"reason": "no_payment_method"}
    # postpaid payg (overage) with nothing passes.
    p = org(prepaid=False, signup_grant_micros=0)
    assert p.apply(T0, {"type": "gate", "action": "create", "resources": RES}) == {"reason": "ok"}
    # the free org's quota returns with the next week: the read counts the full quota.
    assert f.apply(T0 + 7 * DAY, {"type": "gate", "action": "wake", "resources": RES}) == {"reason": "ok"}


def test_gate_limits():
    o = org()
    acq = lambda lid, res: o.apply(T0, {"type": "acquire", "lease_id": lid, "resources": res, "ttl_s": 60})
    assert acq("big", dict(RES, disk_mb=20481)) == {"denied": "resource_limit"}          # > 20,480 MB
    assert acq("a", dict(RES, quantity=3))["granted"] is True                           # 3 of 5 slots
    assert acq("b", dict(RES, quantity=3)) == {"denied": "concurrency_limit"}           # 3 + 3 > 5
    assert acq("b", dict(RES, quantity=2))["created"] is True                           # 3 + 2 = 5
    o.apply(T0, {"type": "set_tier", "tier": "pro", "max_concurrent": 100, "as_of_us": T0})
    o.apply(T0, {"type": "set_limits", "max_disk_mb": None, "machine_quotas": {"eu": {"gpu": 2}}})
    assert acq("g1", dict(RES, machine_type="gpu", quantity=2))["created"] is True      # 0 + 2 ≤ 2
    assert acq("g2", dict(RES, machine_type="gpu", quantity=1)) == {"denied": "resource_limit"}
    assert acq("g3", dict(RES, machine_type="gpu", region="us", quantity=1))["created"] is True
    # a stale tier decision is ignored.
    assert o.apply(T0 + S, {"type": "set_tier", "tier": "base", "max_concurrent": 5, "as_of_us": T0 - 1}) == {"stale": True}
    assert o.observe()["max_concurrent"] == 100
    # read at T0 + 60 s: every lease has expired_at ≤ now → none active; gpu in eu is free again.
    assert o.apply(T0 + MIN, {"type": "gate", "action": "create",
                              "resources": dict(RES, machine_type="gpu", quantity=2)}) == {"reason": "ok"}


def test_lease_lifecycle():
    o = org()
    o.take_effects()
    r = o.apply(T0, {"type": "acquire", "lease_id": "l1", "resources": RES, "ttl_s": 60})
    assert r == {"granted": True, "created": True, "expires_at_us": T0 + MIN}
    r = o.apply(T0 + S, {"type": "acquire", "lease_id": "l1", "resources": RES, "ttl_s": 60})
    assert r == {"granted": True, "created": False, "expires_at_us": T0 + MIN}          # unchanged
    assert o.apply(T0 + S, {"type": "acquire", "lease_id": "l1", "resources": dict(RES, cpu_count=2),
                            "ttl_s": 60}) == {"refused": "conflict"}
    assert o.apply(T0 + 30 * S, {"type": "renew", "lease_id": "l1"}) == {"expires_at_us": T0 + 90 * S}
    # usage at T0 + 50 s renews: max(T0 + 90 s, T0 + 50 s + 60 s) = T0 + 110 s.
    ops(o, T0 + 50 * S, 1, "h", lease_id="l1")
    assert o.observe()["leases"] == {"l1": (T0 + 110 * S, 1, 60)}
    o.take_effects()
    o.apply(T0 + 110 * S, {"type": "advance"})
    assert o.take_effects()["events"] == [("lease.expired", {"lease_id": "l1", "expired_at": "2026-03-02T00:01:50Z"})]
    assert o.apply(T0 + 120 * S, {"type": "acquire", "lease_id": "l1", "resources": RES, "ttl_s": 60}) == {
        "refused": "lease_ended"}
    # rule 7.5: remembered until more than one hour has passed since it ended (T0 + 110 s).
    assert o.apply(T0 + 110 * S + HOUR, {"type": "acquire", "lease_id": "l1", "resources": RES,
                                         "ttl_s": 60}) == {"refused": "lease_ended"}
    assert o.apply(T0 + 111 * S + HOUR, {"type": "acquire", "lease_id": "l1", "resources": RES,
                                         "ttl_s": 60})["created"] is True
    assert o.apply(T0 + 2 * HOUR, {"type": "release", "lease_id": "zz"}) == {"released": False}
    assert o.apply(T0 + 2 * HOUR, {"type": "renew", "lease_id": "zz"}) == {"refused": "unknown_lease"}


def test_admin_halt_and_resume():
    o = org(signup_grant_micros=0)
    o.take_effects()                                              # org.halted (balance) at creation
    o.apply(T0 + S, {"type": "acquire", "lease_id": "x", "resources": RES, "ttl_s": 60})  # denied: halted
    o.apply(T0 + S, {"type": "halt"})
    o.apply(T0 + S, {"type": "halt"})                             # already admin: no second event
    o.apply(T0 + S, {"type": "resume"})
    assert o.take_effects()["events"] == [
        ("org.halted", {"reason": "admin", "lease_ids": [], "balance_micros": 0}),
        ("org.resumed", {"reason": "admin", "balance_micros": 0}),
        ("org.halted", {"reason": "balance", "lease_ids": [], "balance_micros": 0}),  # still no money
    ]
    o.apply(T0 + 2 * S, credit("grant", 1))
    assert o.take_effects()["events"] == [("org.resumed", {"reason": "credit", "balance_micros": 1})]


# ---------------------------------------------------------------------------------------- dunning

def test_dunning_steps_and_payment():
    o = org(prepaid=False)
    o.take_effects()
    pds = T0 + HOUR
    o.apply(T0 + 2 * HOUR, {"type": "invoice_failed", "since_us": pds, "suspend_after_s": 3 * 86400,
                            "degrade_after_s": 7 * 86400, "downgrade_after_s": 14 * 86400,
                            "free_plan_id": "free", "free_plan_version": 1, "invoice_id": "in_1"})
    assert (o.observe()["dunning_step"], o.observe()["past_due_since_us"]) == (0, pds)
    o.apply(pds + 3 * DAY, {"type": "advance"})
    assert o.take_effects()["events"] == [("org.suspended", {"reason": "past_due",
                                                             "past_due_since": "2026-03-02T01:00:00Z",
                                                             "lease_ids": []})]
    assert o.apply(pds + 3 * DAY, {"type": "gate", "action": "purchase", "resources": {}}) == {"reason": "suspended"}
    # steps 2 and 3 due in one advance: degraded, then free (weekly) — the month period's end and
    # key become those of the ISO week containing now (Mon Mar 16 01:00 → W12, ends Mar 23).
    o.apply(pds + 14 * DAY, {"type": "advance"})
    ob = o.observe()
    assert (ob["dunning_step"], ob["degraded"], ob["plan_id"]) == (3, True, "free")
    assert (ob["period_key"], ob["period_start_us"], ob["period_end_us"]) == ("2026-W12", at(2026, 3, 1), at(2026, 3, 23))
    o.take_effects()
    o.apply(pds + 15 * DAY, {"type": "invoice_paid", "as_of_us": pds + 15 * DAY, "invoice_id": "in_trial",
                             "amount_paid_cents": 0})             # another invoice, zero: proves nothing
    assert o.observe()["dunning_step"] == 3
    o.apply(pds + 15 * DAY, {"type": "invoice_failed", "since_us": pds, "suspend_after_s": 3 * 86400,
                             "degrade_after_s": 7 * 86400, "downgrade_after_s": 14 * 86400,
                             "free_plan_id": "free", "free_plan_version": 1, "invoice_id": "in_trial"})
    assert o.observe()["dunning_step"] == 3                       # settled already: old news (8.1)
    o.apply(pds + 15 * DAY, {"type": "invoice_paid", "as_of_us": pds + 15 * DAY, "invoice_id": "in_1",
                             "amount_paid_cents": 0, "settled_by": "voided"})
    ob = o.observe()
    assert (ob["dunning_step"], ob["suspended"], ob["degraded"], ob["plan_id"]) == (None, False, False, "payg")
    # back on payg (month): the month containing Mar 17 01:00 ends Apr 1; start still Mar 1.
    assert (ob["period_key"], ob["period_end_us"]) == ("2026-03", at(2026, 4, 1))
    assert o.take_effects()["events"] == [("org.unsuspended", {"was_suspended": True, "step": 3,
                                                               "past_due_since": "2026-03-02T01:00:00Z"})]


# ---------------------------------------------------------------------------------------- auto-recharge

def test_auto_recharge_charge_grow_settle():
    o = org()
    o.apply(T0, {"type": "set_card", "present": True})
    o.apply(T0, {"type": "set_auto_recharge", "enabled": True, "threshold_micros": 2_000_000,
                 "amount_micros": 1_000_000, "max_per_day": 2, "cooldown_s": 60})
    o.take_effects()                                              # 5,000,000 ≥ threshold: nothing
    # balance 500,000: whole cents above 2,000,000 need > 1,500,000 → 1,510,000 > amount 1,000,000.
    o.apply(T0 + S, debit("adjustment", 4_500_000))
    # same instant: balance −500,000 → the charge grows to > 2,500,000 → 2,510,000.
    o.apply(T0 + S, debit("adjustment", 1_000_000))
    fx = o.take_effects()
    assert fx["charges"] == [("ar_1", 2_510_000, f"metergate:org_a:{T0}:auto_recharge:ar_1:{T0 + S}")]
    rc = o.observe()["recharge"]
    assert (rc["pending_id"], rc["pending_micros"], rc["day_count"]) == ("ar_1", 2_510_000, 1)
    # settle: credit pays the debt 500,000 first, grant gr_2 of 2,010,000; balance 2,010,000.
    r = o.apply(T0 + 2 * S, {"type": "settle", "charge_id": "ar_1", "succeeded": True,
                             "amount_micros": 2_510_000, "payment_id": "pi_ar1", "reason": None})
    assert r == {"entry": ("auto_recharge", 2_510_000, "gr_2", None)}
    fx = o.take_effects()
    assert fx["events"][-1] == ("auto_recharge.succeeded", {"charge_id": "ar_1", "amount_micros": 2_510_000,
                                                            "payment_intent_id": "pi_ar1",
                                                            "balance_micros": 2_010_000})
    assert o.observe()["paid_credit"] is True
    # T0 + 10 s: balance 1,010,000 < threshold but the 60 s cooldown since T0 + 1 s has not passed.
    o.apply(T0 + 10 * S, debit("adjustment", 1_000_000))
    assert o.take_effects()["charges"] == []
    # T0 + 61 s: the advance asks: need > 990,000 → 1,000,000; max(1,000,000, 1,000,000).
    o.apply(T0 + 61 * S, {"type": "advance"})
    assert o.take_effects()["charges"] == [("ar_2", 1_000_000, f"metergate:org_a:{T0}:auto_recharge:ar_2:{T0 + 61 * S}")]
    # failure of the charge in flight pauses.
    o.apply(T0 + 62 * S, {"type": "settle", "charge_id": "ar_2", "succeeded": False, "amount_micros": 1_000_000,
                          "payment_id": "pi_ar2", "reason": "card_declined"})
    assert o.take_effects()["events"] == [("auto_recharge.failed", {
        "charge_id": "ar_2", "amount_micros": 1_000_000, "payment_intent_id": "pi_ar2",
        "reason": "card_declined", "balance_micros": 1_010_000})]
    assert o.observe()["recharge"]["paused"] is True
    # a new card lifts the pause; 2 charges already asked today (max 2) → daily_limit, once.
    o.apply(T0 + 200 * S, {"type": "set_card", "present": True})
    o.apply(T0 + 300 * S, {"type": "advance"})
    fx = o.take_effects()
    assert fx["charges"] == []
    assert fx["events"] == [("auto_recharge.failed", {"reason": "daily_limit", "max_per_day": 2,
                                                      "balance_micros": 1_010_000})]
    # the next UTC day the held-back charge goes out.
    o.apply(T0 + DAY, {"type": "advance"})
    assert [c[0] for c in o.take_effects()["charges"]] == ["ar_3"]


def test_dunning_news_order_and_paid_org_not_suspended():
    o = org(prepaid=False)
    fail = lambda s, iid: {"type": "invoice_failed", "since_us": s, "suspend_after_s": 60, "degrade_after_s": 120,
                           "downgrade_after_s": 86_400, "free_plan_id": "free", "free_plan_version": 1,
                           "invoice_id": iid}
    # a payment with no invoice id and no dunning: latest news = T0, the org has paid an invoice.
    o.apply(T0, {"type": "invoice_paid", "as_of_us": T0, "invoice_id": None, "amount_paid_cents": None})
    o.apply(T0 + S, fail(T0 - S, None))                           # no invoice id, older than the news: ignored
    assert o.observe()["dunning_step"] is None
    o.apply(T0 + S, {"type": "invoice_paid", "as_of_us": T0, "invoice_id": "in_old", "amount_paid_cents": 700})
    o.apply(T0 + S, fail(T0 - S, "in_old"))                       # that invoice was settled: ignored
    assert o.observe()["dunning_step"] is None
    o.apply(T0 + S, fail(T0 + S, "in_2"))                         # dunning from T0 + 1 s
    o.take_effects()
    # T0 + 121 s: steps 1 and 2 due; the org paid an invoice before → not suspended; degraded.
    o.apply(T0 + 121 * S, {"type": "advance"})
    ob = o.observe()
    assert (ob["dunning_step"], ob["suspended"], ob["degraded"]) == (2, False, True)
    assert o.take_effects()["events"] == []
    assert o.apply(T0 + 121 * S, {"type": "gate", "action": "purchase", "resources": {}}) == {"reason": "degraded"}
    # a payment naming another invoice: the unpaid list keeps in_2, dunning runs on.
    o.apply(T0 + 200 * S, {"type": "invoice_paid", "as_of_us": T0 + 200 * S, "invoice_id": "in_x",
                           "amount_paid_cents": 500})
    assert o.observe()["dunning_step"] == 2
    o.apply(T0 + 300 * S, {"type": "invoice_paid", "as_of_us": T0 + 300 * S, "invoice_id": "in_2",
                           "amount_paid_cents": 500})
    assert o.take_effects()["events"] == [("org.unsuspended", {"was_suspended": False, "step": 2,
                                                               "past_due_since": "2026-03-02T00:00:01Z"})]


def test_random_sequences_keep_the_ledger_equal_to_the_balance():
    # Not hand-computed: a self-consistency check. Every balance change is in the ledger
    # (credits +A, expirations, usage −taken, refunds, debits), so the sum of ledger amounts
    # equals the balance; and applying `advance` at the same now twice changes nothing the
    # second time (1.2).
    import random
    rnd = random.Random(7)
    for trial in range(30):
        o = org(plan=rnd.choice(["payg", "hobby_weekly", "free", "metered"]), prepaid=rnd.random() < 0.6,
                low_balance_micros=rnd.choice([0, 1_000_000]))
        total = sum(e[1] for e in o.take_effects()["ledger"])
        now = T0
        for step in range(150):
            now += rnd.choice([0, S, MIN, HOUR, DAY, 3 * DAY])
            k = rnd.random()
            if k < 0.25:
                cmd = {"type": "usage", "ticks": [{"tick_id": f"t{rnd.randrange(300)}", "lease_id": rnd.choice(["", "l1", "l2"]),
                                                   "duration_ms": rnd.randrange(0, 600_000), "memory_mb": rnd.choice([0, 512, 4096]),
                                                   "cpu_count": rnd.choice([0, 1, 4]), "disk_mb": rnd.choice([0, 10_240]),
                                                   "units": rnd.choice([None, {"op": rnd.randrange(0, 3_000_000)}, {"zz": 1}])}
                                                  for _ in range(rnd.randrange(1, 4))]}
            elif k < 0.40:
                cmd = credit(rnd.choice(["grant", "topup", "adjustment"]), rnd.randrange(1, 3_000_000),
                             rnd.choice([None, now + rnd.randrange(0, 5 * DAY), now - S]),
                             rnd.choice([None, "pi_1", "pi_2"]))
            elif k < 0.48:
                cmd = debit(rnd.choice(["refund", "adjustment"]), rnd.randrange(1, 3_000_000))
            elif k < 0.55:
                cmd = refund(f"re_{rnd.randrange(20)}", rnd.choice(["pi_1", "pi_2"]), rnd.randrange(1, 2_000_000))
            elif k < 0.63:
                cmd = {"type": "acquire", "lease_id": rnd.choice(["l1", "l2", "l3"]), "resources": RES, "ttl_s": rnd.choice([1, 60, 3600])}
            elif k < 0.68:
                cmd = {"type": "set_card", "present": rnd.random() < 0.8}
            elif k < 0.73:
                cmd = {"type": "set_auto_recharge", "enabled": True, "threshold_micros": 1_000_000,
                       "amount_micros": 2_000_000, "max_per_day": 2, "cooldown_s": 60}
            elif k < 0.80 and o.observe()["recharge"] and o.observe()["recharge"]["pending_id"]:
                rc = o.observe()["recharge"]
                cmd = {"type": "settle", "charge_id": rc["pending_id"], "succeeded": rnd.random() < 0.7,
                       "amount_micros": rc["pending_micros"], "payment_id": rnd.choice(["pi_1", "pi_3"]), "reason": "x"}
            elif k < 0.84:
                cmd = {"type": "set_plan", "plan_id": rnd.choice(["payg", "hobby_weekly", "free"]), "plan_version": 1}
            elif k < 0.88:
                cmd = {"type": "subscription_period", "start_us": now - rnd.randrange(0, 10 * DAY),
                       "end_us": rnd.choice([None, now + rnd.randrange(1, 20 * DAY)])}
            elif k < 0.92:
                cmd = {"type": rnd.choice(["halt", "resume"])}
            else:
                cmd = {"type": "advance"}
            o.apply(now, cmd)
            total += sum(e[1] for e in o.take_effects()["ledger"])
            assert total == o.observe()["balance_micros"], (trial, step, cmd)
            # (one advance first: after a settlement the check may ask at the next command, 9.4)
            o.apply(now, {"type": "advance"})
            total += sum(e[1] for e in o.take_effects()["ledger"])
            before = o.observe()
            o.apply(now, {"type": "advance"})
            assert o.take_effects() == {"ledger": [], "events": [], "charges": [], "periods": []}
            assert o.observe() == before


def test_the_model_imports_nothing_of_metergate():
    """The model is a second statement of the rules: written from the rules page, it may not
    borrow the engine's code (a rule wrong the same way twice would pass)."""
    import ast
    from pathlib import Path

    ours = ("actors", "serve_app", "storage", "config", "metergate_client", "cli")
    for path in Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ours], (path.name, names)
