"""The money core at its edges: exact instants, exact amounts, the caps, and the payloads
that other systems read. Each test pins down behaviour that mutation testing (`make
mutation`) found no test held: a comparison at its boundary, an amount off by one, an event
field. Numbers are worked out by hand from docs/concepts/billing-rules.md.
"""

from __future__ import annotations

import pytest

from actors.commands import (AcquireLease, Advance, ApplyUsage, Credit, InvoiceFailed, InvoicePaid, RefundPayment,
                             ResetPeriod, SetAlerts, SetAutoRecharge, SetLimits, SetPaymentMethod, SetPlan, SettleRecharge, Stale,
                             execute)
from actors.metering import LeaseUsage, cost_scaled
from actors.money import MAX_GRANTS_PER_ORG
from actors.org import BillingError, Effects, Resources
from actors.recharge import US_PER_DAY
from actors.refunds import MAX_REFUNDS_WAITING, REFUND_MEMORY_S, REFUND_WAIT_S
from tests.helpers import CATALOG, DAY_US, HOBBY, PAYG, T0, make_org, usage_costing

US = 1_000_000
POLICY = (3 * 86_400, 7 * 86_400, 14 * 86_400, "free", 1)


def run(org, command, at: int) -> Effects:
    fx = Effects()
    execute(org, command, CATALOG, at, fx)
    # What the shard writes them under: every effect is this org's and of this instant.
    assert all(org_id == org.org_id and entry.at_us == at for org_id, entry in fx.ledger), fx.ledger
    assert all(event.org_id == org.org_id and event.at_us == at for event in fx.events), fx.events
    assert all(c.org_id == org.org_id and c.requested_us == at for c in fx.charges), fx.charges
    assert all(period.org_id == org.org_id for period in fx.periods), fx.periods
    return fx


def kinds(fx: Effects) -> list[tuple[str, int]]:
    return [(e.kind, e.amount_micros) for _, e in fx.ledger]


def events(fx: Effects) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in fx.events]


# ----- usage sums --------------------------------------------------------------------------


def test_ticks_of_one_lease_sum_every_quantity_before_they_are_priced():
    first = LeaseUsage("ls", memory_mb_ms=1_000, cpu_ms=20, disk_mb_ms=3_000, units={"a": 4}, ticks=1, duration_ms=10)
    second = LeaseUsage("ls", memory_mb_ms=500, cpu_ms=5, disk_mb_ms=7, units={"a": 1, "b": 2}, ticks=2, duration_ms=6)
    first.add(second)
    assert (first.memory_mb_ms, first.cpu_ms, first.disk_mb_ms, first.ticks, first.duration_ms) == (1_500, 25, 3_007, 3, 16)
    assert first.units == {"a": 5, "b": 2} and second.units == {"a": 1, "b": 2}
    plain = LeaseUsage("ls", memory_mb_ms=1)
    plain.add(LeaseUsage("ls", units={"a": 3}))  # units onto a usage that had none
    assert plain.units == {"a": 3}
    plan = PAYG
    whole = cost_scaled(plan, LeaseUsage("ls", memory_mb_ms=1_500, cpu_ms=25, disk_mb_ms=3_007))
    assert whole == 4_500 * 1_500 + 30 * 3_007 + 14_000 * 25 * 1_024


# ----- what time changes, at the very instant ---------------------------------------------


def test_a_grant_a_lease_and_a_dunning_step_due_at_one_instant_all_happen_in_one_advance():
    org, _ = make_org()
    run(org, Credit("grant", US, T0 + 60 * US), T0)
    run(org, AcquireLease("ls", Resources(), 60), T0)
    run(org, InvoiceFailed(T0 - 3 * DAY_US + 60 * US, *POLICY), T0)
    fx = run(org, Advance(), T0 + 60 * US)
    assert kinds(fx) == [("expiration", -US)]
    assert {t for t, _ in events(fx)} == {"lease.expired", "org.suspended"}
    assert org.leases is None and org.suspended


