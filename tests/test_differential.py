"""The engine equals the independent reference model after every step (issue 17).

Hypothesis drives long interleavings of every command with time jumps (seconds to months,
landing on period, week and month edges), restarts from a snapshot and the journal behind
it, and Stripe deliveries early, late, twice and out of order. The model
(tests/model/reference.py) was written from docs/concepts/billing-rules.md alone; the
harness is tests/differential.py. `bench/model.py` runs the same for as long as asked.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from tests.differential import DAY_S, START_US, US, Pair, import_strategy, jump_strategy, step_strategy


class EngineAgainstModel(RuleBasedStateMachine):
    @initialize(plan_id=st.sampled_from(("payg", "hobby_weekly", "free")), prepaid=st.booleans(),
                start_s=st.integers(0, 120 * DAY_S), shadow=st.sampled_from((False, False, True)), data=st.data())
    def create(self, plan_id, prepaid, start_s, shadow, data):
        now = START_US + start_s * US
        # One org in four is created by an import (billing-rules 2.11) instead of POST /v1/orgs.
        imported = data.draw(st.one_of(st.none(), st.none(), st.none(), import_strategy(now, 0)), label="imported")
        self.pair = Pair.create(plan_id, prepaid, now, imported, shadow)
        self.serial = 0

    @rule(data=st.data())
    def step(self, data):
        self.serial += 1
        self.pair.wait(data.draw(jump_strategy(self.pair), label="wait_s"))
        step = data.draw(step_strategy(self.pair, self.serial), label="step")
        step = self.pair.delivery(step)
        self.pair.step(step)

    @rule(snapshot_now=st.booleans())
    def restart(self, snapshot_now):
        self.pair.engine.restart(snapshot_now)


# METERGATE_DIFF_EXAMPLES sets the budget (bench/model.py runs it for minutes instead);
# METERGATE_DIFF_DERANDOMIZE=1 makes it the same examples every run (mutation testing).
EngineAgainstModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("METERGATE_DIFF_EXAMPLES", "200")), stateful_step_count=50, deadline=None,
    derandomize=os.environ.get("METERGATE_DIFF_DERANDOMIZE") == "1", database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestEngineAgainstModel = EngineAgainstModel.TestCase


def test_a_charge_already_sent_does_not_grow_at_the_same_instant():
    """Rule 9.3: only a charge not yet sent grows. Asked for in one commit, it went out; a debit
    at the very same instant in the next commit leaves it (and what was sent) as it was,
    engine and model alike (found by a review: the engine grew its state, not what it sent)."""
    pair = Pair.create("payg", True, START_US)
    for step in ({"type": "set_card", "present": True},
                 {"type": "set_auto_recharge", "enabled": True, "threshold_micros": 100_000_000,
                  "amount_micros": 1_000_000, "max_per_day": 4, "cooldown_s": 60},
                 {"type": "debit", "kind": "adjustment", "amount_micros": 50_000_000}):
        pair.step(step)  # no time passes between the steps
    (sent,) = pair.charges_seen.items()
    assert pair.engine.org.recharge.pending_micros == sent[1]


def test_a_charge_without_a_stripe_customer_pauses_until_an_import_links_one():
    """Rules 9.4 and 2.11 step 7, engine and model alike: a charge that failed for want of a
    Stripe customer pauses auto-recharge `no_stripe_customer`; an import that says the customer
    is linked lifts that pause and the check asks again (the random walk rarely meets this)."""
    pair = Pair.create("payg", True, START_US)
    for step in ({"type": "set_card", "present": True},
                 {"type": "set_auto_recharge", "enabled": True, "threshold_micros": 100_000_000,
                  "amount_micros": 1_000_000, "max_per_day": 4, "cooldown_s": 0}):
        pair.step(step)
    (first,) = pair.charges_seen
    pair.wait(60)
    pair.step({"type": "settle", "charge_id": first, "succeeded": False, "amount_micros": pair.charges_seen[first],
               "payment_id": f"pi_{first}", "reason": "no_stripe_customer", "key": None})
    assert pair.engine.org.recharge.paused == "no_stripe_customer"
    pair.wait(60)
    pair.step({"type": "import", "amounts": [], "customer_linked": True})
    assert pair.engine.org.recharge.paused is None and len(pair.charges_seen) == 2


def test_a_shadow_org_asks_for_no_charge_and_its_cutover_asks_at_once():
    """Rule 2.12, engine and model alike: created in shadow, out of money with auto-recharge
    on, nothing is charged and the halt is a shadow event; a cutover now asks for the charge."""
    pair = Pair.create("payg", True, START_US, shadow=True)
    for step in ({"type": "set_card", "present": True},
                 {"type": "set_auto_recharge", "enabled": True, "threshold_micros": 100_000_000,
                  "amount_micros": 1_000_000, "max_per_day": 4, "cooldown_s": 0},
                 {"type": "debit", "kind": "adjustment", "amount_micros": 50_000_000},
                 {"type": "gate", "action": "create", "resources": {}}):
        pair.step(step)
    assert not pair.charges_seen and pair.engine.org.halted is not None
    pair.wait(60)
    pair.step({"type": "set_enforcement", "mode": "enforce", "at_us": None, "undo": False})
    assert len(pair.charges_seen) == 1
    pair.wait(60)
    pair.step({"type": "set_enforcement", "mode": "shadow", "at_us": None, "undo": True})  # refused: charged
    assert not pair.engine.org.in_shadow(pair.now)
