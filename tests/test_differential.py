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

from tests.differential import DAY_S, START_US, US, Pair, jump_strategy, step_strategy


class EngineAgainstModel(RuleBasedStateMachine):
    @initialize(plan_id=st.sampled_from(("payg", "hobby_weekly", "free")), prepaid=st.booleans(),
                start_s=st.integers(0, 120 * DAY_S))
    def create(self, plan_id, prepaid, start_s):
        self.pair = Pair.create(plan_id, prepaid, START_US + start_s * US)
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
