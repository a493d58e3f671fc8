"""Time-driven billing in the pure core: dunning steps, period archive and resets, plan versions."""

from __future__ import annotations

import tomllib

from actors.commands import InvoiceFailed, InvoicePaid, ResetPeriod, execute
from actors.org import DunningStep, Effects, Resources
from actors.timeutil import rfc3339_to_us
from config.catalog import parse_catalog
from config.settings import DEFAULT_CATALOG
from tests.helpers import CATALOG, DAY_US, FREE, HOBBY, T0, make_org, usage_costing

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
    # archived: the week that ended; the running week goes on, now on the free plan (no cut)
    assert [(p.plan_id, p.period_key) for p in fx.periods] == [("hobby_weekly", "2026-W11")]
    assert (org.period_key, org.period_start_us) == ("2026-W12", rfc3339_to_us("2026-03-16T00:00:00Z"))
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
    assert org.dunning.step == DunningStep.DEGRADED and org.state(T0 + 7 * DAY_US).degraded


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
    view, until = org.view_as_of(T0 + DAY_US)
    assert until == org.period_end_us  # unused quota, but the next period's plan version differs
    assert org.view_as_of(until)[0].included_micros == 7_000_000 != view.included_micros
    org.advance(rfc3339_to_us("2026-03-09T00:00:01Z"), Effects())
    assert (org.plan.version, org.plan.included_micros) == (2, 7_000_000)


def test_a_plan_version_two_periods_ahead_ends_every_view_at_each_period_end():
    """A view of an org whose plan gives way to a new version later than the next period must
    still end at each period end: the version's start is some period's start (review of
    issue 18)."""
    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    hobby = next(p for p in raw["plans"] if p["id"] == "hobby_weekly")
    hobby["effective_until"] = "2026-03-16T00:00:00Z"  # the week after next
    raw["plans"].append({**hobby, "version": 2, "effective_from": "2026-03-16T00:00:00Z",
                         "included_micros": 0})
    del raw["plans"][-1]["effective_until"]
    org, _ = make_org(plan=parse_catalog(raw).plan_version("hobby_weekly", 1), card=True, signup_micros=0)
    view, until = org.view_as_of(T0)
    assert until == org.period_end_us
    second, until = org.view_as_of(until)
    assert second == view and until == rfc3339_to_us("2026-03-16T00:00:00Z")
    assert org.view_as_of(until)[0].included_micros == 0 != view.included_micros


def test_next_due_is_the_earliest_of_period_grant_lease_and_dunning():
    org, _ = make_org(plan=FREE)
    assert org.next_due_us() == org.period_end_us
    org.credit("grant", US, T0 + DAY_US, None, T0, Effects())
    assert org.next_due_us() == T0 + DAY_US
    org.acquire_lease("ls", Resources(), 60, T0, Effects())
    assert org.next_due_us() == T0 + 60 * US


def test_once_a_subscription_sets_the_periods_the_calendar_does_not_reset_them_again():
    org, _ = make_org(plan=HOBBY)  # T0 = Monday 09:00 of 2026-W10; 5 USD quota per period
    sub_start = T0 - 3_600 * US  # Monday 08:00 to next Monday 08:00, past the ISO week's end
    sub_end = sub_start + 7 * DAY_US
    run(org, ResetPeriod(sub_start, sub_end), T0)
    assert org.period_end_us == sub_end  # aligned, not reset
    org.apply_usage([usage_costing(5 * US)], T0 + US, Effects())
    monday = rfc3339_to_us("2026-03-09T00:00:00Z")
    fx = Effects()
    org.advance(monday, fx)  # the calendar week ends first: no free quota from it
    assert fx.periods == [] and org.quota_used_micros == 5 * US
    fx = Effects()
    org.advance(sub_end, fx)  # the subscription's period ends: the next one, as long, starts
    assert [p.usage_micros for p in fx.periods] == [5 * US]
    assert (org.period_start_us, org.period_end_us, org.quota_used_micros) == (sub_end, sub_end + 7 * DAY_US, 0)
    org.apply_usage([usage_costing(2 * US)], sub_end + US, Effects())
    # Stripe's renewal event for that same period: it is the running one; nothing resets.
    renewal = run(org, ResetPeriod(sub_end, sub_end + 7 * DAY_US), sub_end + 60 * US)
    assert renewal.periods == [] and org.quota_used_micros == 2 * US


