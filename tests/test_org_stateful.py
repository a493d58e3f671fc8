"""Property and stateful tests of the billing core, driven through `execute` like the shard.

The state machine applies random commands at a moving clock and checks the ledger
invariants of DESIGN.md after every step; at teardown it replays the journal it recorded on
a fresh org and demands the same snapshot.
"""

from __future__ import annotations

import copy

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from actors.commands import (
    JOURNAL_DECODER,
    JOURNAL_ENCODER,
    AcquireLease,
    Advance,
    ApplyUsage,
    Credit,
    Debited,
    Halt,
    JournalItem,
    LeaseDenied,
    LeaseGranted,
    Outcome,
    Released,
    ReleaseLease,
    RenewLease,
    Resume,
    SetLimits,
    SetPlan,
    InvoiceFailed,
    InvoicePaid,
    ResetPeriod,
    SetAutoRecharge,
    SetPaymentMethod,
    SetTier,
    SettleRecharge,
    execute,
    replay,
)
from actors.leases import same_resources
from actors.metering import SCALED_PER_MICRO, LeaseUsage, cost_scaled
from actors.org import (
    BillingError,
    Effects,
    LeaseConflict,
    LeaseEnded,
    OrgBillingActor,
    OrgSnapshot,
    Resources,
    UnknownLease,
)
from actors.timeutil import US_PER_S, rfc3339_to_us
from config.catalog import load_catalog
from config.settings import DEFAULT_CATALOG
from metergate_client.decision import ACTIONS, decide
from metergate_client.projection import RECORD_DECODER, RECORD_ENCODER, ViewRecord

CATALOG = load_catalog(DEFAULT_CATALOG)
ORG_ID = "org_prop"
T0 = rfc3339_to_us("2026-03-02T09:00:00Z")
PLAN_IDS = ("payg", "hobby_weekly", "free")
LEASE_IDS = tuple(f"ls_{i}" for i in range(6))
RESOURCE_CHOICES = (
    Resources(memory_mb=512, cpu_count=1),
    Resources(memory_mb=2048, cpu_count=2, disk_mb=10_240),
    Resources(machine_type="a100", region="us-east"),
    Resources(machine_type="a100", region="us-east", quantity=2),
    Resources(machine_type="a100", region="eu-west"),
    Resources(disk_mb=30_000),
    Resources(quantity=3),
)

lease_usages = st.builds(
    LeaseUsage,
    lease_id=st.sampled_from(LEASE_IDS + ("ls_unknown",)),
    # tiny ticks (sub-micro, carried) as well as big ones (up to ~14 USD, past any balance)
    memory_mb_ms=st.one_of(st.integers(0, 5_000), st.integers(0, 10**11)),
    cpu_ms=st.one_of(st.integers(0, 100), st.integers(0, 10**8), st.integers(0, 10**9)),
    disk_mb_ms=st.one_of(st.just(0), st.integers(0, 10**10)),
    units=st.one_of(st.none(), st.fixed_dictionaries({"ingest_bytes": st.integers(0, 10**9)})),
    ticks=st.integers(1, 60),
)
amounts_micros = st.one_of(st.integers(1, 2_000), st.integers(1, 3_000_000))


def new_org(plan_id: str, prepaid: bool, signup_micros: int, tier: str, now_us: int,
            fx: Effects) -> OrgBillingActor:
    return OrgBillingActor.create(ORG_ID, "prop@example.test", prepaid,
                                  CATALOG.current_plan(plan_id, now_us), tier, CATALOG.tiers[tier],
                                  CATALOG.default_max_disk_mb, signup_micros, now_us, fx)


def snapshot_through_msgpack(org: OrgBillingActor) -> OrgBillingActor:
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(org.to_snapshot()), type=OrgSnapshot)
    return OrgBillingActor.from_snapshot(snap, CATALOG)


