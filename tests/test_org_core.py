"""Scenarios of the pure billing core: OrgBillingActor, metering, commands, time.

Every expected number is worked out by hand from config/catalog.toml:
  memory 4,500 nano-USD per GiB-second  → 1 GiB for 1 s   = 4.5 µUSD
  cpu   14,000 nano-USD per vCPU-second → 1 vCPU for 1 s  = 14 µUSD
  disk      30 nano-USD per GiB-second  → 1 GiB for 1 s   = 0.03 µUSD
"""

from __future__ import annotations

import msgspec
import pytest

from actors.commands import (
    JOURNAL_DECODER,
    JOURNAL_ENCODER,
    AcquireLease,
    Advance,
    ApplyUsage,
    Booked,
    CreateOrg,
    Credit,
    Halt,
    InvoiceFailed,
    JournalItem,
    LeaseGranted,
    OrgCreated,
    ReleaseLease,
    RenewLease,
    Resume,
    SetLimits,
    SetPlan,
    SetTier,
    execute,
    replay,
)
from actors.formats import decode_snapshot
from actors.metering import SCALED_PER_MICRO, LeaseUsage, cost_scaled
from actors.org import (
    BillingError,
    DunningStep,
    Effects,
    HaltCause,
    LeaseConflict,
    LedgerEntry,
    OrgBillingActor,
    OrgSnapshot,
    Refusal,
    Resources,
    UnknownLease,
)
from actors.timeutil import (
    US_PER_S,
    BadTime,
    epoch_to_us,
    parse_time_us,
    period_bounds,
    rfc3339_to_us,
    us_to_rfc3339,
)
from tests.helpers import CATALOG, DAY_US, FREE, HOBBY, ORG_ID, PAYG, T0, make_org, usage_costing

SMALL = Resources(memory_mb=512, cpu_count=1)


def spend(org: OrgBillingActor, micros: int, now_us: int, fx: Effects | None = None) -> int:
    return org.apply_usage([usage_costing(micros)], now_us, fx if fx is not None else Effects())


def grants_by_id(org: OrgBillingActor) -> dict[str, int]:
    return {g.grant_id: g.remaining_micros for g in org.grants or ()}


def events_of(fx: Effects, event_type: str) -> list:
    return [e for e in fx.events if e.type == event_type]


def ledger_of(fx: Effects) -> list[tuple[str, int]]:
    return [(entry.kind, entry.amount_micros) for _, entry in fx.ledger]


# ----- signup ---------------------------------------------------------------------------


def test_new_org_gets_the_catalog_signup_grant_as_one_promotional_ledger_credit():
    org, fx = make_org()

    assert fx.ledger == [(ORG_ID, LedgerEntry("signup_grant", 5_000_000, T0, "gr_1"))]
    assert org.balance_micros == 5_000_000
    assert [(g.grant_id, g.kind, g.remaining_micros, g.expires_at_us) for g in org.grants] == [
        ("gr_1", "signup_grant", 5_000_000, None)]
    assert org.halted is None
    assert fx.events == []
    decision = org.gate("create", SMALL, T0)
    assert (decision.allowed, decision.reason, decision.balance_micros) == (True, "ok", 5_000_000)


def test_prepaid_org_created_without_signup_grant_is_halted_at_once_with_no_leases():
    org, fx = make_org(signup_micros=0)

    assert fx.ledger == []
    assert org.halted == "balance"
    [halted] = fx.events
    assert (halted.type, halted.at_us, halted.data) == (
        "org.halted", T0, {"reason": "balance", "lease_ids": [], "balance_micros": 0})


def test_prepaid_hobby_org_without_credit_is_not_halted_while_its_weekly_quota_is_unused():
    org, fx = make_org(plan=HOBBY, signup_micros=0)

    assert org.halted is None
    assert fx.events == []
    assert org.gate("create", SMALL, T0).reason == "ok"


# ----- exact cost -----------------------------------------------------------------------


def test_cost_of_memory_cpu_and_disk_matches_the_catalog_rates_to_the_micro():
    org, _ = make_org()
    # 2 GiB memory, 2 vCPU and 10 GiB disk for 10 s:
    #   memory 2 × 10 × 4.5 = 90 µUSD, cpu 2 × 10 × 14 = 280 µUSD, disk 10 × 10 × 0.03 = 3 µUSD
    usage = LeaseUsage("ls_1", memory_mb_ms=2048 * 10_000, cpu_ms=2 * 10_000,
                       disk_mb_ms=10_240 * 10_000, ticks=1)
    fx = Effects()

    debited = org.apply_usage([usage], T0 + US_PER_S, fx)

    assert debited == 373
    assert org.remainder_scaled == 0
    assert org.balance_micros == 5_000_000 - 373
    assert fx.ledger == [(ORG_ID, LedgerEntry("usage", -373, T0 + US_PER_S))]


@pytest.mark.parametrize(("usage", "nanos"), [
    (LeaseUsage("ls", memory_mb_ms=1024 * 1000), 4_500),   # 1 GiB·s
    (LeaseUsage("ls", cpu_ms=1000), 14_000),                # 1 vCPU·s
    (LeaseUsage("ls", disk_mb_ms=1024 * 1000), 30),         # 1 GiB·s of disk
    (LeaseUsage("ls", memory_mb_ms=512 * 60_000), 135_000),  # 0.5 GiB for a minute
    (LeaseUsage("ls", units={"ingest_bytes": 10**9}), 0),   # ingest is free on payg
    (LeaseUsage("ls", memory_mb_ms=221_184, cpu_ms=2), 1_000),  # what usage_costing(1) bills
])
def test_each_rate_of_the_catalog_costs_its_nanos_per_unit_second(usage, nanos):
    assert cost_scaled(PAYG, usage) == nanos * 1_024_000


def test_usage_in_a_unit_the_plan_has_no_rate_for_is_refused_and_debits_nothing():
    org, _ = make_org()
    before = org.to_snapshot()

    with pytest.raises(ValueError, match="gpu_s"):
        org.apply_usage([LeaseUsage("ls", units={"gpu_s": 1})], T0, Effects())

    assert org.to_snapshot() == before


def test_a_thousand_one_ms_ticks_cost_exactly_what_one_1000_ms_tick_costs():
    # 1 GiB for 1 s = 4.5 µUSD: 4 µUSD debited, half a micro carried either way.
    many, _ = make_org()
    one, _ = make_org()
    one_ms = LeaseUsage("ls_1", memory_mb_ms=1024 * 1, ticks=1)

    debited_many = sum(many.apply_usage([one_ms], T0 + i, Effects()) for i in range(1000))
    debited_one = one.apply_usage([LeaseUsage("ls_1", memory_mb_ms=1024 * 1000, ticks=1)], T0,
                                  Effects())

    assert debited_many == debited_one == 4
    assert many.remainder_scaled == one.remainder_scaled == SCALED_PER_MICRO // 2
    assert many.balance_micros == one.balance_micros == 5_000_000 - 4


