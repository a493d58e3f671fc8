"""Where two features meet, the money stays exact (issue 17's reproduced defects).

Each test is a scenario that failed before its fix, named for what must hold. Numbers are
worked out by hand from docs/concepts/billing-rules.md and config/catalog.toml.
"""

from __future__ import annotations

import msgspec
import pytest

from actors.commands import (AcquireLease, Advance, ApplyUsage, Credit, RefundPayment, ReleaseLease, ResetPeriod,
                             SetAlerts, SetAutoRecharge, SetPlan, SettleRecharge, execute)
from actors.org import Effects, LeaseEnded, Resources
from actors.ticks import Tick
from actors.timeutil import rfc3339_to_us
from actors.usage import bill_ticks
from tests.helpers import CATALOG, DAY_US, PAYG, T0, make_org, usage_costing

US = 1_000_000
SIGNUP = CATALOG.signup_grant_micros  # 5 USD
HOUR_US = 3_600 * US


def run(org, command, at: int) -> Effects:
    fx = Effects()
    execute(org, command, CATALOG, at, fx)
    return fx


# ----- 1. a plan switch never shortens the periods after it ------------------------------


def test_a_plan_switch_on_a_subscription_cycle_keeps_every_later_period_a_whole_cycle():
    """`PUT /plan hobby_weekly` on a Sunday at 23:00 used to give one-hour periods, each with a
    fresh 5 USD quota, until the next renewal."""
    org, _ = make_org(plan=PAYG)
    cycle_start = rfc3339_to_us("2026-03-01T00:00:00Z")
    cycle_end = rfc3339_to_us("2026-03-31T00:00:00Z")  # a 30-day subscription period
    run(org, ResetPeriod(cycle_start, cycle_end), T0)
    sunday_23h = rfc3339_to_us("2026-03-08T23:00:00Z")
    run(org, SetPlan("hobby_weekly", 1), sunday_23h)
    assert (org.period_start_us, org.period_end_us) == (cycle_start, cycle_end)  # not cut

    archived = []
    for hour in range(1, 24 * 70):  # ten weeks, an hour at a time
        archived += run(org, Advance(), sunday_23h + hour * HOUR_US).periods
    # Only whole cycles ended: the running one at 03-31, the next at 04-30 (30 days each).
    assert [(p.start_us, p.end_us) for p in archived] == [
        (cycle_start, cycle_end), (cycle_end, cycle_end + 30 * DAY_US)]
    assert org.period_end_us - org.period_start_us == 30 * DAY_US


def test_a_subscription_period_reported_late_does_not_shorten_the_periods_after_it():
    """A new billing cycle (the subscription's anchor moved) reported an hour into it starts a
    new period then; the periods after it take the whole cycle, not the hour-short rest."""
    org, _ = make_org(plan=PAYG)
    first = rfc3339_to_us("2026-03-01T00:00:00Z")
    run(org, ResetPeriod(first, first + 30 * DAY_US), T0)
    moved = rfc3339_to_us("2026-03-15T10:00:00Z")  # the cycle restarts: 03-15 10:00 to 04-15 10:00
    cycle_us = rfc3339_to_us("2026-04-15T10:00:00Z") - moved
    fx = run(org, ResetPeriod(moved, moved + cycle_us), moved + HOUR_US)
    assert [p.end_us for p in fx.periods] == [moved + HOUR_US]  # the old period, up to the report
    assert (org.period_start_us, org.period_end_us) == (moved + HOUR_US, moved + cycle_us)
    fx = run(org, Advance(), moved + cycle_us + US)
    assert (org.period_start_us, org.period_end_us) == (moved + cycle_us, moved + 2 * cycle_us)


