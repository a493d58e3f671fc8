"""OrgBillingActor: the functional core of one organization's billing.

A plain object. Every method takes the current time as an argument and returns a decision;
mutations also append the ledger entries and events they produce to an Effects collector.
No I/O, no Ray, no clock reads, no HTTP: replaying the same commands with the same times
gives the same state, which is how a shard rebuilds an org from its snapshot and journal.

One state class, its behaviour split by concern:
  money.py     grants, burn order, credit, debit, spending usage, halts
  leases.py    concurrency leases and the limits they are held to
  periods.py   quota periods, expiry, the dunning clock
  recharge.py  auto-recharge
  refunds.py   refunds of Stripe payments, tied to what each payment bought
  gate.py      the pure gate decision, over the few facts of a GateView
This module holds the state itself: creation, reads, invariants and the snapshot round trip.
"""

from __future__ import annotations

import copy
import sys

import msgspec

from actors.effects import Effects, Event
from actors.enforcement import SHADOW_FOREVER_US, Enforcement
from metergate_client.decision import ACTIONS, Decision, GateView, HaltCause, Reason, Resources, decide
from actors.leases import MAX_LEASES_PER_ORG, MAX_TTL_S, Lease, Leases
from actors.metering import SCALED_PER_MICRO
from actors.money import (CREDIT_KINDS, DEBIT_KINDS, MAX_AMOUNT_MICROS, MAX_GRANTS_PER_ORG, PAID_KINDS,
                          PROMOTIONAL_KINDS, PURCHASED_KINDS, Grant, LedgerEntry, Money, burn_order)
from actors.periods import ClosedPeriod, Dunning, DunningStep, Periods, SavedDunning
from actors.recharge import MICROS_PER_CENT, AutoRecharge, ChargeRequest, Recharge
from actors.refunds import DisputeRecord, RefundRecord, Refunds
from actors.runway import DEFAULT_RUNWAY_ALERT_S, Runway
from actors.subscriptions import SubscriptionRecord, Subscriptions
from actors.refusals import BillingError, LeaseConflict, LeaseEnded, Refusal, UnknownLease
from config.catalog import Catalog, CatalogError, Plan, plan_for_period

# Names the rest of the code base imports from here, wherever their concern keeps them.
__all__ = [
    "ACTIONS", "CREDIT_KINDS", "DEBIT_KINDS", "MAX_AMOUNT_MICROS", "MAX_GRANTS_PER_ORG",
    "MAX_LEASES_PER_ORG", "MAX_TTL_S", "MICROS_PER_CENT", "PAID_KINDS", "PROMOTIONAL_KINDS",
    "PURCHASED_KINDS", "AutoRecharge", "BillingError", "ChargeRequest", "ClosedPeriod", "Decision",
    "Dunning", "DunningStep", "Effects", "Event", "GateView", "Grant", "HaltCause", "Lease",
    "LeaseConflict", "LeaseEnded", "LedgerEntry", "OrgBillingActor", "OrgSnapshot", "OrgState", "PlanTerms",
    "Reason", "Refusal", "Resources", "SNAPSHOT_VERSION", "UnknownLease",
]

SNAPSHOT_VERSION = 2  # the format OrgSnapshot is written in; actors/formats.py reads every older one


class PlanTerms(msgspec.Struct, array_like=True):
    """A plan version's terms as the org last ran on it, saved with the org: the catalog's own
    version is used whenever the catalog has it (versions are immutable), these only when an
    operator removed the version from the catalog, so that its orgs still load, on the terms
    they had (never repriced by a removal). A field added to `Plan` is appended here, with a
    default."""

    id: str
    version: int
    effective_from_us: int
    effective_until_us: int | None
    period: str
    included_micros: int
    overage: bool
    memory_nanos_per_gib_s: int
    cpu_nanos_per_vcpu_s: int
    disk_nanos_per_gib_s: int
    unit_nanos: dict[str, int] | None = None

    @classmethod
    def of(cls, plan: Plan) -> "PlanTerms":
        return cls(**{name: getattr(plan, name) for name in cls.__struct_fields__})

    def plan(self) -> Plan:
        return Plan(**{name: getattr(self, name) for name in self.__struct_fields__ if name != "unit_nanos"},
                    unit_nanos=dict(self.unit_nanos or {}))