def test_tick_costing_less_than_a_micro_is_carried_not_lost_or_rounded_up():
    org, _ = make_org()
    fx = Effects()
    # 1 MB·ms of memory costs 4,500 scaled units; a micro is 1,024,000,000 of them.
    debited_tiny = org.apply_usage([LeaseUsage("ls_1", memory_mb_ms=1, ticks=1)], T0, fx)

    assert debited_tiny == 0
    assert org.remainder_scaled == 4_500
    assert org.balance_micros == 5_000_000
    assert fx.ledger == []

    # 227,555 MB·ms more brings the carry to 1,024,002,000: exactly one micro and 2,000 left.
    debited = org.apply_usage([LeaseUsage("ls_1", memory_mb_ms=227_555, ticks=1)], T0, fx)

    assert debited == 1
    assert org.remainder_scaled == 2_000
    assert org.balance_micros == 4_999_999
    assert ledger_of(fx) == [("usage", -1)]


# ----- burn-down order ------------------------------------------------------------------


def test_hobby_org_burns_weekly_quota_then_expiring_grants_then_promotional_then_purchased():
    org, fx = make_org(plan=HOBBY)                                          # gr_1 signup 5 USD
    org.credit("topup", 3_000_000, None, None, T0, fx)                      # gr_2 purchased
    org.credit("grant", 1_000_000, T0 + 10 * DAY_US, None, T0, fx)          # gr_3 expires day 10
    org.credit("grant", 500_000, T0 + 3 * DAY_US, None, T0, fx)             # gr_4 expires day 3
    org.credit("topup", 200_000, T0 + 20 * DAY_US, None, T0, fx)            # gr_5 expires day 20
    full = {"gr_1": 5_000_000, "gr_2": 3_000_000, "gr_3": 1_000_000, "gr_4": 500_000,
            "gr_5": 200_000}
    assert grants_by_id(org) == full
    at = T0 + US_PER_S

    # The weekly quota is spent first and is not money: no ledger entry, no grant touched.
    usage_fx = Effects()
    spend(org, 4_999_995, at, usage_fx)
    assert org.quota_used_micros == 4_999_995
    assert grants_by_id(org) == full
    assert usage_fx.ledger == []

    # 5 µUSD finish the quota; the other 100 come from the grant expiring soonest.
    spend(org, 105, at, usage_fx)
    assert org.quota_used_micros == 5_000_000
    assert grants_by_id(org) == {**full, "gr_4": 499_900}
    assert ledger_of(usage_fx) == [("usage", -100)]

    # Then the expiring grants in expiry order (the expiring topup too), then promotional.
    spend(org, 499_900 + 1_000_000 + 200_000 + 7, at, usage_fx)
    assert grants_by_id(org) == {"gr_1": 4_999_993, "gr_2": 3_000_000}

    # Purchased credit is spent last.
    spend(org, 4_999_993 + 11, at, usage_fx)
    assert grants_by_id(org) == {"gr_2": 2_999_989}
    assert org.balance_micros == 2_999_989
    assert ledger_of(usage_fx) == [("usage", -100), ("usage", -1_699_907), ("usage", -5_000_004)]
    assert org.period_usage_micros == 5_000_000 + 100 + 1_699_907 + 5_000_004
    assert org.remainder_scaled == 0


def test_state_lists_grants_in_the_order_they_will_be_spent():
    org, fx = make_org()
    org.credit("topup", 1_000, None, None, T0, fx)
    org.credit("grant", 1_000, T0 + 9 * DAY_US, None, T0, fx)
    org.credit("grant", 1_000, T0 + 2 * DAY_US, None, T0, fx)

    assert [g.grant_id for g in org.state(T0).grants] == ["gr_4", "gr_3", "gr_1", "gr_2"]


# ----- halting at zero, debt, resume ----------------------------------------------------


def test_prepaid_org_halts_when_balance_reaches_zero_and_lists_its_leases():
    org, _ = make_org(signup_micros=1_000, card=True)
    fx = Effects()
    for lease_id in ("ls_b", "ls_a"):
        deny, _, created = org.acquire_lease(lease_id, SMALL, 600, T0, fx)
        assert deny is None and created

    spend(org, 999, T0 + US_PER_S, fx)
    assert org.halted is None
    # 72 vCPU·ms × 14 nano-USD/ms = 1.008 µUSD: the last whole micro, 0.008 carried
    org.apply_usage([LeaseUsage("ls_a", cpu_ms=72, ticks=1)], T0 + 2 * US_PER_S, fx)

    assert org.balance_micros == 0
    assert org.remainder_scaled == 8_192_000
    assert org.halted == "balance"
    [halted] = events_of(fx, "org.halted")
    assert (halted.org_id, halted.at_us, halted.data) == (
        ORG_ID, T0 + 2 * US_PER_S, {"reason": "balance", "lease_ids": ["ls_a", "ls_b"],
                                    "balance_micros": 0})
    decision = org.gate("create", SMALL, T0 + 3 * US_PER_S)
    assert (decision.allowed, decision.reason) == (False, "halted")
    assert org.gate("wake", SMALL, T0 + 3 * US_PER_S).reason == "halted"
    assert org.gate("ingest", SMALL, T0 + 3 * US_PER_S).reason == "halted"
    assert org.gate("purchase", SMALL, T0 + 3 * US_PER_S).reason == "ok"


def test_ticks_already_running_put_a_halted_org_in_debt_which_the_next_credit_pays_first():
    org, _ = make_org(signup_micros=1_000)
    fx = Effects()
    org.acquire_lease("ls_1", SMALL, 600, T0, fx)
    spend(org, 1_000, T0 + US_PER_S, fx)
    assert org.halted == "balance"

    spend(org, 500, T0 + 2 * US_PER_S, fx)  # the sandbox ran on until it was stopped
    assert org.balance_micros == -500
    assert org.debt_micros == 500
    assert org.grants is None
    assert len(events_of(fx, "org.halted")) == 1

    credit_fx = Effects()
    entry = org.credit("topup", 2_000, None, "pack", T0 + 3 * US_PER_S, credit_fx)

    assert entry == LedgerEntry("topup", 2_000, T0 + 3 * US_PER_S, "gr_2", None, "pack")
    assert org.debt_micros == 0
    assert grants_by_id(org) == {"gr_2": 1_500}
    assert org.balance_micros == 1_500