def test_a_plan_switch_on_the_calendar_moves_the_end_to_the_new_kind_and_keeps_the_quota_used():
    org, _ = make_org(plan=PAYG)  # month: 2026-03
    org.apply_usage([usage_costing(2 * US)], T0 + US, Effects())
    wednesday = rfc3339_to_us("2026-03-18T12:00:00Z")
    fx = run(org, SetPlan("hobby_weekly", 1), wednesday)
    assert fx.periods == []
    assert (org.period_key, org.period_start_us, org.period_end_us) == (
        "2026-W12", rfc3339_to_us("2026-03-01T00:00:00Z"), rfc3339_to_us("2026-03-23T00:00:00Z"))
    assert org.period_usage_micros == 2 * US  # usage so far stays in the running period
    fx = run(org, Advance(), rfc3339_to_us("2026-03-30T00:00:00Z"))
    assert (org.period_key, org.period_end_us - org.period_start_us) == ("2026-W14", 7 * DAY_US)


# ----- 2. a late auto-recharge settlement never asks for a second charge ------------------


def test_a_late_auto_recharge_settlement_credits_once_and_asks_for_no_second_charge():
    """Threshold 3 USD, amount 10 USD, cooldown 60 s: settling ar_1 131 s after it was asked
    for used to clear it, run the check on the old balance, and ask for ar_2."""
    org, _ = make_org(card=True)  # 5 USD signup grant
    run(org, SetAutoRecharge(True, 3 * US, 10 * US, 3, 60), T0)
    fx = Effects()
    org.apply_usage([usage_costing(4 * US)], T0 + US, fx)  # 1 USD left: under the threshold
    assert [(c.charge_id, c.amount_micros) for c in fx.charges] == [("ar_1", 10 * US)]
    settled = run(org, SettleRecharge.of_payment("ar_1", True, 10 * US, "pi_ar_1"), T0 + 132 * US)
    assert org.balance_micros == 11 * US
    assert settled.charges == [] and org.pending_charge() is None
    assert [e.type for e in settled.events] == ["auto_recharge.succeeded"]
    assert run(org, Advance(), T0 + 200 * US).charges == []  # 11 USD is above 3 USD: nothing later either


# ----- 4, 5. a refund claws back only what its payment bought -----------------------------


def refund(org, refund_id: str, payment_id: str, micros: int, at: int) -> Effects:
    return run(org, RefundPayment(refund_id, payment_id, micros, None, f"stripe:refund:{refund_id}"), at)


def topup(org, micros: int, payment_id: str, at: int, expires_at_us: int | None = None) -> Effects:
    return run(org, Credit("topup", micros, expires_at_us, None, f"stripe:payment:{payment_id}", payment_id), at)


def test_a_refund_of_a_tier_invoice_claws_back_no_credit():
    """`charge.refunded` of a subscription's invoice used to become a negative credit."""
    org, _ = make_org()
    topup(org, 20 * US, "pi_topup", T0)
    fx = refund(org, "re_sub", "pi_invoice_of_pro", 20 * US, T0 + US)
    assert fx.ledger == [] and org.balance_micros == SIGNUP + 20 * US


def test_a_refund_of_a_pack_that_lapsed_unused_takes_no_other_credit_and_makes_no_debt():
    """Top up 20, buy the 50 USD pack that expires, let it lapse, refund it: the top-up used to
    be taken and 30 USD of debt made, halting a prepaid org."""
    org, _ = make_org()
    topup(org, 20 * US, "pi_topup", T0)
    topup(org, 50 * US, "pi_pack", T0 + US, expires_at_us=T0 + 30 * DAY_US)
    lapsed = run(org, Advance(), T0 + 30 * DAY_US)
    assert [(e.kind, e.amount_micros) for _, e in lapsed.ledger] == [("expiration", -50 * US)]
    fx = refund(org, "re_pack", "pi_pack", 50 * US, T0 + 31 * DAY_US)
    assert fx.ledger == []
    assert (org.balance_micros, org.debt_micros, org.halted) == (SIGNUP + 20 * US, 0, None)


def test_a_refund_takes_at_most_what_remains_of_its_payments_credit():
    org, _ = make_org()
    topup(org, 20 * US, "pi_a", T0)
    topup(org, 10 * US, "pi_b", T0 + US)
    org.apply_usage([usage_costing(SIGNUP + 15 * US)], T0 + 2 * US, Effects())  # signup, then 15 of pi_a
    fx = refund(org, "re_a", "pi_a", 20 * US, T0 + 3 * US)
    assert [(e.kind, e.amount_micros, e.grant_id) for _, e in fx.ledger] == [("refund", -5 * US, "gr_2")]
    assert org.balance_micros == 10 * US and [g.payment_id for g in org.grants] == ["pi_b"]
    assert refund(org, "re_a", "pi_a", 20 * US, T0 + 4 * US).ledger == []  # the same refund again