class OrgSnapshot(msgspec.Struct, array_like=True, tag=SNAPSHOT_VERSION):
    """The persisted form of an org (format 2: `[2, org_id, ...]`, see actors/formats.py); its
    plans are stored by id and version, with their terms in `plans`.

    `halted` and `dunning.step` are enums stored by value, as the plain strings and ints of
    the snapshots written before they were enums: those decode unchanged.
    """

    org_id: str
    email: str
    prepaid: bool
    plan_id: str
    plan_version: int
    tier: str
    max_concurrent: int
    max_disk_mb: int
    machine_quotas: dict[str, dict[str, int]] | None
    grants: list[Grant] | None
    debt_micros: int
    remainder_scaled: int
    period_key: str
    period_start_us: int
    period_end_us: int
    period_usage_micros: int
    quota_used_micros: int
    thresholds_fired: int
    halted: HaltCause | None
    suspended: bool
    past_due_since_us: int | None
    leases: list[Lease] | None
    has_payment_method: bool
    created_us: int
    grant_seq: int
    tier_as_of_us: int = 0  # added after v1 snapshots: they decode with 0
    recharge: AutoRecharge | None = None  # added later too
    dunning: SavedDunning | None = None
    paid_invoice: bool = False
    invoice_as_of_us: int = 0
    period_anchor_us: int = 0
    paid_credit: bool = False
    period_cycle_start_us: int = 0  # the subscription's cycle (billing-rules 5.2); 0: the calendar
    period_cycle_us: int = -1  # -1: written before the cycle was kept (from_snapshot derives it)
    refunds: list[RefundRecord] | None = None
    ended_leases: dict[str, int] | None = None  # lease id → when it ended, oldest first
    low_balance_micros: int = 0  # the balance.threshold_crossed alert; 0: off
    low_balance_armed: bool = True
    disputes: list[DisputeRecord] | None = None
    subscriptions: list[SubscriptionRecord] | None = None
    settled_invoices: list[str] | None = None
    lapsed: dict[str, int] | None = None
    plans: list[PlanTerms] | None = None  # the terms of every plan named above (format 2 on)
    runway_alert_s: int = DEFAULT_RUNWAY_ALERT_S  # the balance.runway_low alert (billing-rules 2.10); 0: off
    runway_armed: bool = True
    imported_ids: list[str] | None = None  # the source ids of the amounts imported (billing-rules 2.11)
    paid_credits: dict[str, list[int]] | None = None  # payment id -> [its credit, what was paid] (3.0)
    shadow_until_us: int | None = None  # billed in shadow until then (billing-rules 2.12); None: enforced
    cutover_told: bool = False  # the compute plane was told of the halt or suspension at the cutover (2.12)


# Snapshot fields that are copied as they are; the plans and the lists of records need converting.
_SNAPSHOT_COPIED_FIELDS = ("plan_id", "plan_version", "grants", "leases", "refunds", "ended_leases", "disputes",
                           "subscriptions", "settled_invoices", "lapsed", "dunning", "plans", "imported_ids",
                           "paid_credits")
_SNAPSHOT_PLAIN_FIELDS = tuple(
    name for name in OrgSnapshot.__struct_fields__ if name not in _SNAPSHOT_COPIED_FIELDS)