def test_credit_resumes_a_balance_halt_but_creates_no_lease():
    org, _ = make_org(signup_micros=1_000)
    fx = Effects()
    org.acquire_lease("ls_1", SMALL, 600, T0, fx)
    spend(org, 1_000, T0 + US_PER_S, fx)
    org.release_lease("ls_1", T0 + 2 * US_PER_S, fx)
    assert org.halted == "balance"

    credit_fx = Effects()
    org.credit("topup", 10_000, None, None, T0 + 3 * US_PER_S, credit_fx)

    assert org.halted is None
    [resumed] = credit_fx.events
    assert (resumed.type, resumed.at_us, resumed.data) == (
        "org.resumed", T0 + 3 * US_PER_S, {"reason": "credit", "balance_micros": 10_000})
    assert org.leases is None
    assert org.state(T0 + 3 * US_PER_S).leases == []
    assert org.gate("create", SMALL, T0 + 3 * US_PER_S).reason == "ok"


def test_credit_smaller_than_the_debt_leaves_a_prepaid_org_halted():
    org, _ = make_org(signup_micros=1_000)
    fx = Effects()
    spend(org, 1_500, T0, fx)
    assert org.debt_micros == 500

    credit_fx = Effects()
    org.credit("topup", 300, None, None, T0 + US_PER_S, credit_fx)

    assert org.halted == "balance"
    assert org.debt_micros == 200
    assert org.grants is None
    assert org.balance_micros == -200
    assert credit_fx.events == []
    assert ledger_of(credit_fx) == [("topup", 300)]


def test_admin_halt_is_not_lifted_by_credit_and_admin_resume_lifts_it():
    org, _ = make_org()
    fx = Effects()
    org.acquire_lease("ls_1", SMALL, 600, T0, fx)

    halt_fx = Effects()
    org.halt(T0 + US_PER_S, halt_fx)
    assert org.halted == "admin"
    [halted] = halt_fx.events
    assert halted.data == {"reason": "admin", "lease_ids": ["ls_1"], "balance_micros": 5_000_000}

    credit_fx = Effects()
    org.credit("topup", 1_000_000, None, None, T0 + 2 * US_PER_S, credit_fx)
    assert org.halted == "admin"
    assert credit_fx.events == []
    assert org.gate("create", SMALL, T0 + 2 * US_PER_S).reason == "halted"

    resume_fx = Effects()
    org.resume(T0 + 3 * US_PER_S, resume_fx)
    assert org.halted is None
    [resumed] = resume_fx.events
    assert (resumed.type, resumed.data) == (
        "org.resumed", {"reason": "admin", "balance_micros": 6_000_000})
    assert org.gate("create", SMALL, T0 + 3 * US_PER_S).reason == "ok"
    assert list(org.leases) == ["ls_1"]  # resume never wakes or creates anything


def test_second_admin_halt_emits_nothing_more():
    org, _ = make_org()
    org.halt(T0, Effects())
    fx = Effects()

    org.halt(T0 + US_PER_S, fx)

    assert fx.events == []
    assert org.halted == "admin"


def test_admin_resume_of_prepaid_org_out_of_money_leaves_it_halted_for_balance():
    # Invariant 5: a prepaid org with nothing to spend is halted; lifting the admin halt
    # must not leave it running on zero.
    org, _ = make_org(signup_micros=1_000, card=True)
    org.acquire_lease("ls_1", SMALL, 600, T0, Effects())
    org.halt(T0, Effects())
    spend(org, 1_000, T0 + US_PER_S)  # ticks of the running lease, billed while admin-halted
    assert org.halted == "admin"

    fx = Effects()
    org.resume(T0 + 2 * US_PER_S, fx)

    assert org.halted == "balance"
    assert fx.events[-1].type == "org.halted"
    assert fx.events[-1].data == {"reason": "balance", "lease_ids": ["ls_1"], "balance_micros": 0}
    assert org.gate("create", SMALL, T0 + 2 * US_PER_S).reason == "halted"

    credit_fx = Effects()
    org.credit("topup", 5_000, None, None, T0 + 3 * US_PER_S, credit_fx)
    assert org.halted is None
    assert [e.type for e in credit_fx.events] == ["org.resumed"]


def test_prepaid_hobby_org_halted_for_balance_resumes_when_next_week_quota_arrives():
    org, _ = make_org(plan=HOBBY, signup_micros=0)
    spend(org, 5_000_000, T0)
    assert org.halted == "balance"
    next_monday = rfc3339_to_us("2026-03-09T00:00:00Z")

    fx = Effects()
    org.advance(next_monday, fx)

    assert org.period_key == "2026-W11"
    assert org.halted is None
    assert [(e.type, e.data["reason"]) for e in fx.events] == [("org.resumed", "period")]
    assert org.gate("create", SMALL, next_monday).reason == "ok"


def test_gate_stops_saying_halted_as_soon_as_a_new_week_brings_quota_before_any_mutation():
    org, _ = make_org(plan=HOBBY, signup_micros=0, card=True)
    spend(org, 5_000_000, T0)
    assert org.gate("create", SMALL, T0).reason == "halted"
    next_monday = rfc3339_to_us("2026-03-09T00:00:00Z")

    assert org.halted == "balance"  # nothing has mutated the org yet
    assert org.gate("create", SMALL, next_monday).reason == "ok"
    assert org.gate("create", SMALL, next_monday - 1).reason == "halted"


def test_admin_halt_still_denies_after_a_new_period_brings_quota():
    org, _ = make_org(plan=HOBBY)
    org.halt(T0, Effects())
    assert org.gate("create", SMALL, rfc3339_to_us("2026-03-09T00:00:00Z")).reason == "halted"


def test_prepaid_org_halted_for_balance_resumes_when_moved_to_a_plan_with_unused_quota():
    org, _ = make_org(signup_micros=0)
    assert org.halted == "balance"

    fx = Effects()
    execute(org, SetPlan("hobby_weekly", 1), CATALOG, T0 + US_PER_S, fx)

    assert (org.plan.id, org.period_key) == ("hobby_weekly", "2026-W10")
    assert org.halted is None
    assert [(e.type, e.data) for e in fx.events] == [
        ("org.resumed", {"reason": "plan", "balance_micros": 0})]