class OrgLedgerMachine(RuleBasedStateMachine):
    """One org under random commands; every command is journaled as the shard would."""

    @initialize(plan_id=st.sampled_from(PLAN_IDS), prepaid=st.booleans(),
                signup_micros=st.sampled_from((0, 1_000, 5_000_000)),
                tier=st.sampled_from(("base", "pro")),
                start_offset_s=st.integers(0, 7 * 86_400))
    def create_org(self, plan_id, prepaid, signup_micros, tier, start_offset_s):
        self.now = T0 + start_offset_s * US_PER_S
        self.creation = (plan_id, prepaid, signup_micros, tier, self.now)
        fx = Effects()
        self.org = new_org(*self.creation, fx)
        self.ledger_total_micros = 0
        self.journal: list[JournalItem] = []
        self.charges: list = []  # every charge the org asked for, with the time it asked
        self._record(fx)
        self.applied_us = self.now

    def _record(self, fx: Effects) -> None:
        for org_id, entry in fx.ledger:
            assert org_id == ORG_ID
            self.ledger_total_micros += entry.amount_micros
        for event in fx.events:
            assert event.org_id == ORG_ID
            assert event.at_us == self.now
        for charge in fx.charges:
            recharge = self.org.recharge
            assert len(fx.charges) == 1, "one charge at a time"
            assert 0 < charge.amount_micros <= 10**10 and charge.amount_micros % 10_000 == 0
            assert self.org.balance_micros + charge.amount_micros > recharge.threshold_micros
            if self.charges:  # the cooldown since the last charge asked for
                assert self.now - self.charges[-1][1] >= recharge.cooldown_s * US_PER_S
            day = self.now // (86_400 * US_PER_S)
            today = sum(1 for _, at in self.charges if at // (86_400 * US_PER_S) == day)
            assert today + 1 <= recharge.max_per_day, "the daily cap"
            self.charges.append((charge, self.now))

    def apply(self, command) -> tuple[Outcome | None, BillingError | None]:
        fx = Effects()
        result, error = None, None
        try:
            result = execute(self.org, command, CATALOG, self.now, fx)
        except BillingError as exc:
            error = exc  # time's effects stay applied, and replay fails the same way
        self.journal.append(JournalItem(self.now, command))
        self.applied_us = self.now
        self._record(fx)
        return result, error

    def _active_lease_ids(self) -> list[str]:
        return sorted(l.lease_id for l in (self.org.leases or {}).values()
                      if l.expires_at_us > self.now)

    # ----- rules ----------------------------------------------------------------------

    @rule(usages=st.lists(lease_usages, max_size=4))
    def use(self, usages):
        scaled = sum(cost_scaled(self.org.plan, usage) for usage in usages)
        expected_micros, expected_remainder = divmod(self.org.remainder_scaled + scaled,
                                                     SCALED_PER_MICRO)
        result, error = self.apply(ApplyUsage(usages))
        assert error is None
        assert result == Debited(expected_micros)
        assert self.org.remainder_scaled == expected_remainder

    @rule(kind=st.sampled_from(("grant", "topup", "auto_recharge", "adjustment")),
          amount=amounts_micros,
          expires_in_s=st.one_of(st.none(), st.integers(1, 14 * 86_400)))
    def credit(self, kind, amount, expires_in_s):
        expires = None if expires_in_s is None else self.now + expires_in_s * US_PER_S
        result, error = self.apply(Credit(kind, amount, expires))
        assert error is None
        assert result.entry.amount_micros == amount
        assert result.balance_micros == self.org.balance_micros
        if self.org.halted == "balance":
            assert self.org.balance_micros + self.org.quota_remaining_at(self.now) <= 0

    @rule(kind=st.sampled_from(("refund", "adjustment")), amount=amounts_micros,
          whole_balance=st.booleans())
    def take_back(self, kind, amount, whole_balance):
        if whole_balance and self.org.balance_micros > 0:
            amount = self.org.balance_micros  # a full refund, down to exactly zero
        result, error = self.apply(Credit(kind, -amount))
        assert error is None
        assert result.entry.amount_micros == -amount

    @rule(lease_id=st.sampled_from(LEASE_IDS), resources=st.sampled_from(RESOURCE_CHOICES),
          ttl_s=st.sampled_from((1, 30, 600, 3_600, 86_400)))
    def acquire(self, lease_id, resources, ttl_s):
        result, error = self.apply(AcquireLease(lease_id, resources, ttl_s))
        if error is not None:
            # the same id with other resources, or an id that ended within the hour (never reused)
            assert isinstance(error, LeaseConflict) or (
                isinstance(error, LeaseEnded) and lease_id in (self.org.ended_leases or {}))
            return
        if isinstance(result, LeaseDenied):
            assert result.decision.allowed is False
            assert lease_id not in (self.org.leases or {})
            return
        assert self.org.leases[lease_id].expires_at_us > self.now
        if result.created:
            # invariant 3: a new lease never takes the org past its cap (an existing one
            # answered again may be above a cap lowered since; lowering ends nothing)
            assert self.org.active_leases_at(self.now) <= self.org.max_concurrent
            assert self.org.leases[lease_id].expires_at_us == self.now + ttl_s * US_PER_S

    @precondition(lambda self: bool(self._active_lease_ids()))
    @rule(data=st.data())
    def acquire_same_lease_again(self, data):
        lease_id = data.draw(st.sampled_from(self._active_lease_ids()))
        self.apply(Advance())  # let time's own effects land first, so only the acquire is compared
        lease = self.org.leases[lease_id]
        resources = Resources(memory_mb=lease.memory_mb, cpu_count=lease.cpu_count,
                              disk_mb=lease.disk_mb, machine_type=lease.machine_type,
                              region=lease.region, quantity=lease.quantity)
        before = self.org.to_snapshot()

        result, error = self.apply(AcquireLease(lease_id, resources, lease.ttl_s))

        assert error is None
        assert result == LeaseGranted(lease, created=False)
        assert result.lease is self.org.leases[lease_id] is lease
        assert self.org.to_snapshot() == before

    @precondition(lambda self: bool(self._active_lease_ids()))
    @rule(data=st.data())
    def acquire_same_lease_with_other_resources(self, data):
        lease_id = data.draw(st.sampled_from(self._active_lease_ids()))
        self.apply(Advance())
        lease = self.org.leases[lease_id]
        others = [r for r in RESOURCE_CHOICES if not same_resources(lease, r)]
        resources = data.draw(st.sampled_from(others))
        before = self.org.to_snapshot()

        result, error = self.apply(AcquireLease(lease_id, resources, 600))

        assert result is None
        assert isinstance(error, LeaseConflict)
        assert self.org.to_snapshot() == before

    @rule(data=st.data())
    def renew(self, data):
        lease_id = data.draw(st.sampled_from(self._active_lease_ids() or LEASE_IDS))
        lease = (self.org.leases or {}).get(lease_id)
        expires_before = lease.expires_at_us if lease is not None else None
        result, error = self.apply(RenewLease(lease_id))
        if error is not None:
            assert isinstance(error, UnknownLease)
            assert lease_id not in (self.org.leases or {})
        else:
            assert result.lease.lease_id == lease_id
            assert self.org.leases[lease_id].expires_at_us == max(
                expires_before, self.now + lease.ttl_s * US_PER_S)

    @rule(lease_id=st.sampled_from(LEASE_IDS))
    def release(self, lease_id):
        was_active = lease_id in self._active_lease_ids()
        result, error = self.apply(ReleaseLease(lease_id))
        assert error is None
        assert result == Released(was_active)
        assert lease_id not in (self.org.leases or {})

    @rule(tier=st.sampled_from(("base", "pro", "custom")), custom_cap=st.integers(0, 6))
    def set_tier(self, tier, custom_cap):
        cap = custom_cap if tier == "custom" else CATALOG.tiers[tier]
        active_before = self.org.active_leases_at(self.now)
        self.apply(SetTier(tier, cap))
        assert self.org.max_concurrent == cap
        assert self.org.active_leases_at(self.now) == active_before  # a lower cap ends nothing

    @rule(max_disk_mb=st.sampled_from((None, 1_000, 20_480, 40_000)),
          a100_east=st.sampled_from((None, -1, 0, 1, 2, 4)))
    def set_limits(self, max_disk_mb, a100_east):
        if a100_east is None:
            quotas = None  # leave the quotas as they are
        elif a100_east < 0:
            quotas = {}  # clear them
        else:
            quotas = {"us-east": {"a100": a100_east}}
        self.apply(SetLimits(max_disk_mb, quotas))

    @rule(plan_id=st.sampled_from(PLAN_IDS))
    def set_plan(self, plan_id):
        self.apply(SetPlan(plan_id, 1))
        assert self.org.plan.id == plan_id

    @rule(action=st.sampled_from(("halt", "resume", "resume")))
    def admin(self, action):
        if action == "halt":
            self.apply(Halt())
            assert self.org.halted == "admin"
            return
        self.apply(Resume())
        if self.org.halted is not None:
            # only a prepaid org with nothing to spend stays halted, for balance
            assert self.org.halted == "balance"
            assert self.org.prepaid
            assert self.org.balance_micros + self.org.quota_remaining_at(self.now) <= 0

    @rule(seconds=st.one_of(st.sampled_from((1, 59, 3_600, 86_400, 3 * 86_400, 8 * 86_400)),
                            st.integers(1, 40 * 86_400)),
          apply_advance=st.booleans())
    def time_passes(self, seconds, apply_advance):
        self.now += seconds * US_PER_S
        if apply_advance:
            self.apply(Advance())
            assert all(l.expires_at_us > self.now for l in (self.org.leases or {}).values())
            assert all(g.expires_at_us is None or g.expires_at_us > self.now
                       for g in self.org.grants or ())

    @rule(data=st.data())
    def the_published_view_decides_as_the_org_would(self, data):
        """The gate view a shard would publish now, sent over the wire, decides at any instant
        before it expires exactly what the org itself decides then: for every action and
        resource shape (the equivalence GateClient and the ingress rely on)."""
        view_now, until = self.org.view_as_of(self.now)
        record = ViewRecord(ORG_ID, 0, 1, 1, until, view_now)
        view = RECORD_DECODER.decode(RECORD_ENCODER.encode(record)).view
        assert view == record.view
        last = (until - 1 if until is not None else self.now + 400 * 86_400 * US_PER_S) - self.now
        assert last >= 0
        at = self.now + data.draw(st.one_of(st.just(0), st.just(last), st.integers(0, last)), label="offset_us")
        # The truth at that instant: the org with time applied up to it, as the scheduler's
        # sweep would commit it (not the view's own reading of time).
        swept = copy.deepcopy(self.org)
        execute(swept, Advance(), CATALOG, at, Effects())
        for action in ACTIONS:
            for resources in RESOURCE_CHOICES + (Resources(),):
                truth = decide(action, resources, swept.view_as_of(at)[0])
                assert decide(action, resources, view) == truth, (action, resources, at - self.now)
                assert self.org.gate(action, resources, at) == truth, (action, resources)

    @rule(enabled=st.booleans(), threshold=st.sampled_from((0, 1_000_000, 4_000_000, 50_000_000)),
          amount=st.sampled_from((500_000, 10_000_000)), per_day=st.integers(1, 3),
          cooldown_s=st.sampled_from((0, 60, 3_600)), card=st.booleans())
    def configure_auto_recharge(self, enabled, threshold, amount, per_day, cooldown_s, card):
        self.apply(SetPaymentMethod(card))
        self.apply(SetAutoRecharge(enabled, threshold, amount, per_day, cooldown_s))

    @precondition(lambda self: self.org.pending_charge() is not None)
    @rule(succeeded=st.booleans(), twice=st.booleans())
    def settle_the_charge(self, succeeded, twice):
        charge = self.org.pending_charge()
        balance = self.org.balance_micros
        settle = SettleRecharge.of_payment(charge.charge_id, succeeded, charge.amount_micros, f"pi_{charge.charge_id}",
                                           "card_declined")
        self.apply(settle)
        assert self.org.pending_charge() is None or self.org.pending_charge().charge_id != charge.charge_id
        if succeeded:
            assert self.org.balance_micros >= balance + charge.amount_micros - 1  # credited (debt first)
        else:
            assert self.org.recharge.paused == "payment_failed"
            if twice:  # a repeated failure report changes nothing
                before = self.org.to_snapshot()
                self.apply(settle)
                assert self.org.to_snapshot() == before

    @rule(paid=st.booleans(), back_s=st.integers(0, 20 * 86_400))
    def invoice_news(self, paid, back_s):
        """Invoice events, possibly about the past (delivered late)."""
        at = self.now - back_s * US_PER_S
        if paid:
            was_past_due = self.org.dunning is not None
            self.apply(InvoicePaid(at))
            if was_past_due and self.org.dunning is None:
                assert not self.org.suspended and self.org.past_due_since_us is None
        else:
            self.apply(InvoiceFailed(at, 3 * 86_400, 7 * 86_400, 14 * 86_400, "free", 1))

    @rule(back_s=st.integers(-86_400, 86_400))
    def subscription_period(self, back_s):
        self.apply(ResetPeriod(self.now - back_s * US_PER_S))

    # ----- invariants -----------------------------------------------------------------

    @invariant()
    def dunning_steps_follow_the_clock(self):
        dunning = self.org.dunning
        if dunning is None:
            assert not self.org.suspended
            return
        elapsed = self.applied_us - dunning.since_us
        limits = (dunning.suspend_after_s, dunning.degrade_after_s, dunning.downgrade_after_s)
        assert dunning.step == sum(1 for s in limits if elapsed >= s * US_PER_S)
        assert self.org.suspended == (dunning.step >= 1 and not self.org.paid_invoice)

    @invariant()
    def balance_is_the_sum_of_every_ledger_entry(self):
        assert self.org.balance_micros == self.ledger_total_micros

    @invariant()
    def debt_is_never_negative_nor_held_beside_live_grants(self):
        assert self.org.debt_micros >= 0
        if self.org.grants:
            assert self.org.debt_micros == 0
            assert all(g.remaining_micros > 0 for g in self.org.grants)

    @invariant()
    def prepaid_org_with_nothing_to_spend_is_halted(self):
        org = self.org
        if org.prepaid and org.balance_micros + org.quota_remaining_at(self.applied_us) <= 0:
            assert org.halted is not None

    @invariant()
    def postpaid_org_is_never_halted_for_balance(self):
        if not self.org.prepaid:
            assert self.org.halted != "balance"

    @invariant()
    def remainder_is_less_than_one_micro(self):
        assert 0 <= self.org.remainder_scaled < SCALED_PER_MICRO

    @invariant()
    def quota_used_is_part_of_period_usage(self):
        assert 0 <= self.org.quota_used_micros <= self.org.period_usage_micros

    def teardown(self):
        if not hasattr(self, "org"):
            return
        final = self.org.to_snapshot()
        assert snapshot_through_msgpack(self.org).to_snapshot() == final

        items = JOURNAL_DECODER.decode(JOURNAL_ENCODER.encode(self.journal))
        assert len(items) == len(self.journal)
        fresh = new_org(*self.creation, Effects())
        for item in items:  # a journal row is one commit's commands; apply() ran one a commit
            replay(fresh, [item], CATALOG)
        assert fresh.to_snapshot() == final
        assert fresh.state(self.now) == self.org.state(self.now)


OrgLedgerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None)
TestOrgLedger = OrgLedgerMachine.TestCase


