"""Auto-recharge in the pure core: when it asks for a charge, how much, how often, and settling."""

from __future__ import annotations

from actors.commands import JOURNAL_DECODER, JOURNAL_ENCODER, JournalItem, SetAutoRecharge, SettleRecharge, execute, replay
from actors.org import Effects, OrgBillingActor
from tests.helpers import CATALOG, DAY_US, ORG_ID, T0, make_org, usage_costing

US = 1_000_000
SIGNUP = CATALOG.signup_grant_micros  # 5 USD


def armed(threshold=4 * US, amount=10 * US, per_day=3, cooldown_s=60, card=True) -> tuple[OrgBillingActor, Effects]:
    org, _ = make_org()
    fx = Effects()
    if card:
        org.set_payment_method(True, T0, fx)
    org.configure_recharge(True, threshold, amount, per_day, cooldown_s, T0, fx)
    return org, fx


def spend(org: OrgBillingActor, micros: int, at: int) -> Effects:
    fx = Effects()
    org.apply_usage([usage_costing(micros)], at, fx)
    return fx


def test_a_debit_under_the_threshold_asks_for_one_charge_and_success_credits_once():
    org, fx = armed()
    assert fx.charges == []  # 5 USD is above the 4 USD threshold: no arming charge
    assert spend(org, 500_000, T0 + US).charges == []  # 4.5 USD left: still above
    fx = spend(org, 600_000, T0 + 2 * US)  # 3.9 USD: under
    assert [(c.charge_id, c.amount_micros) for c in fx.charges] == [("ar_1", 10 * US)]
    assert fx.charges[0].idempotency_key == f"metergate:{ORG_ID}:{T0}:auto_recharge:ar_1:{T0 + 2 * US}"
    # While it is in flight, further debits ask for nothing more.
    assert spend(org, 1_000_000, T0 + 3 * US).charges == []
    assert org.pending_charge().charge_id == "ar_1"

    fx = Effects()
    entry = org.settle_recharge("ar_1", True, 10 * US, "pi_1", None, T0 + 4 * US, fx)
    assert (entry.kind, entry.amount_micros) == ("auto_recharge", 10 * US)
    assert org.balance_micros == SIGNUP - 2_100_000 + 10 * US
    assert [e.type for e in fx.events] == ["auto_recharge.succeeded"]
    assert org.pending_charge() is None
    recharge = org.state(T0 + 4 * US).recharge
    assert (recharge.enabled, recharge.day_count, recharge.pending_id) == (True, 1, None)


def test_the_charge_is_sized_to_get_back_above_the_threshold_in_whole_cents():
    org, _ = armed(threshold=20 * US, amount=1 * US, card=False)
    fx = Effects()
    org.set_payment_method(True, T0, fx)  # the card arrives with 5 USD under a 20 USD threshold: arming charge
    (charge,) = fx.charges
    assert charge.amount_micros == 15 * US + 10_000  # 5 + 15.01 > 20: one charge is enough
    assert charge.amount_micros % 10_000 == 0


def test_a_refund_right_after_the_charge_was_asked_for_makes_the_unsent_charge_bigger():
    """Regression (found by the stateful test): a refund after time passed first lets the
    org's clock ask for a charge sized to the balance before the refund, then takes the
    money. The charge has not gone out (charges start after their commit), so it must ask
    for enough to get back above the threshold from the balance after the refund."""
    org, _ = armed(threshold=4 * US, amount=500_000, cooldown_s=60)
    spend(org, 1_500_000, T0 + US)  # 3.5 USD: under the threshold; the first charge is asked for
    org.settle_recharge("ar_1", True, org.pending_charge().amount_micros, "pi_1", None, T0 + 2 * US,
                        Effects())  # back above 4 USD
    spend(org, 20_000, T0 + 3 * US)  # just under 4 USD again, within the cooldown: nothing asked
    assert org.pending_charge() is None and org.balance_micros < 4 * US
    fx = Effects()
    later = T0 + 3_600 * US
    org.debit("refund", org.balance_micros, None, later, fx)  # the whole balance, an hour later
    (charge,) = fx.charges
    assert org.balance_micros == 0
    assert org.balance_micros + charge.amount_micros > 4 * US  # not the 0.5 USD asked before the refund
    assert charge.amount_micros == org.pending_charge().amount_micros == 4 * US + 10_000


def test_enabling_with_the_balance_under_the_threshold_arms_once():
    org, _ = make_org()
    fx = Effects()
    org.set_payment_method(True, T0, fx)
    org.configure_recharge(True, 6 * US, 10 * US, 3, 60, T0, fx)
    assert len(fx.charges) == 1
    again = Effects()
    org.configure_recharge(True, 6 * US, 10 * US, 3, 60, T0 + US, again)  # the same PUT, retried
    assert again.charges == []


def test_no_card_no_charge_and_disabled_no_charge():
    org, fx = armed(card=False)
    assert spend(org, 2 * US, T0 + US).charges == []
    org, fx = armed()
    org.configure_recharge(False, 0, 0, 1, 0, T0, Effects())
    assert spend(org, 2 * US, T0 + US).charges == []
    assert org.state(T0 + US).recharge.enabled is False