def test_prepaid_hobby_org_moved_to_free_in_the_same_week_stays_halted_with_its_quota_spent():
    org, _ = make_org(plan=HOBBY, signup_micros=0)
    spend(org, 5_000_000, T0)
    execute(org, SetPlan("free", 1), CATALOG, T0, Effects())  # same weekly period, quota spent

    assert org.halted == "balance"
    assert org.quota_remaining_at(T0) == 0


# ----- postpaid -------------------------------------------------------------------------


def test_postpaid_org_is_never_halted_for_balance_and_its_usage_past_credit_is_invoiced_not_debt():
    org, _ = make_org(prepaid=False, signup_micros=1_000)
    fx = Effects()

    spend(org, 5_000, T0, fx)

    assert org.halted is None
    assert org.balance_micros == 0 and org.debt_micros == 0  # the credit paid 1,000; Stripe bills 4,000
    assert [(e.kind, e.amount_micros, e.invoiced_micros) for _, e in fx.ledger] == [("usage", -1_000, 4_000)]
    assert events_of(fx, "org.halted") == []
    assert org.gate("create", SMALL, T0).reason == "ok"

    org.apply_usage([LeaseUsage("ls_1", units={"ingest_bytes": 5})], T0, fx)
    org.debit("refund", 1_000, None, T0, fx)
    assert org.halted is None


def test_postpaid_org_on_free_plan_past_its_quota_gets_quota_exceeded_not_halted():
    org, _ = make_org(plan=FREE, prepaid=False, signup_micros=0, card=True)
    spend(org, 999_999, T0)
    assert org.gate("create", SMALL, T0).reason == "ok"

    spend(org, 1, T0)

    assert org.halted is None
    decision = org.gate("create", SMALL, T0)
    assert (decision.allowed, decision.reason) == (False, "quota_exceeded")
    assert org.gate("ingest", SMALL, T0).reason == "quota_exceeded"
    assert org.gate("purchase", SMALL, T0).reason == "ok"


def test_insufficient_balance_quota_exceeded_and_halted_are_distinct_denials():
    # A postpaid org on a plan with no quota and no overage has no money: it is not halted
    # (only prepaid orgs are), it is short of money.
    broke, _ = make_org(plan=msgspec.structs.replace(PAYG, overage=False), prepaid=False, signup_micros=0,
                        card=True)
    assert broke.halted is None
    insufficient = broke.gate("create", SMALL, T0)
    assert (insufficient.reason, insufficient.balance_micros) == ("insufficient_balance", 0)

    # A prepaid org whose only grant expired is halted, and the gate says so at once, as of
    # its read: before anything (a command, the scheduler's sweep) applied the expiry.
    org, _ = make_org(signup_micros=0, card=True)
    org.credit("grant", 1_000_000, T0 + DAY_US, None, T0, Effects())
    after_expiry = T0 + DAY_US + US_PER_S
    assert org.halted is None and org.gate("create", SMALL, after_expiry).reason == "halted"
    org.advance(after_expiry, Effects())
    assert org.halted == "balance" and org.gate("create", SMALL, after_expiry).reason == "halted"

    free_org, _ = make_org(plan=FREE, prepaid=False, signup_micros=0, card=True)
    spend(free_org, 1_000_000, T0)
    exceeded = free_org.gate("create", SMALL, T0)
    assert exceeded.reason == "quota_exceeded"


# ----- concurrency leases ---------------------------------------------------------------


def test_base_tier_org_at_its_five_lease_cap_is_refused_with_concurrency_limit():
    org, _ = make_org()
    fx = Effects()
    for i in range(4):
        assert org.acquire_lease(f"ls_{i}", SMALL, 600, T0, fx)[0] is None

    deny, lease, created = org.acquire_lease("ls_pair", Resources(quantity=2), 600, T0, fx)
    assert lease is None and not created
    assert (deny.reason, deny.active_leases, deny.max_concurrent) == ("concurrency_limit", 4, 5)

    assert org.acquire_lease("ls_4", SMALL, 600, T0, fx)[0] is None
    deny, _, _ = org.acquire_lease("ls_5", SMALL, 600, T0, fx)
    assert (deny.reason, deny.active_leases) == ("concurrency_limit", 5)
    assert sorted(org.leases) == [f"ls_{i}" for i in range(5)]


def test_acquiring_the_same_lease_id_again_returns_the_same_lease_without_creating_one():
    org, _ = make_org()
    first = execute(org, AcquireLease("ls_1", SMALL, 120), CATALOG, T0, Effects())
    before = org.to_snapshot()

    again = execute(org, AcquireLease("ls_1", SMALL, 120), CATALOG, T0, Effects())

    assert isinstance(first, LeaseGranted) and first.created
    assert (first.lease.lease_id, first.lease.expires_at_us, first.lease.ttl_s, first.lease.quantity) == (
        "ls_1", rfc3339_to_us("2026-03-02T09:02:00Z"), 120, 1)
    assert again == LeaseGranted(first.lease, created=False)
    assert org.to_snapshot() == before
    assert org.active_leases_at(T0) == 1


def test_same_lease_id_with_other_resources_is_a_conflict_and_changes_nothing():
    org, _ = make_org()
    org.acquire_lease("ls_1", SMALL, 120, T0, Effects())
    before = org.to_snapshot()

    with pytest.raises(LeaseConflict) as conflict:
        org.acquire_lease("ls_1", Resources(memory_mb=1024, cpu_count=1), 120, T0, Effects())

    assert conflict.value.code == Refusal.IDEMPOTENCY_CONFLICT
    assert org.to_snapshot() == before


def test_renewed_lease_outlives_its_first_ttl_and_unknown_lease_renewal_is_refused():
    org, _ = make_org()
    org.acquire_lease("ls_1", SMALL, 60, T0, Effects())

    lease = org.renew_lease("ls_1", T0 + 30 * US_PER_S, Effects())

    assert lease.expires_at_us == T0 + 90 * US_PER_S
    assert org.active_leases_at(T0 + 89 * US_PER_S) == 1
    assert org.active_leases_at(T0 + 90 * US_PER_S) == 0
    with pytest.raises(UnknownLease) as unknown:
        org.renew_lease("ls_nope", T0 + 31 * US_PER_S, Effects())
    assert unknown.value.code == Refusal.UNKNOWN_LEASE


def test_usage_tick_for_a_lease_is_a_heartbeat_that_extends_it():
    org, _ = make_org()
    org.acquire_lease("ls_1", SMALL, 60, T0, Effects())

    org.apply_usage([LeaseUsage("ls_1", cpu_ms=1000, ticks=1)], T0 + 50 * US_PER_S, Effects())

    assert org.leases["ls_1"].expires_at_us == T0 + 110 * US_PER_S