# ----- additivity -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(plan_id=st.sampled_from(PLAN_IDS), prepaid=st.booleans(),
       signup_micros=st.sampled_from((0, 1_000, 5_000_000)),
       memory_mb=st.integers(0, 65_536), cpu_count=st.integers(0, 64),
       disk_mb=st.integers(0, 100_000), total_ms=st.integers(0, 48 * 3_600_000),
       cut_fractions=st.lists(st.floats(0, 1), max_size=12),
       prior_memory_mb_ms=st.integers(0, 10**9))
def test_usage_split_into_any_parts_costs_exactly_what_the_whole_costs(
        plan_id, prepaid, signup_micros, memory_mb, cpu_count, disk_mb, total_ms,
        cut_fractions, prior_memory_mb_ms):
    cuts = sorted(int(total_ms * f) for f in cut_fractions)
    bounds = [0, *cuts, total_ms]
    parts_ms = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sum(parts_ms) == total_ms

    def usage(duration_ms: int) -> LeaseUsage:
        return LeaseUsage("ls_1", memory_mb_ms=memory_mb * duration_ms,
                          cpu_ms=cpu_count * duration_ms, disk_mb_ms=disk_mb * duration_ms,
                          ticks=1)

    whole = new_org(plan_id, prepaid, signup_micros, "base", T0, Effects())
    split = new_org(plan_id, prepaid, signup_micros, "base", T0, Effects())
    prior = ApplyUsage([LeaseUsage("ls_0", memory_mb_ms=prior_memory_mb_ms)])  # any carry to start
    execute(whole, prior, CATALOG, T0, Effects())
    execute(split, prior, CATALOG, T0, Effects())
    start_remainder = whole.remainder_scaled
    start_balance = whole.balance_micros
    start_quota_used = whole.quota_used_micros

    whole_fx = Effects()
    debited_whole = execute(whole, ApplyUsage([usage(total_ms)]), CATALOG, T0 + 1, whole_fx).micros
    debited_split = sum(
        execute(split, ApplyUsage([usage(part)]), CATALOG, T0 + 1 + i, Effects()).micros
        for i, part in enumerate(parts_ms))

    expected_micros, expected_remainder = divmod(
        start_remainder + cost_scaled(whole.plan, usage(total_ms)), SCALED_PER_MICRO)
    assert debited_whole == expected_micros
    assert debited_split == expected_micros
    assert whole.remainder_scaled == split.remainder_scaled == expected_remainder
    assert whole.balance_micros == split.balance_micros
    assert whole.quota_used_micros == split.quota_used_micros
    # what the quota did not cover came out of the balance, or (postpaid, past its credit) was
    # invoiced, to the micro
    from_quota = whole.quota_used_micros - start_quota_used
    invoiced = sum(entry.invoiced_micros for _, entry in whole_fx.ledger)
    assert start_balance - whole.balance_micros == expected_micros - from_quota - invoiced