def test_the_dunning_downgrade_neither_cuts_the_period_nor_gives_a_fresh_quota():
    org, _ = make_org(plan=HOBBY)
    run(org, InvoiceFailed(T0, *POLICY), T0)
    week_12 = rfc3339_to_us("2026-03-16T00:00:00Z")
    org.apply_usage([usage_costing(3 * US)], week_12 + US, Effects())  # 3 of hobby's 5 USD this week
    fx = Effects()
    org.advance(T0 + 14 * DAY_US, fx)  # 2026-W12, Monday 09:00: moved to free (1 USD a week)
    assert fx.periods == []
    assert (org.plan.id, org.period_key, org.period_start_us) == ("free", "2026-W12", week_12)
    assert org.quota_used_micros == 3 * US and org.quota_remaining_at(T0 + 14 * DAY_US) == 0
    org.advance(rfc3339_to_us("2026-03-23T00:00:00Z"), fx)  # the end of W12: one archive, whole
    assert [(p.period_key, p.start_us, p.end_us, p.plan_id) for p in fx.periods] == [
        ("2026-W12", week_12, rfc3339_to_us("2026-03-23T00:00:00Z"), "free")]


def test_only_paying_the_failed_invoices_ends_dunning_and_a_zero_invoice_proves_nothing():
    org, _ = make_org()
    run(org, InvoiceFailed(T0, *POLICY, "in_a"), T0)
    run(org, InvoicePaid(T0 + US, "in_trial", 0), T0 + US)  # a $0 invoice
    assert org.dunning is not None and org.paid_invoice is False
    run(org, InvoicePaid(T0 + 2 * US, "in_b", 500), T0 + 2 * US)  # another invoice, really paid
    assert org.dunning is not None and org.paid_invoice is True
    run(org, InvoiceFailed(T0 + 3 * US, *POLICY, "in_c"), T0 + 3 * US)
    run(org, InvoicePaid(T0 + 4 * US, "in_a", 900), T0 + 4 * US)
    assert org.dunning is not None  # in_c is still unpaid
    fx = run(org, InvoicePaid(T0 + 5 * US, "in_c", 900), T0 + 5 * US)
    assert org.dunning is None and org.past_due_since_us is None and types(fx) == ["org.unsuspended"]


def test_two_catalogs_in_one_process_each_keep_their_own_plan_successors():
    """Successors were looked up by plan id and version in one process-wide table: a second
    catalog (a reload; a test) that gives hobby_weekly v1 another v2 took over the orgs of the
    first (found by mutation testing, whose whole run parses many catalogs)."""
    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    hobby = next(p for p in raw["plans"] if p["id"] == "hobby_weekly")
    hobby["effective_until"] = "2026-03-09T00:00:00Z"

    def with_v2(included_micros: int):
        catalog = dict(raw, plans=raw["plans"] + [{**hobby, "version": 2, "effective_from": "2026-03-09T00:00:00Z",
                                                   "included_micros": included_micros}])
        del catalog["plans"][-1]["effective_until"]
        return parse_catalog(catalog)

    first, second = with_v2(7_000_000), with_v2(9_000_000)
    org, _ = make_org(plan=first.plan_version("hobby_weekly", 1))
    view, until = org.view_as_of(T0 + DAY_US)
    assert until == org.period_end_us  # unused quota, but the next period's plan version differs
    assert org.view_as_of(until)[0].included_micros == 7_000_000 != view.included_micros
    org.advance(rfc3339_to_us("2026-03-09T00:00:01Z"), Effects())
    assert (org.plan.version, org.plan.included_micros) == (2, 7_000_000)
    assert second.plan_version("hobby_weekly", 2).included_micros == 9_000_000