def test_a_failure_pauses_until_a_new_card_and_a_late_failure_changes_nothing():
    org, _ = armed()
    (charge,) = spend(org, 2 * US, T0 + US).charges
    fx = Effects()
    assert org.settle_recharge(charge.charge_id, False, charge.amount_micros, "pi_x", "card_declined",
                               T0 + 2 * US, fx) is None
    assert [(e.type, e.data["reason"]) for e in fx.events] == [("auto_recharge.failed", "card_declined")]
    assert org.state(T0).recharge.paused == "payment_failed"
    # Not retried in a loop: more debits, after the cooldown, ask for nothing.
    assert spend(org, 100_000, T0 + 600 * US).charges == []
    # The same failure reported again (Stripe's event after the charger's answer): nothing.
    repeat = Effects()
    org.settle_recharge(charge.charge_id, False, charge.amount_micros, "pi_x", "card_declined", T0 + 601 * US, repeat)
    assert repeat.events == []
    # A new card lifts the pause and, with the balance under the threshold, charges.
    fx = Effects()
    org.set_payment_method(True, T0 + 602 * US, fx)
    assert [c.charge_id for c in fx.charges] == ["ar_2"]


def test_cooldown_and_daily_cap_stop_a_charge_storm():
    org, _ = armed(threshold=4 * US, amount=1 * US, per_day=2, cooldown_s=60)
    charges, events = [], []
    at = T0
    for step in range(40):  # spend 1 USD every 10 s; each charge brings only ~1 USD back
        at += 10 * US
        fx = spend(org, 1 * US, at)
        for charge in fx.charges:
            charges.append((charge, at))
            settle = Effects()
            org.settle_recharge(charge.charge_id, True, charge.amount_micros, f"pi_{charge.charge_id}", None, at, settle)
        events += [e for e in fx.events if e.type == "auto_recharge.failed"]
    times = [at for _, at in charges]
    assert len(charges) == 2  # the daily cap
    assert times[1] - times[0] >= 60 * US  # the cooldown
    assert [e.data["reason"] for e in events] == ["daily_limit"]  # said once, not at every debit
    # The next UTC day, charging may start again.
    next_day = (T0 // DAY_US + 1) * DAY_US + US
    assert len(spend(org, 1, next_day).charges) == 1


def test_money_taken_is_credited_even_if_the_charge_is_no_longer_the_pending_one():
    org, _ = armed()
    (charge,) = spend(org, 2 * US, T0 + US).charges
    org.settle_recharge(charge.charge_id, False, charge.amount_micros, None, "timeout", T0 + 2 * US, Effects())
    fx = Effects()
    entry = org.settle_recharge(charge.charge_id, True, charge.amount_micros, "pi_late", None, T0 + 3 * US, fx)
    assert entry is not None and entry.amount_micros == charge.amount_micros


def test_the_pending_charge_survives_snapshot_and_replay():
    org, _ = make_org()
    journal = []

    def run(command, at):
        fx = Effects()
        execute(org, command, CATALOG, at, fx)
        journal.append(JournalItem(at, command))
        return fx

    from actors.commands import ApplyUsage, SetPaymentMethod

    snap = org.to_snapshot()
    run(SetPaymentMethod(True), T0)
    run(SetAutoRecharge(True, 4 * US, 10 * US, 3, 60), T0)
    fx = run(ApplyUsage([usage_costing(2 * US)]), T0 + US)
    assert [c.charge_id for c in fx.charges] == ["ar_1"]
    rebuilt = OrgBillingActor.from_snapshot(snap, CATALOG)
    replay(rebuilt, JOURNAL_DECODER.decode(JOURNAL_ENCODER.encode(journal)), CATALOG)
    assert rebuilt.pending_charge() == org.pending_charge()
    assert rebuilt.to_snapshot() == org.to_snapshot()
    run(SettleRecharge.of_payment("ar_1", True, 10 * US, "pi_1"), T0 + 2 * US)
    replay(rebuilt, JOURNAL_DECODER.decode(JOURNAL_ENCODER.encode(journal[-1:])), CATALOG)
    assert rebuilt.to_snapshot() == org.to_snapshot()
    assert rebuilt.pending_charge() is None


def test_a_charge_held_back_by_the_cooldown_goes_out_when_time_alone_passes():
    org, _ = armed(threshold=4 * US, amount=1 * US, cooldown_s=60)
    (charge,) = spend(org, 2 * US, T0 + US).charges  # 3 USD left: ar_1 for 1.01 USD
    org.settle_recharge(charge.charge_id, True, charge.amount_micros, "pi_1", None, T0 + 2 * US, Effects())
    fx = spend(org, 10 * US, T0 + 3 * US)  # drained within the cooldown: halted, no charge
    assert fx.charges == [] and org.halted == "balance"
    assert org.next_due_us() == T0 + US + 60 * US  # the scheduler wakes it when the cooldown ends
    fx = Effects()
    org.advance(org.next_due_us(), fx)  # no debit comes from a halted org; time does it
    assert [c.charge_id for c in fx.charges] == ["ar_2"]
    org.settle_recharge("ar_2", True, fx.charges[0].amount_micros, "pi_2", None, T0 + 70 * US, Effects())
    assert org.halted is None and org.balance_micros > 4 * US