# ----- idempotency of leases ------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(first=st.sampled_from(RESOURCE_CHOICES[:5]), second=st.sampled_from(RESOURCE_CHOICES),
       ttl_s=st.integers(1, 86_400), later_s=st.integers(0, 86_399))
def test_same_lease_id_returns_the_first_lease_or_conflicts_and_changes_nothing(
        first, second, ttl_s, later_s):
    org = new_org("payg", True, 5_000_000, "pro", T0, Effects())
    first_result = execute(org, AcquireLease("ls_1", first, ttl_s), CATALOG, T0, Effects())
    assert first_result.created is True
    first_lease = msgspec.structs.replace(first_result.lease)  # the live lease, as it was
    at = T0 + min(later_s, ttl_s - 1) * US_PER_S  # still within the lease's life
    execute(org, Advance(), CATALOG, at, Effects())
    before = org.to_snapshot()
    fx = Effects()

    if second == first:
        again = execute(org, AcquireLease("ls_1", second, ttl_s), CATALOG, at, fx)
        assert again == LeaseGranted(first_lease, created=False)
    else:
        try:
            execute(org, AcquireLease("ls_1", second, ttl_s), CATALOG, at, fx)
        except LeaseConflict:
            pass
        else:
            raise AssertionError("a different lease under the same lease_id was accepted")

    assert org.to_snapshot() == before
    assert (fx.ledger, fx.events) == ([], [])