def test_a_read_at_the_instant_a_grant_or_lease_expires_no_longer_counts_it():
    org, _ = make_org(signup_micros=0, card=True)
    run(org, Credit("grant", US, T0 + 60 * US), T0)
    run(org, SetLimits(None, {"us": {"a100": 2}}), T0)
    run(org, AcquireLease("gpu", Resources(machine_type="a100", region="us", quantity=2), 60), T0)
    at = T0 + 60 * US
    assert org.balance_at(at - 1) == US and org.balance_at(at) == 0
    assert org.gate("create", Resources(), at - 1).allowed
    assert org.gate("create", Resources(), at).reason == "halted"  # as of `at`: the expiry halts it
    run(org, Credit("grant", 2 * US), at - 10)  # a second grant: reads add them up
    assert org.balance_at(at - 1) == 3 * US and org.balance_at(at) == 2 * US
    spent, _ = make_org(signup_micros=0, card=True)
    run(spent, Credit("topup", 1), T0)
    spent.apply_usage([usage_costing(4)], T0 + 1, Effects())
    assert spent.balance_at(T0 + 2) == -3  # debt counts against the balance
    assert org.machines_in_use_at(at - 1) == {"us": {"a100": 2}} and org.machines_in_use_at(at) == {}
    assert org.active_leases_at(at) == 0


def test_a_credit_that_expires_at_the_instant_it_is_booked_lapses_at_once():
    org, _ = make_org()
    fx = run(org, Credit("grant", 2 * US, T0), T0)
    assert kinds(fx) == [("grant", 2 * US), ("expiration", -2 * US)]


# ----- taking money: exact amounts ---------------------------------------------------------


def test_a_grant_left_with_one_micro_is_kept_and_the_next_take_spans_grants_exactly():
    org, _ = make_org(signup_micros=0, card=True)
    run(org, Credit("grant", 3), T0)
    run(org, Credit("topup", 10), T0)
    org.apply_usage([usage_costing(2)], T0 + 1, Effects())  # the grant keeps 1
    assert [(g.kind, g.remaining_micros) for g in org.grants] == [("grant", 1), ("topup", 10)]
    org.apply_usage([usage_costing(5)], T0 + 2, Effects())  # 1 from the grant, 4 from the top-up
    assert [(g.kind, g.remaining_micros) for g in org.grants] == [("topup", 6)] and org.debt_micros == 0


def test_debt_adds_up_over_usage_and_the_next_credit_pays_it_all_first():
    org, _ = make_org(signup_micros=0, card=True, prepaid=True)
    run(org, Credit("topup", 1), T0)
    org.apply_usage([usage_costing(3)], T0 + 1, Effects())
    org.apply_usage([usage_costing(4)], T0 + 2, Effects())
    assert (org.debt_micros, org.balance_micros) == (6, -6)
    fx = run(org, Credit("topup", 6, payment_id="pi_all_debt"), T0 + 3)  # all to debt: no grant
    assert kinds(fx) == [("topup", 6)] and org.grants is None and org.debt_micros == 0


def test_the_grant_cap_refuses_an_operators_credit_at_exactly_1000_and_never_money_paid():
    org, _ = make_org(signup_micros=0)
    for _ in range(MAX_GRANTS_PER_ORG - 1):
        run(org, Credit("grant", 1), T0)
    run(org, Credit("grant", 1), T0)  # the 1,000th
    assert len(org.grants) == MAX_GRANTS_PER_ORG
    with pytest.raises(BillingError):
        execute(org, Credit("adjustment", 1), CATALOG, T0, Effects())
    assert org.grant_seq == MAX_GRANTS_PER_ORG  # refused before anything moved
    run(org, Credit("topup", 5, payment_id="pi_cap"), T0)
    assert len(org.grants) == MAX_GRANTS_PER_ORG + 1


# ----- halts and alerts at their thresholds ------------------------------------------------


def test_one_micro_of_credit_lifts_a_halt_for_balance():
    org, _ = make_org(signup_micros=0)
    assert org.halted == "balance"
    fx = run(org, Credit("grant", 1), T0 + 1)
    assert org.halted is None and events(fx) == [("org.resumed", {"reason": "credit", "balance_micros": 1})]


def test_the_low_balance_alert_fires_under_the_threshold_not_at_it_and_rearms_at_it():
    org, _ = make_org(low_balance_micros=4 * US)
    assert events(run(org, ApplyUsage([usage_costing(US)]), T0 + 1)) == []  # exactly 4 USD: not under
    fx = run(org, ApplyUsage([usage_costing(1)]), T0 + 2)
    assert events(fx) == [("balance.threshold_crossed", {"threshold_micros": 4 * US, "balance_micros": 4 * US - 1})]
    run(org, Credit("grant", 1), T0 + 3)  # back at exactly the threshold: re-armed
    assert org.low_balance_armed is True
    assert [t for t, _ in events(run(org, ApplyUsage([usage_costing(1)]), T0 + 4))] == ["balance.threshold_crossed"]
    run(org, SetAlerts(2 * US), T0 + 5)  # a new threshold arms it again
    assert org.low_balance_armed is True and org.low_balance_micros == 2 * US