def test_a_refund_that_arrives_before_its_payments_credit_reduces_that_credit():
    """A retried checkout event can land after the refund of its payment."""
    org, _ = make_org()
    early = refund(org, "re_early", "pi_late", 4 * US, T0)
    assert early.ledger == [] and org.balance_micros == SIGNUP
    fx = topup(org, 10 * US, "pi_late", T0 + 3_600 * US)
    assert [(e.kind, e.amount_micros) for _, e in fx.ledger] == [("topup", 10 * US), ("refund", -4 * US)]
    assert org.balance_micros == SIGNUP + 6 * US
    later = topup(org, 10 * US, "pi_other", T0 + 7_200 * US)  # another payment: not reduced
    assert [(e.kind, e.amount_micros) for _, e in later.ledger] == [("topup", 10 * US)]


def test_a_waiting_refund_stops_waiting_after_thirty_days():
    org, _ = make_org()
    refund(org, "re_old", "pi_slow", 4 * US, T0)
    fx = topup(org, 10 * US, "pi_slow", T0 + 31 * DAY_US)
    assert [(e.kind, e.amount_micros) for _, e in fx.ledger] == [("topup", 10 * US)]


# ----- 3, 9. ticks: units billed once, on the plan the org is on when they are applied ----


def units_catalog():
    """The shipped catalog with a priced unit, `gpu_s`, on payg only (hobby does not price it),
    and a payg version 2 from 2026-04-01 that no longer prices it."""
    import tomllib

    from config.catalog import parse_catalog
    from config.settings import DEFAULT_CATALOG

    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    payg = next(p for p in raw["plans"] if p["id"] == "payg")
    payg["unit_nanos"] = {"ingest_bytes": 0, "gpu_s": 250_000}  # 0.25 mUSD a GPU-second
    payg["effective_until"] = "2026-04-01T00:00:00Z"
    raw["plans"].append({**payg, "version": 2, "effective_from": "2026-04-01T00:00:00Z",
                         "unit_nanos": {"ingest_bytes": 0}})
    del raw["plans"][-1]["effective_until"]
    return parse_catalog(raw)


def gpu_tick(n: int, lease_id: str = "ls_gpu", gpu_s: int = 100) -> Tick:
    return Tick(f"t{n}", "org_1", lease_id, T0, 1_000, 0, 0, 0, {"gpu_s": gpu_s}, n)


def test_priced_units_of_several_ticks_on_one_lease_are_billed_once_each():
    """Three ticks of 100 GPU-seconds on one lease used to bill 500 (a shallow copy shared the
    lease's and the rollup's units): 300 × 250,000 nanos = 75,000 µUSD."""
    catalog = units_catalog()
    org, _ = make_org(plan=catalog.plan_version("payg", 1), signup_micros=0, card=True)
    run(org, Credit("grant", 100_000), T0)
    fx = Effects()
    billed = bill_ticks(org, [gpu_tick(1), gpu_tick(2), gpu_tick(3)], catalog, T0 + US, fx)
    (usage,) = billed.commands[-1].usages
    assert usage.units == {"gpu_s": 300}
    assert [(e.kind, e.amount_micros) for _, e in fx.ledger] == [("usage", -75_000)]
    assert [t.units for t in billed.ticks] == [{"gpu_s": 100}] * 3  # each tick still its own
    # The shard's old path: a copy made with structs.replace shares its units with the original
    # (the rollup's); adding to the copy must leave the original as it was.
    rollup = gpu_tick(4).usage()
    lease = msgspec.structs.replace(rollup)
    lease.add(gpu_tick(5).usage())
    assert (rollup.units, lease.units) == ({"gpu_s": 100}, {"gpu_s": 200})