class OrgState(msgspec.Struct, frozen=True):
    """An org as of one instant, for reads (GET /v1/orgs/{id}, the billing page).

    Copies, never the live grants and leases: it outlives the moment it was read at. The
    edge decides how it looks (serve_app/views.py).
    """

    org_id: str
    email: str
    prepaid: bool
    balance_micros: int
    debt_micros: int
    grants: list[Grant]  # in the order they will be spent
    period_key: str
    period_usage_micros: int
    quota_micros: int
    quota_used_micros: int
    period_end_us: int
    halted: HaltCause | None
    suspended: bool
    degraded: bool
    past_due_since_us: int | None
    leases: list[Lease]  # the active ones
    max_concurrent: int
    tier: str
    plan_id: str
    plan_version: int
    max_disk_mb: int
    machine_quotas: dict[str, dict[str, int]]
    recharge: AutoRecharge | None
    has_payment_method: bool
    created_us: int
    low_balance_micros: int
    burn_micros_per_hour: int = 0  # the live leases' burn (billing-rules 2.10)
    runway_s: int | None = None  # None: postpaid, or nothing burns
    runway_alert_s: int = 0
    as_of_us: int = 0  # the instant it was read at
    enforcement: str = "enforce"  # or "shadow" (billing-rules 2.12)
    cutover_us: int | None = None  # when shadow ends (or ended), if a cutover is set