# ----- auto-recharge: amounts, boundaries, payloads ----------------------------------------


def armed(threshold: int, amount: int, per_day: int = 3, cooldown_s: int = 0):
    org, _ = make_org(card=True)
    run(org, SetAutoRecharge(True, threshold, amount, per_day, cooldown_s), T0)
    return org


def test_a_balance_exactly_at_the_threshold_asks_for_no_charge_one_micro_under_does():
    org = armed(threshold=4 * US, amount=500_000)
    assert run(org, ApplyUsage([usage_costing(US)]), T0 + 1).charges == []  # 4 USD exactly
    (charge,) = run(org, ApplyUsage([usage_costing(1)]), T0 + 2).charges
    # 3.999999 USD: the fewest whole cents strictly above 4 USD is 1 cent; the amount is 0.50 USD
    assert (charge.charge_id, charge.amount_micros, charge.requested_us) == ("ar_1", 500_000, T0 + 2)
    assert org.pending_charge() == charge


def test_a_charge_is_sized_in_whole_cents_strictly_above_the_threshold():
    org = armed(threshold=20 * US, amount=500_000)  # 5 USD: 15 USD + 1 µUSD short: 15.01 USD
    assert org.pending_charge().amount_micros == 15 * US + 10_000
    other = armed(threshold=5 * US + 10_000, amount=500_000)  # short by exactly one cent + 1 µUSD
    assert other.pending_charge().amount_micros == 500_000  # the amount covers it
    # 1.01 USD short leaves the balance exactly at the threshold: one more cent
    assert other.recharge_amount(5 * US - 9_999, T0) == 500_000 and other.recharge_amount(4 * US, T0) == 1_020_000


