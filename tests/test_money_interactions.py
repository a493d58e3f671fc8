"""Where two features meet, the money stays exact (issue 17's reproduced defects).

Each test is a scenario that failed before its fix, named for what must hold. Numbers are
worked out by hand from docs/concepts/billing-rules.md and config/catalog.toml.
"""

from __future__ import annotations

from actors.commands import Advance, ResetPeriod, SetPlan, execute
from actors.org import Effects
from actors.timeutil import rfc3339_to_us
from tests.helpers import CATALOG, DAY_US, PAYG, T0, make_org, usage_costing

US = 1_000_000
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