def test_released_lease_frees_its_slot_and_a_second_release_is_harmless():
    org, _ = make_org()
    org.set_tier("custom", 1, T0, Effects())
    org.acquire_lease("ls_1", SMALL, 600, T0, Effects())
    assert org.acquire_lease("ls_2", SMALL, 600, T0, Effects())[0].reason == "concurrency_limit"

    assert org.release_lease("ls_1", T0 + US_PER_S, Effects()) is True
    assert org.acquire_lease("ls_2", SMALL, 600, T0 + US_PER_S, Effects())[0] is None
    assert org.release_lease("ls_1", T0 + 2 * US_PER_S, Effects()) is False
    assert list(org.leases) == ["ls_2"]


def test_expired_lease_frees_its_slot_and_is_reported_on_the_next_mutation():
    org, _ = make_org()
    org.set_tier("custom", 1, T0, Effects())
    org.acquire_lease("ls_1", SMALL, 60, T0, Effects())
    later = T0 + 61 * US_PER_S

    # Read-only: the slot is already free, but nothing is emitted by a read.
    assert org.gate("create", SMALL, later).reason == "ok"
    assert "ls_1" in org.leases

    fx = Effects()
    org.apply_usage([], later, fx)

    assert org.leases is None
    [expired] = fx.events
    assert (expired.type, expired.at_us, expired.data) == (
        "lease.expired", later, {"lease_id": "ls_1", "expired_at": "2026-03-02T09:01:00Z"})
    assert org.acquire_lease("ls_2", SMALL, 60, later, Effects())[0] is None


def test_lowering_the_tier_below_active_leases_keeps_them_but_denies_new_ones():
    org, _ = make_org()
    for i in range(3):
        org.acquire_lease(f"ls_{i}", SMALL, 600, T0, Effects())

    org.set_tier("custom", 2, T0 + US_PER_S, Effects())

    assert sorted(org.leases) == ["ls_0", "ls_1", "ls_2"]
    assert org.active_leases_at(T0 + US_PER_S) == 3
    deny, _, _ = org.acquire_lease("ls_3", SMALL, 600, T0 + US_PER_S, Effects())
    assert (deny.reason, deny.active_leases, deny.max_concurrent) == ("concurrency_limit", 3, 2)
    # the existing ones can still be renewed, and idempotent re-acquire still answers
    assert org.acquire_lease("ls_0", SMALL, 600, T0 + US_PER_S, Effects())[1].lease_id == "ls_0"

    org.release_lease("ls_0", T0 + 2 * US_PER_S, Effects())
    assert org.acquire_lease("ls_3", SMALL, 600, T0 + 2 * US_PER_S, Effects())[0].reason == (
        "concurrency_limit")  # 2 active + 1 > 2
    org.release_lease("ls_1", T0 + 2 * US_PER_S, Effects())
    assert org.acquire_lease("ls_3", SMALL, 600, T0 + 2 * US_PER_S, Effects())[0] is None


def test_disk_request_above_the_org_limit_is_a_resource_limit_naming_the_resource():
    org, _ = make_org()

    deny, lease, _ = org.acquire_lease("ls_1", Resources(disk_mb=30_000), 600, T0, Effects())

    assert lease is None
    assert msgspec.to_builtins(deny) == {
        "allowed": False, "reason": "resource_limit", "balance_micros": 5_000_000,
        "active_leases": 0, "max_concurrent": 5, "limit": 20_480, "requested": 30_000,
        "resource": "disk_mb"}
    assert org.acquire_lease("ls_1", Resources(disk_mb=20_480), 600, T0, Effects())[0] is None


def test_machine_type_quota_per_region_caps_that_type_only_in_that_region():
    org, _ = make_org()
    execute(org, SetLimits(None, {"us-east": {"a100": 2}}), CATALOG, T0, Effects())
    gpu_east = Resources(machine_type="a100", region="us-east")

    assert org.acquire_lease("ls_1", gpu_east, 600, T0, Effects())[0] is None
    assert org.acquire_lease("ls_2", gpu_east, 600, T0, Effects())[0] is None
    deny, _, _ = org.acquire_lease("ls_3", gpu_east, 600, T0, Effects())

    assert (deny.reason, deny.limit, deny.requested, deny.in_use, deny.resource) == (
        "resource_limit", 2, 3, 2, "machine_type:us-east/a100")
    assert org.acquire_lease("ls_4", Resources(machine_type="a100", region="eu-west"), 600, T0,
                             Effects())[0] is None
    assert org.acquire_lease("ls_5", Resources(machine_type="t4", region="us-east"), 600, T0,
                             Effects())[0] is None
    org.release_lease("ls_1", T0 + US_PER_S, Effects())
    assert org.acquire_lease("ls_6", gpu_east, 600, T0 + US_PER_S, Effects())[0] is None


def test_set_limits_with_none_keeps_the_disk_limit_and_empty_quotas_clear_them():
    org, _ = make_org()
    org.set_limits(1_000, {"us-east": {"a100": 0}}, T0, Effects())
    org.set_limits(None, None, T0, Effects())
    assert (org.max_disk_mb, org.machine_quotas) == (1_000, {"us-east": {"a100": 0}})

    org.set_limits(None, {}, T0, Effects())

    assert org.machine_quotas is None


# ----- quota thresholds -----------------------------------------------------------------


def test_quota_thresholds_fire_once_per_week_and_again_the_next_week():
    org, _ = make_org(plan=HOBBY)
    fx = Effects()

    spend(org, 3_999_999, T0, fx)
    assert fx.events == []
    spend(org, 1, T0, fx)                      # 4,000,000 = 80 % of 5,000,000
    spend(org, 500_000, T0, fx)
    [eighty] = fx.events
    assert (eighty.type, eighty.data) == ("quota.threshold_crossed", {
        "percent": 80, "period": "2026-W10", "quota_micros": 5_000_000, "used_micros": 4_000_000})

    spend(org, 500_000, T0 + US_PER_S, fx)     # 5,000,000 = 100 %
    spend(org, 500_000, T0 + US_PER_S, fx)     # past the quota: from credit, no new event
    assert [e.data["percent"] for e in fx.events] == [80, 100]
    assert fx.events[1].data["used_micros"] == 5_000_000

    next_week = rfc3339_to_us("2026-03-10T12:00:00Z")
    week_fx = Effects()
    spend(org, 5_000_000, next_week, week_fx)   # both in one tick, each once

    assert [(e.data["percent"], e.data["period"]) for e in week_fx.events] == [
        (80, "2026-W11"), (100, "2026-W11")]
    assert org.quota_used_micros == 5_000_000
    assert org.period_usage_micros == 5_000_000