def test_the_daily_cap_and_a_settlement_emit_their_documented_payloads():
    org = armed(threshold=6 * US, amount=500_000, per_day=1)  # asks ar_1 at creation time
    (ar_1,) = [org.pending_charge()]
    fx = run(org, SettleRecharge.of_payment("ar_1", False, ar_1.amount_micros, "pi_no", "card_declined"), T0 + 1)
    assert events(fx) == [("auto_recharge.failed", {"charge_id": "ar_1", "amount_micros": ar_1.amount_micros,
                                                    "payment_intent_id": "pi_no", "reason": "card_declined",
                                                    "balance_micros": 5 * US})]
    fx = run(org, SetPaymentMethod(True), T0 + 2)  # a new card lifts the pause; today's cap is used up
    assert events(fx) == [("auto_recharge.failed", {"reason": "daily_limit", "max_per_day": 1, "balance_micros": 5 * US})]
    assert events(run(org, Advance(), T0 + 3)) == []  # said once a day
    assert org.next_due_us() == (T0 // US_PER_DAY + 1) * US_PER_DAY  # the next UTC day
    tomorrow = (T0 // US_PER_DAY + 1) * US_PER_DAY
    (ar_2,) = run(org, Advance(), tomorrow).charges
    fx = run(org, SettleRecharge.of_payment("ar_2", True, ar_2.amount_micros, "pi_ok"), tomorrow + 1)
    assert events(fx) == [("auto_recharge.succeeded", {"charge_id": "ar_2", "amount_micros": ar_2.amount_micros,
                                                       "payment_intent_id": "pi_ok",
                                                       "balance_micros": 5 * US + ar_2.amount_micros})]
    assert org.grants[-1].payment_id == "pi_ok"  # what the payment bought: a refund of it claws it back
    assert fx.ledger[0][1].note == "auto-recharge ar_2 (pi_ok)"
    clawed = run(org, RefundPayment("re_ar", "pi_ok", ar_2.amount_micros), tomorrow + 2)
    assert kinds(clawed) == [("refund", -ar_2.amount_micros)]


def test_no_charge_is_due_while_one_is_in_flight_paused_disabled_cardless_or_not_needed():
    org = armed(threshold=6 * US, amount=500_000, cooldown_s=600)  # ar_1 in flight
    assert org.next_due_us() == org.period_end_us
    run(org, SettleRecharge.of_payment("ar_1", False, 500_000, "pi_no"), T0 + 1)  # no reason given
    assert org.recharge.paused == "payment_failed" and org.next_due_us() == org.period_end_us
    run(org, SetPaymentMethod(True), T0 + 2)  # unpaused, held back by the cooldown
    assert org.next_due_us() == T0 + 600 * US
    run(org, SetPaymentMethod(False), T0 + 3)
    assert org.next_due_us() == org.period_end_us  # no card: nothing to wait for
    run(org, SetPaymentMethod(True), T0 + 4)
    run(org, SetAutoRecharge(False), T0 + 5)
    assert org.next_due_us() == org.period_end_us
    run(org, SetAutoRecharge(True, 5 * US, 500_000, 3, 600), T0 + 6)  # 5 USD is not under 5 USD
    assert org.pending_charge() is None and org.next_due_us() == org.period_end_us
    failed = armed(threshold=6 * US, amount=500_000)
    fx = run(failed, SettleRecharge.of_payment("ar_1", False, 500_000, "pi_f"), T0 + 1)
    assert events(fx)[0][1]["reason"] == "payment_failed"  # Stripe gave no code


def test_a_held_back_charge_is_due_when_the_cooldown_ends_and_not_before():
    org = armed(threshold=6 * US, amount=500_000, cooldown_s=600)
    run(org, SettleRecharge.of_payment("ar_1", True, 500_000, "pi_1"), T0 + US)  # 5.5 USD: still under
    assert org.next_due_us() == T0 + 600 * US  # the cooldown from when ar_1 was asked for
    assert run(org, Advance(), T0 + 600 * US - 1).charges == []
    assert [c.charge_id for c in run(org, Advance(), T0 + 600 * US).charges] == ["ar_2"]


def test_a_charge_grows_only_within_its_own_org():
    """A shard's batch gathers every org's charges in one list: growing one org's unsent ar_1
    must leave another org's ar_1 as it is."""
    org = armed(threshold=6 * US, amount=500_000)  # asks ar_1 at T0: 5 USD under 6 USD
    mine = org.pending_charge()
    others = mine.__class__("org_other", "ar_1", 777, "metergate:org_other:1:auto_recharge:ar_1", T0)
    shared = Effects()
    shared.charges += [others, mine]
    org.apply_usage([usage_costing(2 * US)], T0, shared)  # the same instant: 3 USD left
    assert shared.charges[0] is others
    assert shared.charges[1].amount_micros == org.pending_charge().amount_micros == 3 * US + 10_000


# ----- refunds: memory, waiting, payloads ---------------------------------------------------


def test_a_refund_is_remembered_for_exactly_180_days_and_waits_for_exactly_30():
    org, _ = make_org()
    assert not isinstance(execute(org, RefundPayment("re_1", "pi_none", US), CATALOG, T0, Effects()), Stale)
    assert isinstance(execute(org, RefundPayment("re_1", "pi_none", US), CATALOG, T0 + 1, Effects()), Stale)
    edge = T0 + REFUND_MEMORY_S * US
    assert isinstance(execute(org, RefundPayment("re_1", "pi_none", US), CATALOG, edge, Effects()), Stale)
    assert not isinstance(execute(org, RefundPayment("re_1", "pi_none", US), CATALOG, edge + 1, Effects()), Stale)
    waiting, _ = make_org()
    run(waiting, RefundPayment("re_w", "pi_late", US), T0)
    fx = run(waiting, Credit("topup", 3 * US, payment_id="pi_late"), T0 + REFUND_WAIT_S * US)  # exactly 30 days
    assert kinds(fx) == [("topup", 3 * US), ("refund", -US)]
    assert fx.ledger[1][1].idempotency_key is None and fx.ledger[1][1].grant_id == "gr_2"
    late, _ = make_org()
    run(late, RefundPayment("re_x", "pi_later", US), T0)
    assert kinds(run(late, Credit("topup", 3 * US, payment_id="pi_later"), T0 + REFUND_WAIT_S * US + 1)) == [
        ("topup", 3 * US)]


def test_a_waiting_refund_is_applied_once_keyed_and_only_the_100_newest_wait():
    org, _ = make_org()
    run(org, RefundPayment("re_1", "pi_1", US, "Stripe refund re_1", "stripe:refund:re_1"), T0)
    first = run(org, Credit("topup", 5 * US, payment_id="pi_1"), T0 + 1)
    assert kinds(first) == [("topup", 5 * US), ("refund", -US)]
    assert first.ledger[1][1].idempotency_key == "stripe:refund:re_1"
    assert first.ledger[1][1].note == "Stripe refund re_1"
    again = run(org, Credit("topup", 5 * US, payment_id="pi_1"), T0 + 2)  # the same payment once more
    assert kinds(again) == [("topup", 5 * US)]
    crowd, _ = make_org()
    for n in range(MAX_REFUNDS_WAITING + 1):
        run(crowd, RefundPayment(f"re_{n}", f"pi_{n}", 1), T0)
    assert kinds(run(crowd, Credit("topup", 5, payment_id="pi_0"), T0 + 1)) == [("topup", 5)]  # the oldest stopped
    assert kinds(run(crowd, Credit("topup", 5, payment_id="pi_1"), T0 + 1)) == [("topup", 5), ("refund", -1)]


def test_a_refund_that_takes_money_halts_a_prepaid_org_at_zero_and_its_entry_names_the_grant():
    org, _ = make_org(signup_micros=0, card=True)
    run(org, Credit("topup", 2 * US, payment_id="pi_only"), T0)
    fx = run(org, RefundPayment("re_all", "pi_only", 2 * US, "Stripe refund re_all of pi_only"), T0 + 1)
    assert [(e.kind, e.amount_micros, e.grant_id, e.note, e.at_us) for _, e in fx.ledger] == [
        ("refund", -2 * US, "gr_1", "Stripe refund re_all of pi_only", T0 + 1)]
    assert org.halted == "balance" and [t for t, _ in events(fx)] == ["org.halted"]


def test_a_refund_finds_a_grant_booked_before_grants_kept_their_payment_by_its_grant_id():
    org, _ = make_org()
    run(org, Credit("topup", 10 * US), T0)  # as the version before booked it: no payment on the grant
    assert org.grants[-1].payment_id is None
    fx = run(org, RefundPayment("re_old", "pi_old", 4 * US, None, "stripe:refund:re_old", "gr_2"), T0 + 1)
    assert kinds(fx) == [("refund", -4 * US)] and fx.ledger[0][1].grant_id == "gr_2"
    run(org, Credit("topup", 5 * US, payment_id="pi_new"), T0 + 2)
    # A payment a grant names wins over a grant id: the id only finds grants booked before.
    fx = run(org, RefundPayment("re_new", "pi_new", US, None, None, "gr_2"), T0 + 3)
    assert kinds(fx) == [("refund", -US)] and fx.ledger[0][1].grant_id == "gr_3"


# ----- periods and dunning at their boundaries ---------------------------------------------


def test_a_subscription_period_ending_now_is_not_taken_as_the_running_periods_end():
    org, _ = make_org(plan=PAYG)
    run(org, ResetPeriod(T0 - DAY_US, T0 + 30 * DAY_US), T0)
    end_before = org.period_end_us
    run(org, ResetPeriod(T0, T0 + US), T0 + US)  # a new cycle whose end is this very instant
    assert org.period_start_us == T0 + US and org.period_end_us > T0 + US and org.period_end_us != end_before


def test_a_subscription_reset_lifts_a_halt_for_balance_with_reason_period():
    org, _ = make_org(plan=HOBBY, signup_micros=0)
    org.apply_usage([usage_costing(5 * US)], T0 + 1, Effects())
    run(org, ResetPeriod(T0 - DAY_US, T0 + 6 * DAY_US), T0 + 2)
    assert org.halted == "balance"
    fx = run(org, ResetPeriod(T0 + 3, T0 + 7 * DAY_US), T0 + 3)
    assert org.halted is None
    assert ("org.resumed", {"reason": "period", "balance_micros": 0}) in events(fx)


def test_a_plan_change_that_leaves_no_quota_halts_with_the_halt_event():
    org, _ = make_org(plan=HOBBY, signup_micros=0)
    org.apply_usage([usage_costing(2 * US)], T0 + 1, Effects())  # 2 of hobby's 5 USD used
    fx = run(org, SetPlan("free", 1), T0 + 2)  # free: 1 USD a week, already used up
    assert org.halted == "balance" and [t for t, _ in events(fx)] == ["org.halted"]


def test_invoice_news_at_the_same_instant_applies_and_a_second_failed_invoice_joins_the_list():
    org, _ = make_org()
    run(org, InvoicePaid(T0, None, 500), T0)
    run(org, InvoiceFailed(T0, *POLICY, "in_a"), T0 + 1)  # the same instant as the payment: applies
    assert org.dunning is not None
    run(org, InvoiceFailed(T0 + 2, *POLICY, "in_b"), T0 + 2)
    assert org.dunning.invoice_ids == ["in_a", "in_b"] and org.past_due_since_us == T0
    run(org, InvoicePaid(T0 + 3, "in_a", 500), T0 + 3)
    assert org.dunning.invoice_ids == ["in_b"]
    run(org, InvoicePaid(T0 + 4, "in_other", 500), T0 + 4)  # another invoice: in_b still unpaid
    assert org.dunning is not None
    fx = run(org, InvoicePaid(T0 + 5, "in_b", 500), T0 + 5)
    assert org.dunning is None and [t for t, _ in events(fx)] == ["org.unsuspended"]
    run(org, InvoiceFailed(T0 + 6, *POLICY), T0 + 6)  # no id: any payment not older ends it
    run(org, InvoicePaid(T0 + 5, None, 500), T0 + 7)  # older than the failure: stands
    assert org.dunning is not None
    run(org, InvoicePaid(T0 + 6, None, 500), T0 + 8)
    assert org.dunning is None


def test_a_failure_reported_days_late_takes_the_steps_already_due_at_once():
    org, _ = make_org()
    run(org, InvoiceFailed(T0 - 5 * DAY_US, *POLICY, "in_a"), T0 - DAY_US)
    fx = run(org, InvoiceFailed(T0 - 4 * DAY_US, *POLICY), T0)  # no id: the list keeps only in_a
    assert org.dunning.invoice_ids == ["in_a"]
    late, _ = make_org()
    fx = run(late, InvoiceFailed(T0 - 4 * DAY_US, *POLICY, "in_b"), T0)
    assert late.suspended and [t for t, _ in events(fx)] == ["org.suspended"]


def test_a_tier_decision_as_old_as_the_last_applies_and_an_older_one_is_stale():
    from actors.commands import SetTier

    org, _ = make_org()
    assert not isinstance(execute(org, SetTier("pro", 100, T0), CATALOG, T0, Effects()), Stale)
    assert not isinstance(execute(org, SetTier("base", 5, T0), CATALOG, T0 + 1, Effects()), Stale)
    assert org.tier == "base"
    assert isinstance(execute(org, SetTier("pro", 100, T0 - 1), CATALOG, T0 + 2, Effects()), Stale)
    assert org.tier == "base"


def test_ended_lease_ids_are_kept_per_id_refreshed_when_ended_again_and_at_most_1000():
    from actors.commands import ReleaseLease
    from actors.leases import MAX_ENDED_LEASES
    from actors.org import LeaseEnded

    org, _ = make_org()
    run(org, ReleaseLease("a"), T0)
    run(org, ReleaseLease("b"), T0)
    run(org, ReleaseLease("a"), T0 + 50 * 60 * US)  # ended again: remembered from now
    for lease_id in ("a", "b"):
        with pytest.raises(LeaseEnded):
            execute(org, AcquireLease(lease_id, Resources(), 60), CATALOG, T0 + 60 * 60 * US, Effects())
    assert isinstance(execute(org, AcquireLease("b", Resources(), 60), CATALOG, T0 + 60 * 60 * US + 1, Effects()),
                      type(execute(org, AcquireLease("c", Resources(), 60), CATALOG, T0 + 60 * 60 * US + 1, Effects())))
    with pytest.raises(LeaseEnded):  # "a" ended at +50 min: still remembered at +110 min exactly
        execute(org, AcquireLease("a", Resources(), 60), CATALOG, T0 + 110 * 60 * US, Effects())
    crowd, _ = make_org()
    for n in range(MAX_ENDED_LEASES + 1):
        run(crowd, ReleaseLease(f"l{n}"), T0)
    assert len(crowd.ended_leases) == MAX_ENDED_LEASES and "l0" not in crowd.ended_leases


def test_the_downgrade_restores_the_plan_it_came_from_with_its_events():
    org, _ = make_org(plan=HOBBY)
    run(org, InvoiceFailed(T0, *POLICY, "in_1"), T0)
    run(org, Advance(), T0 + 14 * DAY_US)
    assert org.plan.id == "free" and org.dunning.prior_plan.id == "hobby_weekly"
    fx = run(org, InvoicePaid(T0 + 14 * DAY_US + 1, "in_1", 900), T0 + 14 * DAY_US + 1)
    assert org.plan.id == "hobby_weekly"
    (unsuspended,) = [d for t, d in events(fx) if t == "org.unsuspended"]
    assert unsuspended == {"was_suspended": True, "step": 3, "past_due_since": "2026-03-02T09:00:00Z"}