def test_a_unit_the_plan_no_longer_prices_rejects_that_tick_alone_after_a_plan_switch():
    """A SetPlan earlier in the same batch used to raise UnknownUnit inside apply_usage, and the
    whole usage request was answered internal_error."""
    catalog = units_catalog()
    org, _ = make_org(plan=catalog.plan_version("payg", 1))
    execute(org, SetPlan("hobby_weekly", 1), catalog, T0 + US, Effects())
    plain = Tick("t_plain", "org_1", "ls", T0, 1_000, 1024, 0, 0, None, 1)
    billed = bill_ticks(org, [gpu_tick(0), plain], catalog, T0 + US, Effects())
    assert [t.tick_id for t in billed.unpriced] == ["t0"]
    assert [t.tick_id for t in billed.ticks] == ["t_plain"]


def test_a_unit_a_new_periods_plan_version_drops_rejects_that_tick_alone():
    catalog = units_catalog()
    org, _ = make_org(plan=catalog.plan_version("payg", 1))
    april = rfc3339_to_us("2026-04-01T00:00:05Z")
    billed = bill_ticks(org, [gpu_tick(0)], catalog, april, Effects())
    assert isinstance(billed.commands[0], Advance) and org.plan.version == 2  # time first, then units
    assert [t.tick_id for t in billed.unpriced] == ["t0"] and billed.ticks == []


# ----- 6. a tick or a lease that comes back too late is refused, never billed twice -------


def test_a_tick_older_than_its_id_is_remembered_is_rejected_not_billed_again():
    from actors.ticks import decode_usage, max_tick_age_us

    window = max_tick_age_us(26 * 3_600)  # the default retention, less the hour's margin
    assert window == 25 * HOUR_US
    body = msgspec.json.encode({"ticks": [
        {"tick_id": "old", "org_id": "org_1", "started_at": T0 - window - US, "duration_ms": 1_000},
        {"tick_id": "ok", "org_id": "org_1", "started_at": T0 - window + US, "duration_ms": 1_000}]})
    valid, bad = decode_usage(body, T0, 10, window)
    assert [t.tick_id for t in valid] == ["ok"]
    ((index, _, error),) = bad
    assert index == 0 and error.startswith("tick_too_old:")


def test_a_late_retry_of_a_lease_take_after_its_release_makes_no_phantom_lease():
    org, _ = make_org()
    assert run_lease(org, "sbx_1", T0).created
    run(org, ReleaseLease("sbx_1"), T0 + US)
    with pytest.raises(LeaseEnded):
        execute(org, AcquireLease("sbx_1", Resources(), 60), CATALOG, T0 + 2 * US, Effects())
    assert org.leases is None
    # A release that overtook its take counts too; after an hour the id may be used again.
    run(org, ReleaseLease("sbx_2"), T0 + 3 * US)
    with pytest.raises(LeaseEnded):
        execute(org, AcquireLease("sbx_2", Resources(), 60), CATALOG, T0 + 4 * US, Effects())
    assert run_lease(org, "sbx_1", T0 + US + HOUR_US + US).created


def run_lease(org, lease_id: str, at: int):
    fx = Effects()
    return execute(org, AcquireLease(lease_id, Resources(), 60), CATALOG, at, fx)


# ----- 10. the documented balance.threshold_crossed is emitted ---------------------------


def test_balance_threshold_crossed_is_emitted_once_per_fall_under_the_threshold():
    org, fx = make_org(low_balance_micros=1_000_000)  # 5 USD signup grant, alert under 1 USD
    assert fx.events == []
    spent = run(org, ApplyUsage([usage_costing(4_500_000)]), T0 + US)
    assert [(e.type, e.data) for e in spent.events] == [
        ("balance.threshold_crossed", {"threshold_micros": 1_000_000, "balance_micros": 500_000})]
    assert run(org, ApplyUsage([usage_costing(100_000)]), T0 + 2 * US).events == []  # still under: once
    run(org, Credit("grant", 2_000_000), T0 + 3 * US)  # back above: re-armed
    again = run(org, ApplyUsage([usage_costing(2_000_000)]), T0 + 4 * US)
    assert [e.type for e in again.events] == ["balance.threshold_crossed"]
    assert run(org, SetAlerts(0), T0 + 5 * US).events == []  # off