def test_week_rollover_restores_the_quota_and_resets_period_usage():
    org, _ = make_org(plan=HOBBY)
    spend(org, 5_000_100, T0)
    assert org.balance_micros == 4_999_900
    sunday_night = rfc3339_to_us("2026-03-08T23:59:59Z")
    monday = rfc3339_to_us("2026-03-09T00:00:00Z")

    assert org.quota_remaining_at(sunday_night) == 0
    assert org.quota_remaining_at(monday) == 5_000_000
    state = org.state(monday)
    assert (state.quota_used_micros, state.period_usage_micros) == (0, 0)

    spend(org, 1_000, monday)

    assert (org.period_key, org.period_start_us, org.period_end_us) == (
        "2026-W11", monday, rfc3339_to_us("2026-03-16T00:00:00Z"))
    assert org.quota_used_micros == 1_000
    assert org.balance_micros == 4_999_900


# ----- grant expiry and refunds ---------------------------------------------------------


def test_expired_grant_writes_an_expiration_entry_for_exactly_its_unused_part():
    org, _ = make_org()
    expires = T0 + 3 * DAY_US
    org.credit("grant", 1_000_000, expires, "promo", T0, Effects())
    spend(org, 400_000, T0 + US_PER_S)  # the expiring grant is spent first
    assert grants_by_id(org) == {"gr_1": 5_000_000, "gr_2": 600_000}

    fx = Effects()
    execute(org, Advance(), CATALOG, expires, fx)

    assert fx.ledger == [(ORG_ID, LedgerEntry("expiration", -600_000, expires, "gr_2", expires))]
    assert grants_by_id(org) == {"gr_1": 5_000_000}
    assert org.balance_micros == 5_000_000

    again = Effects()
    org.advance(expires + DAY_US, again)
    assert again.ledger == []


def test_grant_spent_before_it_expires_leaves_no_expiration_entry():
    org, _ = make_org()
    org.credit("grant", 1_000, T0 + DAY_US, None, T0, Effects())
    spend(org, 1_000, T0)

    fx = Effects()
    org.advance(T0 + 2 * DAY_US, fx)

    assert fx.ledger == []
    assert org.balance_micros == 5_000_000


def test_expiry_of_the_last_grant_halts_a_prepaid_org():
    org, _ = make_org(signup_micros=0)
    org.credit("grant", 2_000, T0 + DAY_US, None, T0, Effects())
    org.acquire_lease("ls_1", SMALL, 86_400, T0, Effects())
    org.renew_lease("ls_1", T0 + DAY_US // 2, Effects())

    fx = Effects()
    org.advance(T0 + DAY_US, fx)

    assert ledger_of(fx) == [("expiration", -2_000)]
    assert org.halted == "balance"
    [halted] = fx.events
    assert halted.data == {"reason": "balance", "lease_ids": ["ls_1"], "balance_micros": 0}


def test_refund_claws_back_purchased_credit_before_promotional_credit():
    org, _ = make_org()
    org.credit("topup", 3_000_000, None, None, T0, Effects())
    fx = Effects()

    result = execute(org, Credit("refund", -4_000_000, note="chargeback"), CATALOG, T0, fx)

    assert result == Booked(LedgerEntry("refund", -4_000_000, T0, note="chargeback"), balance_micros=4_000_000)
    assert grants_by_id(org) == {"gr_1": 4_000_000}
    assert org.halted is None


def test_refund_that_takes_the_balance_to_zero_halts_a_prepaid_org_with_its_leases():
    org, _ = make_org(signup_micros=0)
    org.credit("topup", 2_000_000, None, None, T0, Effects())
    assert org.halted is None
    org.acquire_lease("ls_1", SMALL, 600, T0, Effects())
    spend(org, 500_000, T0)

    fx = Effects()
    execute(org, Credit("refund", -1_500_000), CATALOG, T0 + US_PER_S, fx)

    assert org.balance_micros == 0
    assert org.grants is None
    assert org.halted == "balance"
    assert ledger_of(fx) == [("refund", -1_500_000)]
    halted, runway = fx.events  # and, the lease still held, its runway of 0 (billing-rules 2.10)
    assert halted.data == {"reason": "balance", "lease_ids": ["ls_1"], "balance_micros": 0}
    assert (runway.type, runway.data["runway_s"], runway.data["lease_ids"]) == ("balance.runway_low", 0, ["ls_1"])


def test_refund_larger_than_the_balance_becomes_debt_paid_by_the_next_credit():
    org, _ = make_org(signup_micros=0)
    org.credit("topup", 1_000, None, None, T0, Effects())
    org.debit("adjustment", 1_500, "correction", T0, Effects())
    assert (org.balance_micros, org.debt_micros) == (-500, 500)

    org.credit("topup", 600, None, None, T0, Effects())

    assert (org.balance_micros, org.debt_micros, grants_by_id(org)) == (100, 0, {"gr_2": 100})
    assert org.halted is None


# ----- snapshots and replay -------------------------------------------------------------


def _busy_org() -> tuple[OrgBillingActor, int]:
    org, _ = make_org(plan=HOBBY)
    fx = Effects()
    org.credit("grant", 700_000, T0 + 5 * DAY_US, "promo", T0, fx)
    org.credit("topup", 2_000_000, None, None, T0, fx)
    org.set_limits(10_000, {"us-east": {"a100": 3}}, T0, fx)
    org.set_tier("pro", 100, T0, fx)
    org.acquire_lease("ls_1", Resources(memory_mb=2048, cpu_count=2, machine_type="a100",
                                        region="us-east", quantity=2), 600, T0, fx)
    org.acquire_lease("ls_2", SMALL, 60, T0, fx)
    org.apply_usage([LeaseUsage("ls_1", memory_mb_ms=4096 * 3_600_000, cpu_ms=7_200_123,
                                disk_mb_ms=777, ticks=3)], T0 + US_PER_S, fx)
    spend(org, 4_000_000, T0 + US_PER_S, fx)  # past 80 % of the weekly quota
    return org, T0 + US_PER_S


def test_snapshot_round_trip_through_msgpack_gives_an_identical_org():
    org, now = _busy_org()
    assert org.remainder_scaled != 0
    assert org.thresholds_fired == 0b01

    wire = msgspec.msgpack.encode(org.to_snapshot())
    snap = msgspec.msgpack.decode(wire, type=OrgSnapshot)
    restored = OrgBillingActor.from_snapshot(snap, CATALOG)

    assert restored.state(now) == org.state(now)
    assert restored.to_snapshot() == org.to_snapshot()
    # and it goes on exactly like the original
    later = now + 2 * DAY_US
    for target in (org, restored):
        fx = Effects()
        target.apply_usage([LeaseUsage("ls_1", cpu_ms=123_457, ticks=1)], later, fx)
        target.acquire_lease("ls_3", SMALL, 60, later, fx)
    assert restored.to_snapshot() == org.to_snapshot()
    assert restored.state(later) == org.state(later)


def test_snapshot_of_a_halted_org_in_debt_round_trips():
    org, _ = make_org(signup_micros=100)
    spend(org, 300, T0)
    assert (org.halted, org.debt_micros) == ("balance", 200)

    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(org.to_snapshot()), type=OrgSnapshot)
    restored = OrgBillingActor.from_snapshot(snap, CATALOG)

    assert restored.to_snapshot() == org.to_snapshot()
    assert restored.state(T0) == org.state(T0)


