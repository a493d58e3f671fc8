"""Time-driven billing in the pure core: dunning steps, period archive and resets, plan versions."""

from __future__ import annotations

import tomllib

from actors.commands import InvoiceFailed, InvoicePaid, ResetPeriod, execute
from actors.org import Effects, Resources
from actors.timeutil import rfc3339_to_us
from config.catalog import parse_catalog
from config.settings import DEFAULT_CATALOG
from tests.test_org_core import CATALOG, DAY_US, FREE, HOBBY, T0, make_org, usage_costing

US = 1_000_000
POLICY = (3 * 86_400, 7 * 86_400, 14 * 86_400, "free", 1)


def run(org, command, at) -> Effects:
    fx = Effects()
    execute(org, command, CATALOG, at, fx)
    return fx


def types(fx: Effects) -> list[str]:
    return [e.type for e in fx.events]


def test_the_dunning_ladder_and_its_clearing_by_payment():
    org, _ = make_org(plan=HOBBY)
    assert run(org, InvoiceFailed(T0, *POLICY), T0).events == []
    assert org.past_due_since_us == T0 and not org.suspended
    assert org.next_due_us() == T0 + 3 * DAY_US
    fx = Effects()
    org.advance(T0 + 3 * DAY_US - 1, fx)
    assert not org.suspended and fx.events == []
    fx = Effects()
    org.advance(T0 + 3 * DAY_US, fx)
    assert org.suspended and types(fx) == ["org.suspended"]
    assert org.gate("create", Resources(), T0 + 3 * DAY_US).reason == "suspended"
    org.advance(T0 + 4 * DAY_US, fx)
    assert types(fx) == ["org.suspended"]  # once
    org.advance(T0 + 7 * DAY_US, Effects())
    assert org.dunning.step == 2
    fx = Effects()
    org.advance(T0 + 14 * DAY_US, fx)
    assert org.plan.id == "free" and org.dunning.step == 3
    # archived: the week that ended, and the start of this one, run on hobby until now
    assert [(p.plan_id, p.period_key) for p in fx.periods] == [("hobby_weekly", "2026-W11"), ("hobby_weekly", "2026-W12")]
    fx = run(org, InvoicePaid(T0 + 15 * DAY_US // US), T0 + 15 * DAY_US)
    assert not org.suspended and org.past_due_since_us is None and org.dunning is None
    assert org.plan.id == "hobby_weekly"  # restored
    assert "org.unsuspended" in types(fx)
    assert org.gate("create", Resources(), T0 + 15 * DAY_US).allowed


def test_an_org_that_paid_before_is_degraded_not_suspended():
    org, _ = make_org()
    run(org, InvoicePaid(T0 - US), T0)
    run(org, InvoiceFailed(T0, *POLICY), T0)
    fx = Effects()
    org.advance(T0 + 3 * DAY_US, fx)
    assert not org.suspended and fx.events == []
    org.advance(T0 + 7 * DAY_US, fx)
    # degraded: the current quota and credit still usable, purchases denied
    assert org.gate("create", Resources(), T0 + 7 * DAY_US).allowed
    assert org.gate("purchase", Resources(), T0 + 7 * DAY_US).reason == "degraded"
    assert org.gate("purchase", Resources(), T0 + 7 * DAY_US).status == 402


def test_an_older_payment_event_does_not_clear_a_newer_failure():
    org, _ = make_org()
    run(org, InvoiceFailed(T0 + 10 * US, *POLICY), T0 + 20 * US)
    run(org, InvoicePaid(T0), T0 + 30 * US)  # delivered late, about an earlier invoice
    assert org.past_due_since_us == T0 + 10 * US
    run(org, InvoicePaid(T0 + 40 * US), T0 + 40 * US)
    assert org.past_due_since_us is None


def test_a_weekly_period_resets_at_the_boundary_and_is_archived():
    org, _ = make_org(plan=HOBBY)  # 5 USD quota per ISO week; T0 is Monday 2026-03-02 09:00
    org.apply_usage([usage_costing(4 * US)], T0 + US, Effects())
    assert org.quota_used_micros == 4 * US
    monday = rfc3339_to_us("2026-03-09T00:00:00Z")
    assert org.next_due_us() == monday
    fx = Effects()
    org.advance(monday, fx)
    assert (org.period_key, org.quota_used_micros) == ("2026-W11", 0)
    (closed,) = fx.periods
    assert (closed.period_key, closed.usage_micros, closed.quota_used_micros, closed.end_us) == (
        "2026-W10", 4 * US, 4 * US, monday)


def test_a_subscription_period_change_resets_the_quota_once():
    org, _ = make_org(plan=HOBBY)
    run(org, ResetPeriod(T0 - DAY_US), T0)  # the first anchor only records it
    org.apply_usage([usage_costing(4 * US)], T0 + US, Effects())
    assert org.quota_used_micros == 4 * US
    fx = run(org, ResetPeriod(T0 + DAY_US), T0 + DAY_US)
    assert org.quota_used_micros == 0 and [p.usage_micros for p in fx.periods] == [4 * US]
    again = run(org, ResetPeriod(T0 + DAY_US), T0 + DAY_US + US)  # redelivered
    assert again.periods == [] and org.quota_used_micros == 0
    assert run(org, ResetPeriod(T0), T0 + DAY_US + 2 * US).periods == []  # older


def test_a_new_period_takes_the_plan_version_then_in_effect():
    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    hobby = next(p for p in raw["plans"] if p["id"] == "hobby_weekly")
    hobby["effective_until"] = "2026-03-09T00:00:00Z"
    raw["plans"].append({**hobby, "version": 2, "effective_from": "2026-03-09T00:00:00Z",
                         "included_micros": 7_000_000})
    del raw["plans"][-1]["effective_until"]
    catalog = parse_catalog(raw)
    v1 = catalog.plan_version("hobby_weekly", 1)
    org, _ = make_org(plan=v1)
    org.advance(T0 + DAY_US, Effects())
    assert org.plan.version == 1  # mid-period: the version the period started on
    org.advance(rfc3339_to_us("2026-03-09T00:00:01Z"), Effects())
    assert (org.plan.version, org.plan.included_micros) == (2, 7_000_000)


def test_next_due_is_the_earliest_of_period_grant_lease_and_dunning():
    org, _ = make_org(plan=FREE)
    assert org.next_due_us() == org.period_end_us
    org.credit("grant", US, T0 + DAY_US, None, T0, Effects())
    assert org.next_due_us() == T0 + DAY_US
    org.acquire_lease("ls", Resources(), 60, T0, Effects())
    assert org.next_due_us() == T0 + 60 * US