class OrgBillingActor(Money, Leases, Periods, Recharge, Refunds, Subscriptions, Runway, Enforcement):
    __slots__ = (
        "org_id", "email", "prepaid", "plan", "tier", "max_concurrent", "max_disk_mb",
        "machine_quotas", "grants", "debt_micros", "remainder_scaled", "period_key",
        "period_start_us", "period_end_us", "period_usage_micros", "quota_used_micros",
        "thresholds_fired", "halted", "suspended", "past_due_since_us", "leases",
        "has_payment_method", "created_us", "grant_seq", "tier_as_of_us", "recharge",
        "dunning", "paid_invoice", "invoice_as_of_us", "period_anchor_us", "paid_credit",
        "period_cycle_start_us", "period_cycle_us", "refunds", "ended_leases", "low_balance_micros",
        "low_balance_armed", "disputes", "subscriptions", "settled_invoices", "lapsed", "runway_alert_s",
        "runway_armed", "imported_ids", "paid_credits", "shadow_until_us", "cutover_told",
    )

    def __init__(self, org_id: str, email: str, prepaid: bool, plan: Plan, tier: str,
                 max_concurrent: int, max_disk_mb: int, now_us: int) -> None:
        self.org_id = sys.intern(org_id)
        self.email = email
        self.prepaid = prepaid
        self.plan = plan
        self.tier = sys.intern(tier)
        self.max_concurrent = max_concurrent
        self.max_disk_mb = max_disk_mb
        self.machine_quotas: dict[str, dict[str, int]] | None = None
        self.grants: list[Grant] | None = None
        self.debt_micros = 0
        self.remainder_scaled = 0
        self.period_key, self.period_start_us, self.period_end_us = "", 0, 0
        self.period_usage_micros = 0
        self.quota_used_micros = 0
        self.thresholds_fired = 0
        self.halted: HaltCause | None = None
        self.suspended = False
        self.past_due_since_us: int | None = None
        self.leases: dict[str, Lease] | None = None
        self.has_payment_method = False
        self.tier_as_of_us = 0
        self.recharge: AutoRecharge | None = None
        self.dunning: Dunning | None = None
        self.paid_invoice = False
        self.invoice_as_of_us = 0
        self.period_anchor_us = 0
        self.paid_credit = False  # ever credited with money paid (top-up, auto-recharge)
        self.period_cycle_start_us, self.period_cycle_us = 0, 0
        self.refunds: list[RefundRecord] | None = None
        self.ended_leases: dict[str, int] | None = None
        self.low_balance_micros, self.low_balance_armed = 0, True
        self.runway_alert_s, self.runway_armed = 0, True
        self.disputes: list[DisputeRecord] | None = None
        self.subscriptions: list[SubscriptionRecord] | None = None
        self.settled_invoices: list[str] | None = None  # the latest invoices settled, oldest first
        self.lapsed: dict[str, int] | None = None  # payment id -> what of its credit expired unused
        self.imported_ids: list[str] | None = None  # source ids of imported amounts, never forgotten (2.11)
        self.paid_credits: dict[str, list[int]] | None = None  # payment id -> [credit, paid], latest 1,000 (3.0)
        self.shadow_until_us: int | None = None  # in shadow before then (billing-rules 2.12)
        self.cutover_told = False
        self.created_us = now_us
        self.grant_seq = 0
        self._start_period(now_us, None)

    @classmethod
    def create(cls, org_id: str, email: str, prepaid: bool, plan: Plan, tier: str,
               max_concurrent: int, max_disk_mb: int, signup_grant_micros: int,
               now_us: int, fx: Effects, low_balance_micros: int = 0,
               runway_alert_s: int = 0, shadow: bool = False) -> "OrgBillingActor":
        org = cls(org_id, email, prepaid, plan, tier, max_concurrent, max_disk_mb, now_us)
        org.low_balance_micros, org.runway_alert_s = low_balance_micros, runway_alert_s
        org.shadow_until_us = SHADOW_FOREVER_US if shadow else None
        if signup_grant_micros > 0:
            org.credit("signup_grant", signup_grant_micros, None, None, now_us, fx)
        elif prepaid:
            org._halt_if_out_of_money(now_us, fx)
        org.check_alerts(now_us, fx)
        return org

    # ----- reads ------------------------------------------------------------------------

    def gate_view(self, now_us: int) -> GateView:
        return self.view_as_of(now_us)[0]

    def view_as_of(self, now_us: int) -> tuple[GateView, int | None]:
        """The gate view as of now_us, and until when it holds by time alone (None: until the
        org changes). "As of now": what time alone changed since the last command (a period
        end, a grant expiry, a dunning step) counts, exactly as the scheduler's sweep would
        commit it, so that a deadline denies at once, sweep or no sweep."""
        org = self._advanced_copy(now_us) if self._structure_due(now_us) else self
        view = org._gate_view(now_us)
        return view, org._view_until(now_us)

    def _structure_due(self, now_us: int) -> bool:
        """Has time changed more than the `*_at` readers count (a period end, an expired grant
        that may halt, a dunning step)? Lease expiry they count exactly."""
        if now_us >= self.period_end_us:
            return True
        dunning = self.dunning
        if dunning is not None and dunning.step < DunningStep.DOWNGRADED and self._dunning_due_us() <= now_us:
            return True
        return any(g.expires_at_us is not None and g.expires_at_us <= now_us for g in self.grants or ())

    def _advanced_copy(self, now_us: int) -> "OrgBillingActor":
        """A copy of this org with time applied up to now_us (its effects thrown away)."""
        # Plans are shared, never copied: a plan's successor versions are found by identity.
        plans = [self.plan] + ([self.dunning.free_plan, self.dunning.prior_plan] if self.dunning else [])
        org = copy.deepcopy(self, {id(plan): plan for plan in plans})
        org.advance(now_us, Effects())
        return org

    def _gate_view(self, now_us: int) -> GateView:
        return GateView(
            balance_micros=self.balance_at(now_us), quota_remaining_micros=self.quota_remaining_at(now_us),
            included_micros=self.plan.included_micros, active_leases=self.active_leases_at(now_us),
            max_concurrent=self.max_concurrent, max_disk_mb=self.max_disk_mb, halted=self.halted,
            suspended=self.suspended, degraded=self.degraded,
            overdraws=not self.prepaid and self.plan.overage,
            needs_card=not self.has_payment_method and not self.paid_credit,
            machine_quotas=self.machine_quotas,
            machine_in_use=self.machines_in_use_at(now_us) if self.machine_quotas else None,
            shadow=self.in_shadow(now_us))

    def in_shadow(self, now_us: int) -> bool:
        """Billed beside another biller at now_us (billing-rules 2.12): allowed whatever the
        gate would say, no charge asked, its halts and suspensions not sent as such."""
        return self.shadow_until_us is not None and now_us < self.shadow_until_us

    def _view_until(self, now_us: int) -> int | None:
        """The first instant after now_us at which time alone may change the view (of an org
        with nothing due): a grant or lease expiry, the next dunning step, or the period end
        when the new period changes the view (quota was used, or the plan moves to a
        new version). A period end that changes nothing expires nothing, so
        calendar periods do not expire every org's view at the same instant."""
        times = [g.expires_at_us for g in self.grants or () if g.expires_at_us is not None]
        times += [lease.expires_at_us for lease in (self.leases or {}).values()]
        dunning = self.dunning
        if dunning is not None and dunning.step < DunningStep.DOWNGRADED:
            times.append(self._dunning_due_us())
        if self._period_end_changes_view():
            times.append(self.period_end_us)
        if self.shadow_until_us is not None and self.shadow_until_us < SHADOW_FOREVER_US:
            times.append(self.shadow_until_us)  # a cutover (billing-rules 2.12)
        later = [t for t in times if t > now_us]
        return min(later) if later else None

    def _period_end_changes_view(self) -> bool:
        # (A balance halt holds only while the quota is used up, or the plan has none.) A plan
        # with an end gives way to a new version at some period's start: each end counts then.
        return self.quota_used_micros > 0 or self.plan.effective_until_us is not None

    def gate(self, action: str, resources: Resources, now_us: int) -> Decision:
        """Read-only: may this org do `action` with `resources` now?"""
        return decide(action, resources, self.gate_view(now_us))

    def state(self, now_us: int) -> OrgState:
        """Read-only: the org as of now_us (what time alone changed is counted, not applied)."""
        ended = now_us >= self.period_end_us
        return OrgState(
            org_id=self.org_id, email=self.email, prepaid=self.prepaid,
            balance_micros=self.balance_at(now_us), debt_micros=self.debt_micros,
            grants=[msgspec.structs.replace(g) for g in sorted(self.grants or (), key=burn_order)],
            period_key=self.period_key, period_usage_micros=0 if ended else self.period_usage_micros,
            quota_micros=self.plan.included_micros, quota_used_micros=0 if ended else self.quota_used_micros,
            period_end_us=self.period_end_us, halted=self.halted, suspended=self.suspended,
            degraded=self.degraded, past_due_since_us=self.past_due_since_us,
            leases=[msgspec.structs.replace(l) for l in (self.leases or {}).values() if l.expires_at_us > now_us],
            max_concurrent=self.max_concurrent, tier=self.tier, plan_id=self.plan.id,
            plan_version=self.plan.version, max_disk_mb=self.max_disk_mb,
            machine_quotas={region: dict(caps) for region, caps in (self.machine_quotas or {}).items()},
            recharge=msgspec.structs.replace(self.recharge) if self.recharge is not None else None,
            has_payment_method=self.has_payment_method, created_us=self.created_us,
            low_balance_micros=self.low_balance_micros, burn_micros_per_hour=self.burn_at(now_us),
            runway_s=self.runway_at(now_us), runway_alert_s=self.runway_alert_s, as_of_us=now_us,
            enforcement=self.enforcement(now_us),
            cutover_us=self.shadow_until_us if self.shadow_until_us != SHADOW_FOREVER_US else None)

    # ----- persistence ------------------------------------------------------------------

    def check_invariants(self) -> None:
        assert self.debt_micros >= 0, self.debt_micros
        assert 0 <= self.remainder_scaled < SCALED_PER_MICRO, self.remainder_scaled
        for grant in self.grants or ():
            assert grant.remaining_micros > 0, grant
        assert 0 <= self.quota_used_micros <= self.period_usage_micros
        assert len(self.leases or ()) <= MAX_LEASES_PER_ORG
        assert not (self.grants and self.debt_micros), "debt while credit remains"
        assert self.halted is None or isinstance(self.halted, HaltCause), self.halted
        assert self.dunning is None or isinstance(self.dunning.step, DunningStep), self.dunning

    def to_snapshot(self) -> OrgSnapshot:
        self.check_invariants()
        dunning = self.dunning
        named = [self.plan] + ([dunning.free_plan, dunning.prior_plan] if dunning is not None else [])
        plans = {(plan.id, plan.version): plan for plan in named if plan is not None}
        return OrgSnapshot(
            plan_id=self.plan.id, plan_version=self.plan.version,
            dunning=dunning.saved() if dunning is not None else None,
            plans=[PlanTerms.of(plan) for plan in plans.values()],
            grants=[msgspec.structs.replace(g) for g in self.grants] if self.grants else None,
            leases=[msgspec.structs.replace(l) for l in self.leases.values()] if self.leases else None,
            refunds=[msgspec.structs.replace(r) for r in self.refunds] if self.refunds else None,
            ended_leases=dict(self.ended_leases) if self.ended_leases else None,
            disputes=[msgspec.structs.replace(d) for d in self.disputes] if self.disputes else None,
            subscriptions=[msgspec.structs.replace(r) for r in self.subscriptions] if self.subscriptions else None,
            settled_invoices=list(self.settled_invoices) if self.settled_invoices else None,
            lapsed=dict(self.lapsed) if self.lapsed else None,
            imported_ids=list(self.imported_ids) if self.imported_ids else None,
            paid_credits={k: list(v) for k, v in self.paid_credits.items()} if self.paid_credits else None,
            **{name: getattr(self, name) for name in _SNAPSHOT_PLAIN_FIELDS})

    @classmethod
    def from_snapshot(cls, snap: OrgSnapshot, catalog: Catalog) -> "OrgBillingActor":
        """The org a snapshot holds, its plans resolved in `catalog` (a stored plan is its id and
        version; the catalog's own version knows what follows it). A version the catalog no
        longer has runs on the terms saved with it, and stays on them (nothing follows it)
        until a plan is set; CatalogError if there are none (a format 1 snapshot kept none)."""
        org = cls.__new__(cls)
        for name in _SNAPSHOT_PLAIN_FIELDS:
            setattr(org, name, getattr(snap, name))
        saved = {(terms.id, terms.version): terms for terms in snap.plans or ()}

        def plan_of(plan_id: str, version: int) -> Plan:
            plan = catalog.plans.get((plan_id, version))
            if plan is not None:
                return plan
            terms = saved.get((plan_id, version))
            if terms is None:
                raise CatalogError(f"plan {plan_id!r} version {version} is not in the catalog, and the "
                                   "snapshot keeps no terms of it: put the version back in the catalog")
            return terms.plan()

        org.plan = plan_of(snap.plan_id, snap.plan_version)
        org.dunning = snap.dunning.live(plan_of) if snap.dunning is not None else None
        if snap.period_cycle_us < 0:
            # Written before the cycle was kept: an org with an anchor then took the running
            # period's length from the anchor on as the cycle of the next periods.
            start = max(snap.period_start_us, snap.period_anchor_us)
            org.period_cycle_start_us, org.period_cycle_us = 0, 0
            if snap.period_anchor_us and snap.period_end_us > start:
                org.period_cycle_start_us, org.period_cycle_us = start, snap.period_end_us - start
        org.grants = snap.grants
        org.leases = {l.lease_id: l for l in snap.leases} if snap.leases else None
        org.refunds = snap.refunds
        org.ended_leases = snap.ended_leases
        org.disputes, org.subscriptions, org.settled_invoices = snap.disputes, snap.subscriptions, snap.settled_invoices
        org.lapsed = snap.lapsed
        org.imported_ids = snap.imported_ids
        org.paid_credits = snap.paid_credits
        # Shared strings: thousands of orgs hold the same period key and tier.
        org.org_id, org.tier, org.period_key = (sys.intern(snap.org_id), sys.intern(snap.tier),
                                                sys.intern(snap.period_key))
        org.check_invariants()
        return org


# Every piece of org state is in the snapshot, or recovery would silently forget it.
assert set(_SNAPSHOT_PLAIN_FIELDS) | (set(_SNAPSHOT_COPIED_FIELDS) - {"plan_id", "plan_version", "plans"}) | {
    "plan"} == set(OrgBillingActor.__slots__)
# The concerns add behaviour, never state of their own that the snapshot would miss.
assert all(base.__slots__ == () for base in OrgBillingActor.__mro__[1:-1]), OrgBillingActor.__mro__