# Written by the code before halt causes and dunning steps were enums, as Postgres holds them:
# `halted` the plain string "balance", the dunning step the plain int 2. The org of
# make_org(signup_micros=0) after the journal below.
SNAPSHOT_BEFORE_ENUMS = bytes.fromhex(
    "dc0020a86f72675f61636d65ad6f70734061636d652e74657374c3a47061796701a46261736505cd5000c0c00000a732"
    "3032362d3033cf00064beb26c36000cf00064e5ac3d80000000000a762616c616e6365c3cf00064c06cfcb8400c0c2cf"
    "00064c06cfcb84000000c098cf00064c06cfcb8400ce00015180ce0002a300ce00278d008ba26964a466726565a77665"
    "7273696f6e01b16566666563746976655f66726f6d5f7573cf0006474846204000b26566666563746976655f756e7469"
    "6c5f7573c0a6706572696f64a47765656baf696e636c756465645f6d6963726f73ce000f4240a76f766572616765c2b6"
    "6d656d6f72795f6e616e6f735f7065725f6769625f73cd1194b46370755f6e616e6f735f7065725f766370755f73cd36"
    "b0b46469736b5f6e616e6f735f7065725f6769625f731eaa756e69745f6e616e6f7381ac696e676573745f6279746573"
    "0002c091a4696e5f31c2cf00064c06cfcb840000c2")
JOURNAL_BEFORE_ENUMS = bytes.fromhex(
    "9292cf00064c06cfcb840198aa696e765f6661696c6564cf00064c06cfcb8400ce00015180ce0002a300ce00278d00a4"
    "6672656501a4696e5f3192cf00064c432951a40091a7616476616e6365")


def test_snapshot_and_journal_written_before_the_enums_decode_to_the_same_org():
    items = JOURNAL_DECODER.decode(JOURNAL_BEFORE_ENUMS)
    assert items == [
        JournalItem(T0 + 1, InvoiceFailed(T0, 86_400, 2 * 86_400, 30 * 86_400, "free", 1, "in_1")),
        JournalItem(T0 + 3 * DAY_US, Advance())]
    org, fx = make_org(signup_micros=0)
    for item in items:
        execute(org, item.command, CATALOG, item.at_us, fx)

    snap = decode_snapshot(SNAPSHOT_BEFORE_ENUMS)  # format 1 (tests/test_formats.py has every format)
    restored = OrgBillingActor.from_snapshot(snap, CATALOG)

    assert (type(snap.halted), type(snap.dunning.step)) == (HaltCause, DunningStep)
    assert (restored.halted, restored.dunning.step) == (HaltCause.BALANCE, DunningStep.DEGRADED)
    assert restored.to_snapshot() == org.to_snapshot()
    assert restored.state(T0 + 3 * DAY_US) == org.state(T0 + 3 * DAY_US)
    assert restored.gate("purchase", SMALL, T0 + 3 * DAY_US).reason == "suspended"
    # Enums are stored by value, as before: how saved fields may change is tests/test_formats.py's lock.
    assert JOURNAL_DECODER.decode(JOURNAL_ENCODER.encode(items)) == items


def test_create_org_goes_through_execute_and_an_existing_org_is_left_as_it_is():
    fx = Effects()
    outcome = execute(None, CreateOrg("ops@acme.test", "hobby_weekly", True), CATALOG, T0, fx, org_id=ORG_ID)

    assert isinstance(outcome, OrgCreated) and outcome.created
    org = outcome.org
    assert (org.org_id, org.plan.id, org.tier, org.max_concurrent, org.balance_micros) == (
        ORG_ID, "hobby_weekly", CATALOG.default_tier, CATALOG.tiers[CATALOG.default_tier],
        CATALOG.signup_grant_micros)
    assert fx.ledger == [(ORG_ID, LedgerEntry("signup_grant", CATALOG.signup_grant_micros, T0, "gr_1"))]
    before = org.to_snapshot()
    again = execute(org, CreateOrg("other@acme.test", "payg", False), CATALOG, T0 + DAY_US, Effects())
    assert again == OrgCreated(org, created=False)
    assert org.to_snapshot() == before

    with pytest.raises(BillingError) as unknown:
        execute(None, CreateOrg("ops@acme.test", "no_such_plan", True), CATALOG, T0, Effects(), org_id="org_new")
    assert unknown.value.code == Refusal.UNKNOWN_PLAN


def test_replay_of_the_journal_rebuilds_identical_state():
    org, create_fx = make_org(plan=HOBBY)
    journal = [
        JournalItem(T0, SetLimits(15_000, {"eu-west": {"h100": 1}})),
        JournalItem(T0, AcquireLease("ls_1", Resources(memory_mb=1024, cpu_count=1,
                                                       machine_type="h100", region="eu-west"),
                                     300)),
        JournalItem(T0, AcquireLease("ls_2", Resources(machine_type="h100", region="eu-west"),
                                     300)),
        JournalItem(T0, AcquireLease("ls_1", SMALL, 300)),  # conflict: replays as a failure too
        JournalItem(T0 + US_PER_S, Credit("grant", 900_000, T0 + 2 * DAY_US, "promo", "k1")),
        JournalItem(T0 + US_PER_S, Credit("topup", 4_000_000)),
        JournalItem(T0 + 2 * US_PER_S, ApplyUsage([
            LeaseUsage("ls_1", memory_mb_ms=1024 * 3_600_000, cpu_ms=3_600_000, ticks=60),
            LeaseUsage("ls_x", cpu_ms=1, ticks=1)])),
        JournalItem(T0 + 3 * US_PER_S, RenewLease("ls_1")),
        JournalItem(T0 + 4 * US_PER_S, RenewLease("ls_gone")),  # unknown lease
        JournalItem(T0 + 5 * US_PER_S, Credit("refund", -1_000_000)),
        JournalItem(T0 + 6 * US_PER_S, SetTier("pro", 100)),
        JournalItem(T0 + 7 * US_PER_S, Halt()),
        JournalItem(T0 + 8 * US_PER_S, Resume()),
        JournalItem(T0 + 3 * DAY_US, Advance()),  # grant expiry, lease expiry
        JournalItem(T0 + 3 * DAY_US, SetPlan("payg", 1)),
        JournalItem(T0 + 8 * DAY_US, ApplyUsage([LeaseUsage("ls_1", cpu_ms=90_000_001, ticks=2)])),
        JournalItem(T0 + 8 * DAY_US, ReleaseLease("ls_1")),
    ]
    live_fx = Effects()
    failures = []
    for item in journal:
        try:
            execute(org, item.command, CATALOG, item.at_us, live_fx)
        except BillingError as error:
            failures.append(type(error).__name__)
    assert failures == ["LeaseConflict", "UnknownLease"]
    assert sum(e.amount_micros for _, e in create_fx.ledger + live_fx.ledger) == org.balance_micros

    decoded = JOURNAL_DECODER.decode(JOURNAL_ENCODER.encode(journal))
    assert decoded == journal
    fresh, _ = make_org(plan=HOBBY)
    replay(fresh, decoded, CATALOG)

    assert fresh.to_snapshot() == org.to_snapshot()
    assert fresh.state(T0 + 8 * DAY_US) == org.state(T0 + 8 * DAY_US)


# ----- time -----------------------------------------------------------------------------

MOMENT_S = 1_772_442_000  # 2026-03-02T09:00:00Z


@pytest.mark.parametrize("value", [
    MOMENT_S, MOMENT_S * 1_000, MOMENT_S * 1_000_000, MOMENT_S * 1_000_000_000])
def test_epoch_in_seconds_millis_micros_or_nanos_is_told_apart_by_magnitude(value):
    assert epoch_to_us(value) == T0
    assert parse_time_us(value) == T0


def test_epoch_keeps_sub_second_precision_of_each_unit():
    assert epoch_to_us(MOMENT_S * 1_000 + 7) == T0 + 7_000
    assert epoch_to_us(MOMENT_S * 1_000_000 + 7) == T0 + 7
    assert epoch_to_us(MOMENT_S * 1_000_000_000 + 7_999) == T0 + 7


@pytest.mark.parametrize("value", [
    0, -1, 123, 946_684_799,              # before 2000 in seconds
    4_102_444_800,                        # 2100 in seconds
    5_000_000_000,                        # between the seconds and the millis ranges
    946_684_799_999,                      # just before 2000 in millis
    4_102_444_800_000_000_000,            # 2100 in nanos
    10**20,
])
def test_implausible_epoch_is_rejected(value):
    with pytest.raises(BadTime):
        epoch_to_us(value)


@pytest.mark.parametrize("value", [True, 1.5e9, None, b"2026"])
def test_time_that_is_neither_text_nor_integer_is_rejected(value):
    with pytest.raises(BadTime):
        parse_time_us(value)


def test_rfc3339_needs_an_offset_and_a_plausible_date():
    assert parse_time_us("2026-03-02T09:00:00Z") == T0
    assert parse_time_us("2026-03-02T10:00:00+01:00") == T0
    assert parse_time_us("2026-03-02T09:00:00.000250Z") == T0 + 250
    for bad in ("2026-03-02T09:00:00", "yesterday", "1999-12-31T23:59:59Z", "2100-01-01T00:00:00Z"):
        with pytest.raises(BadTime):
            parse_time_us(bad)


def test_rfc3339_output_round_trips_and_shows_micros_only_when_present():
    assert us_to_rfc3339(T0) == "2026-03-02T09:00:00Z"
    assert us_to_rfc3339(T0 + 250) == "2026-03-02T09:00:00.000250Z"
    assert rfc3339_to_us(us_to_rfc3339(T0 + 250)) == T0 + 250


@pytest.mark.parametrize(("moment", "key", "start", "end"), [
    ("2026-03-04T15:00:00Z", "2026-W10", "2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z"),
    ("2026-03-08T23:59:59.999999Z", "2026-W10", "2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z"),
    ("2026-03-09T00:00:00Z", "2026-W11", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
    # ISO weeks across the year boundary: 2026-W01 starts in 2025, 2026 has a week 53
    ("2026-01-01T00:00:00Z", "2026-W01", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z"),
    ("2025-12-29T00:00:00Z", "2026-W01", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z"),
    ("2027-01-01T12:00:00Z", "2026-W53", "2026-12-28T00:00:00Z", "2027-01-04T00:00:00Z"),
    ("2027-01-04T00:00:00Z", "2027-W01", "2027-01-04T00:00:00Z", "2027-01-11T00:00:00Z"),
])
def test_week_period_is_the_iso_week_from_monday_to_monday(moment, key, start, end):
    assert period_bounds("week", rfc3339_to_us(moment)) == (
        key, rfc3339_to_us(start), rfc3339_to_us(end))


@pytest.mark.parametrize(("moment", "key", "start", "end"), [
    ("2026-03-02T09:00:00Z", "2026-03", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
    ("2026-12-31T23:59:59Z", "2026-12", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("2027-01-01T00:00:00Z", "2027-01", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),
    ("2028-02-29T12:00:00Z", "2028-02", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
])
def test_month_period_runs_from_the_first_to_the_first_of_the_next_month(moment, key, start, end):
    assert period_bounds("month", rfc3339_to_us(moment)) == (
        key, rfc3339_to_us(start), rfc3339_to_us(end))


def test_unknown_period_name_is_refused():
    with pytest.raises(ValueError):
        period_bounds("fortnight", T0)


def test_free_credit_used_up_without_a_card_asks_for_one_at_create():
    org, _ = make_org(signup_micros=1_000)
    org.apply_usage([usage_costing(1_000)], T0, Effects())
    assert org.halted == "balance"
    for action, reason in (("create", "no_payment_method"), ("wake", "halted"), ("ingest", "halted")):
        decision = org.gate(action, SMALL, T0)
        assert (decision.allowed, decision.reason) == (False, reason), action
    paid, _ = make_org(signup_micros=1_000)
    paid.credit("topup", 1_000, None, None, T0, Effects())  # paid once: it knows how to pay
    paid.apply_usage([usage_costing(2_000)], T0, Effects())
    assert paid.gate("create", SMALL, T0).reason == "halted"
