"""OrgBillingActor: the functional core of one organization's billing.

A plain object. Every method takes the current time as an argument and returns a decision;
mutations also append the ledger entries and events they produce to an Effects collector.
No I/O, no Ray, no clock reads: replaying the same commands with the same times gives the
same state, which is how a shard rebuilds an org from its snapshot and journal.

Money is integer micro-USD. The balance is the sum of the live grants minus the debt; the
period quota is spent before any grant and is not money in the ledger.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import msgspec

from actors.metering import SCALED_PER_MICRO, LeaseUsage, cost_scaled, split_micros
from actors.timeutil import US_PER_S, period_bounds, us_to_rfc3339
from config.catalog import Plan, plan_for_period

# Limits on everything held per org, so a runaway caller fails fast instead of growing a shard.
MAX_LEASES_PER_ORG = 10_000
MAX_GRANTS_PER_ORG = 1_000
MAX_AMOUNT_MICROS = 10**12  # 1,000,000 USD in one ledger operation
MAX_TTL_S = 86_400
MICROS_PER_CENT = 10_000  # card charges are whole cents
MAX_CHARGE_MICROS = 10**10  # one auto-recharge charge: at most 10,000 USD (Stripe's cap is 999,999.99)
US_PER_DAY = 86_400 * US_PER_S

PROMOTIONAL_KINDS = frozenset({"signup_grant", "grant"})
PURCHASED_KINDS = frozenset({"topup", "auto_recharge", "adjustment"})
PAID_KINDS = frozenset({"topup", "auto_recharge"})
CREDIT_KINDS = PROMOTIONAL_KINDS | PURCHASED_KINDS
DEBIT_KINDS = frozenset({"refund", "adjustment"})
ACTIONS = ("create", "wake", "ingest", "purchase")
THRESHOLD_PERCENTS = (80, 100)

STATUS_BY_REASON = {
    "ok": 200,
    "insufficient_balance": 402,
    "halted": 402,
    "suspended": 402,
    "quota_exceeded": 402,
    "no_payment_method": 402,
    "degraded": 402,
    "concurrency_limit": 429,
    "resource_limit": 403,
}


class BillingError(Exception):
    """A command the org cannot apply; `code` is the API error code."""

    code = "invalid_command"
    status = 400


class UnknownLease(BillingError):
    code = "unknown_lease"
    status = 404


class LeaseConflict(BillingError):
    code = "idempotency_conflict"
    status = 409


class Grant(msgspec.Struct, array_like=True):
    grant_id: str
    kind: str
    remaining_micros: int
    expires_at_us: int | None = None


class Lease(msgspec.Struct, array_like=True):
    lease_id: str
    expires_at_us: int
    ttl_s: int
    quantity: int
    region: str | None
    machine_type: str | None
    memory_mb: int
    cpu_count: int
    disk_mb: int


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_mb: int = 0
    cpu_count: int = 0
    disk_mb: int = 0
    machine_type: str | None = None
    region: str | None = None
    quantity: int = 1


class Decision(msgspec.Struct, omit_defaults=True):
    allowed: bool
    reason: str
    status: int
    balance_micros: int
    active_leases: int
    max_concurrent: int
    limit: int | None = None
    requested: int | None = None
    in_use: int | None = None
    resource: str | None = None


class LedgerEntry(msgspec.Struct, omit_defaults=True):
    kind: str
    amount_micros: int
    at_us: int
    grant_id: str | None = None
    expires_at_us: int | None = None
    note: str | None = None


class Event(msgspec.Struct):
    type: str
    org_id: str
    at_us: int
    data: dict


class ChargeRequest(msgspec.Struct, frozen=True):
    """An auto-recharge charge the org asked for; the shard makes it after the commit."""

    org_id: str
    charge_id: str
    amount_micros: int
    idempotency_key: str
    requested_us: int = 0


class Effects:
    """What a batch of commands produced, for the shard to write in its commit."""

    __slots__ = ("ledger", "events", "charges", "periods")

    def __init__(self) -> None:
        self.ledger: list[tuple[str, LedgerEntry]] = []
        self.events: list[Event] = []
        self.charges: list[ChargeRequest] = []
        self.periods: list[ClosedPeriod] = []


class ClosedPeriod(msgspec.Struct, frozen=True):
    """A period's usage, archived when the next period starts (in the same commit)."""

    org_id: str
    period_key: str
    start_us: int
    end_us: int
    usage_micros: int
    quota_used_micros: int
    plan_id: str
    plan_version: int


class Dunning(msgspec.Struct, array_like=True):
    """An unpaid invoice's clock. The policy comes with the failure, so replay needs no settings.

    Steps: 1 suspended (only an org that never paid an invoice), 2 degraded (no purchases),
    3 moved to `free_plan`. Payment clears every step and restores `prior_plan`.
    """

    since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan: Plan
    step: int = 0
    prior_plan: Plan | None = None
    invoice_ids: list[str] | None = None  # the unpaid invoices; paying them all ends dunning


class AutoRecharge(msgspec.Struct, array_like=True):
    """Auto-recharge settings and the state that keeps it to one charge at a time.

    `pending_id` is the charge asked for and not yet settled: while it is set no other charge
    is asked for. `day`/`day_count` count charges per UTC day; `last_us` starts the cooldown.
    `paused` is set by a failed charge and lifted by a new card or new settings, so a card
    that declines is not charged again and again.
    """

    enabled: bool
    threshold_micros: int
    amount_micros: int
    max_per_day: int
    cooldown_s: int
    pending_id: str | None = None
    pending_micros: int = 0
    pending_since_us: int = 0
    seq: int = 0
    day: int = 0
    day_count: int = 0
    last_us: int = 0
    paused: str | None = None
    limit_noted_day: int = -1


class OrgSnapshot(msgspec.Struct, array_like=True):
    """The persisted form of an org; the plan is stored by id and version."""

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
    halted: str | None
    suspended: bool
    past_due_since_us: int | None
    leases: list[Lease] | None
    has_payment_method: bool
    created_us: int
    grant_seq: int
    tier_as_of_us: int = 0  # added after v1 snapshots: they decode with 0
    recharge: AutoRecharge | None = None  # added later too
    dunning: Dunning | None = None
    paid_invoice: bool = False
    invoice_as_of_us: int = 0
    period_anchor_us: int = 0
    paid_credit: bool = False


# Snapshot fields that are copied as they are; plan, grants and leases need converting.
_SNAPSHOT_PLAIN_FIELDS = tuple(
    name for name in OrgSnapshot.__struct_fields__ if name not in ("plan_id", "plan_version", "grants", "leases"))


def _burn_order(grant: Grant) -> tuple:
    # Expiring grants first (soonest first), then promotional credit, then purchased credit.
    expiring = grant.expires_at_us is not None
    return (not expiring, grant.expires_at_us or 0, grant.kind in PURCHASED_KINDS)


def _clawback_order(grant: Grant) -> tuple:
    # A refund takes back purchased credit first; only then anything else, in burn order.
    return (grant.kind not in PURCHASED_KINDS,) + _burn_order(grant)


class OrgBillingActor:
    __slots__ = (
        "org_id", "email", "prepaid", "plan", "tier", "max_concurrent", "max_disk_mb",
        "machine_quotas", "grants", "debt_micros", "remainder_scaled", "period_key",
        "period_start_us", "period_end_us", "period_usage_micros", "quota_used_micros",
        "thresholds_fired", "halted", "suspended", "past_due_since_us", "leases",
        "has_payment_method", "created_us", "grant_seq", "tier_as_of_us", "recharge",
        "dunning", "paid_invoice", "invoice_as_of_us", "period_anchor_us", "paid_credit",
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
        self.halted: str | None = None  # "balance" (ran out) or "admin"
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
        self.created_us = now_us
        self.grant_seq = 0
        self._start_period(now_us, None)

    # ----- creation ---------------------------------------------------------------------

    @classmethod
    def create(cls, org_id: str, email: str, prepaid: bool, plan: Plan, tier: str,
               max_concurrent: int, max_disk_mb: int, signup_grant_micros: int,
               now_us: int, fx: Effects) -> "OrgBillingActor":
        org = cls(org_id, email, prepaid, plan, tier, max_concurrent, max_disk_mb, now_us)
        if signup_grant_micros > 0:
            org.credit("signup_grant", signup_grant_micros, None, None, now_us, fx)
        elif prepaid:
            org._halt_if_out_of_money(now_us, fx)
        return org

    # ----- reads ------------------------------------------------------------------------

    def balance_at(self, now_us: int) -> int:
        live = 0
        for grant in self.grants or ():
            if grant.expires_at_us is None or grant.expires_at_us > now_us:
                live += grant.remaining_micros
        return live - self.debt_micros

    @property
    def balance_micros(self) -> int:
        return sum(g.remaining_micros for g in self.grants or ()) - self.debt_micros

    def quota_remaining_at(self, now_us: int) -> int:
        used = 0 if now_us >= self.period_end_us else self.quota_used_micros
        return max(0, self.plan.included_micros - used)

    def active_leases_at(self, now_us: int) -> int:
        return sum(l.quantity for l in self.leases.values() if l.expires_at_us > now_us) if self.leases else 0

    def gate(self, action: str, resources: Resources, now_us: int) -> Decision:
        """Read-only: may this org do `action` with `resources` now?"""
        assert action in ACTIONS, action
        balance = self.balance_at(now_us)
        active = self.active_leases_at(now_us)

        def decide(reason: str, **detail: int | str) -> Decision:
            return Decision(allowed=reason == "ok", reason=reason, status=STATUS_BY_REASON[reason],
                            balance_micros=balance, active_leases=active,
                            max_concurrent=self.max_concurrent, **detail)

        if self.suspended:
            return decide("suspended")
        if action == "purchase":
            return decide("degraded" if self.dunning is not None and self.dunning.step >= 2 else "ok")
        if self.halted == "admin":
            return decide("halted")
        if self.halted == "balance" and not self._funded_at(balance, now_us):
            return decide("no_payment_method" if action == "create" and self._needs_card() else "halted")
        if not self._may_spend(balance, now_us):
            if action == "create" and self._needs_card():
                return decide("no_payment_method")
            return decide("quota_exceeded" if self.plan.included_micros > 0 else "insufficient_balance")
        if action in ("create", "wake"):
            denied = self._resource_deny(resources, now_us)
            if denied is not None:
                return decide("resource_limit", **denied)
            if active + resources.quantity > self.max_concurrent:
                return decide("concurrency_limit")
        return decide("ok")

    def _needs_card(self) -> bool:
        """Free credit used up and nothing to pay with: the user must add a card, not just wait."""
        return not self.has_payment_method and not self.paid_credit

    def _funded_at(self, balance: int, now_us: int) -> bool:
        # A balance halt is lifted by the next mutation once money or new quota exists; a
        # read-only gate must not deny in the meantime (e.g. right after a period starts).
        return balance + self.quota_remaining_at(now_us) > 0

    def _may_spend(self, balance: int, now_us: int) -> bool:
        if not self.prepaid and self.plan.overage:
            return True  # postpaid: usage past credit is invoiced
        return balance + self.quota_remaining_at(now_us) > 0

    def _resource_deny(self, resources: Resources, now_us: int) -> dict | None:
        if resources.disk_mb > self.max_disk_mb:
            return {"limit": self.max_disk_mb, "requested": resources.disk_mb, "resource": "disk_mb"}
        if self.machine_quotas and resources.region and resources.machine_type:
            limit = self.machine_quotas.get(resources.region, {}).get(resources.machine_type)
            if limit is not None:
                in_use = sum(
                    l.quantity for l in (self.leases or {}).values()
                    if l.expires_at_us > now_us and l.region == resources.region
                    and l.machine_type == resources.machine_type
                )
                if in_use + resources.quantity > limit:
                    return {"limit": limit, "requested": in_use + resources.quantity, "in_use": in_use,
                            "resource": f"machine_type:{resources.region}/{resources.machine_type}"}
        return None

    # ----- leases -----------------------------------------------------------------------

    def acquire_lease(self, lease_id: str, resources: Resources, ttl_s: int, now_us: int,
                      fx: Effects) -> tuple[Decision | None, Lease | None, bool]:
        """(deny, None, False) | (None, lease, created). The same lease_id returns the lease."""
        assert 0 < ttl_s <= MAX_TTL_S, ttl_s
        assert resources.quantity >= 1, resources
        self.advance(now_us, fx)
        existing = self.leases.get(lease_id) if self.leases else None
        if existing is not None:
            if not self._same_lease(existing, resources):
                raise LeaseConflict(f"lease {lease_id} exists with other resources")
            return None, existing, False
        decision = self.gate("create", resources, now_us)
        if not decision.allowed:
            return decision, None, False
        if self.leases is None:
            self.leases = {}
        if len(self.leases) >= MAX_LEASES_PER_ORG:
            raise BillingError(f"an org holds at most {MAX_LEASES_PER_ORG} leases")
        lease = Lease(lease_id=lease_id, expires_at_us=now_us + ttl_s * US_PER_S, ttl_s=ttl_s,
                      quantity=resources.quantity, region=resources.region,
                      machine_type=resources.machine_type, memory_mb=resources.memory_mb,
                      cpu_count=resources.cpu_count, disk_mb=resources.disk_mb)
        self.leases[lease_id] = lease
        assert self.active_leases_at(now_us) <= self.max_concurrent, "lease cap exceeded"
        return None, lease, True

    @staticmethod
    def _same_lease(lease: Lease, resources: Resources) -> bool:
        return (lease.quantity, lease.region, lease.machine_type, lease.memory_mb,
                lease.cpu_count, lease.disk_mb) == (
                resources.quantity, resources.region, resources.machine_type,
                resources.memory_mb, resources.cpu_count, resources.disk_mb)

    def renew_lease(self, lease_id: str, now_us: int, fx: Effects) -> Lease:
        self.advance(now_us, fx)
        lease = self.leases.get(lease_id) if self.leases else None
        if lease is None:
            raise UnknownLease(f"lease {lease_id} is not active")
        lease.expires_at_us = max(lease.expires_at_us, now_us + lease.ttl_s * US_PER_S)
        return lease

    def release_lease(self, lease_id: str, now_us: int, fx: Effects) -> bool:
        """Release; releasing a lease that is already gone is not an error (a retried DELETE)."""
        self.advance(now_us, fx)
        if self.leases and self.leases.pop(lease_id, None) is not None:
            if not self.leases:
                self.leases = None
            return True
        return False

    # ----- usage ------------------------------------------------------------------------

    def apply_usage(self, usages: Iterable[LeaseUsage], now_us: int, fx: Effects) -> int:
        """Bill summed ticks; returns the micro-USD debited (quota part included)."""
        self.advance(now_us, fx)
        scaled = 0
        for usage in usages:
            scaled += cost_scaled(self.plan, usage)
            lease = self.leases.get(usage.lease_id) if self.leases else None
            if lease is not None:  # a tick is a heartbeat: it renews its lease
                lease.expires_at_us = max(lease.expires_at_us, now_us + lease.ttl_s * US_PER_S)
        micros, self.remainder_scaled = split_micros(self.remainder_scaled, scaled)
        assert 0 <= self.remainder_scaled < SCALED_PER_MICRO
        if micros:
            self._spend(micros, now_us, fx)
        return micros

    def _spend(self, micros: int, now_us: int, fx: Effects) -> None:
        self.period_usage_micros += micros
        from_quota = min(micros, self.quota_remaining_at(now_us))
        self.quota_used_micros += from_quota
        from_credit = micros - from_quota
        if from_credit:
            self._take(from_credit, _burn_order)
            fx.ledger.append((self.org_id, LedgerEntry("usage", -from_credit, now_us)))
        self._fire_quota_thresholds(now_us, fx)
        self._halt_if_out_of_money(now_us, fx)
        if self.recharge is not None and from_credit:
            self._maybe_recharge(now_us, fx)

    def _take(self, micros: int, order: Callable[[Grant], tuple]) -> None:
        """Take micros from the grants in `order`; what they cannot cover becomes debt."""
        assert micros > 0
        grants = self.grants
        if grants:
            exhausted = False
            for grant in grants if len(grants) == 1 else sorted(grants, key=order):
                taken = min(grant.remaining_micros, micros)
                grant.remaining_micros -= taken
                micros -= taken
                exhausted |= grant.remaining_micros == 0
                if micros == 0:
                    break
            if exhausted:
                self.grants = [g for g in grants if g.remaining_micros > 0] or None
        self.debt_micros += micros

    def _fire_quota_thresholds(self, now_us: int, fx: Effects) -> None:
        included = self.plan.included_micros
        if included == 0:
            return
        for bit, percent in enumerate(THRESHOLD_PERCENTS):
            if self.thresholds_fired >> bit & 1:
                continue
            if self.quota_used_micros * 100 >= included * percent:
                self.thresholds_fired |= 1 << bit
                fx.events.append(Event("quota.threshold_crossed", self.org_id, now_us, {
                    "percent": percent, "period": self.period_key,
                    "quota_micros": included, "used_micros": self.quota_used_micros}))

    def _halt_if_out_of_money(self, now_us: int, fx: Effects) -> None:
        if not self.prepaid or self.halted is not None:
            return
        if self.balance_micros + self.quota_remaining_at(now_us) > 0:
            return
        self.halted = "balance"
        fx.events.append(Event("org.halted", self.org_id, now_us, {
            "reason": "balance", "lease_ids": sorted(self.leases or ()),
            "balance_micros": self.balance_micros}))

    # ----- credit -----------------------------------------------------------------------

    def credit(self, kind: str, amount_micros: int, expires_at_us: int | None, note: str | None,
               now_us: int, fx: Effects) -> LedgerEntry:
        """Add credit; debt is paid first. A halt for lack of money lifts; no lease is made."""
        assert kind in CREDIT_KINDS, kind
        assert 0 < amount_micros <= MAX_AMOUNT_MICROS, amount_micros
        self.advance(now_us, fx)
        self.grant_seq += 1
        grant_id = f"gr_{self.grant_seq}"
        if kind in PAID_KINDS:
            self.paid_credit = True
        to_debt = min(self.debt_micros, amount_micros)
        self.debt_micros -= to_debt
        if amount_micros > to_debt:
            if len(self.grants or ()) >= MAX_GRANTS_PER_ORG:
                raise BillingError(f"an org holds at most {MAX_GRANTS_PER_ORG} live grants")
            grant = Grant(grant_id, sys.intern(kind), amount_micros - to_debt, expires_at_us)
            self.grants = (self.grants or []) + [grant]
        entry = LedgerEntry(kind, amount_micros, now_us, grant_id, expires_at_us, note)
        fx.ledger.append((self.org_id, entry))
        if expires_at_us is not None and expires_at_us <= now_us:
            # Reported after its expiry (a late payment event for a pack that lapses): it is
            # credited and lapses at once, so the ledger shows both.
            self._expire_grants(now_us, fx)
            return entry
        self._resume_if_funded("credit", now_us, fx)
        return entry

    def _resume_if_funded(self, reason: str, now_us: int, fx: Effects) -> None:
        """Lift a halt for lack of money once there is money (credit or quota) again."""
        if self.halted == "balance" and self.balance_micros + self.quota_remaining_at(now_us) > 0:
            self.halted = None
            fx.events.append(Event("org.resumed", self.org_id, now_us,
                                   {"reason": reason, "balance_micros": self.balance_micros}))

    def debit(self, kind: str, amount_micros: int, note: str | None, now_us: int,
              fx: Effects) -> LedgerEntry:
        """Take credit back (refund, negative adjustment): purchased credit first."""
        assert kind in DEBIT_KINDS, kind
        assert 0 < amount_micros <= MAX_AMOUNT_MICROS, amount_micros
        self.advance(now_us, fx)
        self._take(amount_micros, _clawback_order)
        entry = LedgerEntry(kind, -amount_micros, now_us, None, None, note)
        fx.ledger.append((self.org_id, entry))
        self._halt_if_out_of_money(now_us, fx)
        if self.recharge is not None:
            self._maybe_recharge(now_us, fx)
        return entry

    # ----- admin ------------------------------------------------------------------------

    def halt(self, now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        if self.halted != "admin":
            self.halted = "admin"
            fx.events.append(Event("org.halted", self.org_id, now_us, {
                "reason": "admin", "lease_ids": sorted(self.leases or ()),
                "balance_micros": self.balance_micros}))

    def resume(self, now_us: int, fx: Effects) -> None:
        """Unblock; never wakes anything. An org still out of money stays denied by the gate."""
        self.advance(now_us, fx)
        if self.halted is not None:
            self.halted = None
            fx.events.append(Event("org.resumed", self.org_id, now_us,
                                   {"reason": "admin", "balance_micros": self.balance_micros}))
            # Invariant 5: a prepaid org with nothing to spend stays halted, now for balance,
            # so the next credit (not another admin call) lifts it.
            self._halt_if_out_of_money(now_us, fx)

    def set_plan(self, plan: Plan, now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        if plan.period != self.plan.period:
            self._start_period(now_us, fx, plan)
        self.plan = plan
        self._halt_if_out_of_money(now_us, fx)
        self._resume_if_funded("plan", now_us, fx)

    def set_tier(self, tier: str, max_concurrent: int, now_us: int, fx: Effects,
                 as_of_us: int | None = None) -> bool:
        """A lower cap never ends running leases; it only stops new ones.

        `as_of_us` is when the source (a Stripe subscription event) said so: a change older
        than the one applied last is ignored, so events out of order end in the newest state.
        Returns whether the tier was applied.
        """
        assert max_concurrent >= 0
        self.advance(now_us, fx)
        if as_of_us is not None:
            if as_of_us < self.tier_as_of_us:
                return False
            self.tier_as_of_us = as_of_us
        self.tier = sys.intern(tier)
        self.max_concurrent = max_concurrent
        return True

    def set_payment_method(self, present: bool, now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        self.has_payment_method = present
        if present and self.recharge is not None:
            if self.recharge.paused == "payment_failed":
                self.recharge.paused = None  # a new card: auto-recharge may try again
            self._maybe_recharge(now_us, fx)

    # ----- auto-recharge ------------------------------------------------------------------

    def configure_recharge(self, enabled: bool, threshold_micros: int, amount_micros: int,
                           max_per_day: int, cooldown_s: int, now_us: int, fx: Effects) -> None:
        """Turn auto-recharge on or off. Turning it on with the balance already under the
        threshold makes the first (arming) charge at once; a charge in flight still settles."""
        self.advance(now_us, fx)
        current = self.recharge
        if not enabled:
            if current is not None:
                current.enabled = False
            return
        assert threshold_micros >= 0 and amount_micros > 0 and amount_micros % MICROS_PER_CENT == 0
        assert max_per_day >= 1 and cooldown_s >= 0
        if current is None:
            self.recharge = AutoRecharge(True, threshold_micros, amount_micros, max_per_day, cooldown_s)
        else:
            current.enabled, current.threshold_micros, current.amount_micros = True, threshold_micros, amount_micros
            current.max_per_day, current.cooldown_s, current.paused = max_per_day, cooldown_s, None
        self._maybe_recharge(now_us, fx)

    def recharge_amount(self, balance: int) -> int:
        """The configured amount, or more when that would not bring the balance above the
        threshold in one charge; whole cents."""
        r = self.recharge
        short = r.threshold_micros - balance + 1
        needed = -(-short // MICROS_PER_CENT) * MICROS_PER_CENT
        return min(max(r.amount_micros, needed), MAX_CHARGE_MICROS)

    def _maybe_recharge(self, now_us: int, fx: Effects) -> None:
        r = self.recharge
        if not r.enabled or r.pending_id is not None or r.paused is not None or not self.has_payment_method:
            return
        balance = self.balance_micros
        if balance >= r.threshold_micros:
            return
        if r.last_us and now_us - r.last_us < r.cooldown_s * US_PER_S:
            return
        day = now_us // US_PER_DAY
        if day != r.day:
            r.day, r.day_count = day, 0
        if r.day_count >= r.max_per_day:
            if r.limit_noted_day != day:  # said once a day, not at every debit
                r.limit_noted_day = day
                fx.events.append(Event("auto_recharge.failed", self.org_id, now_us, {
                    "reason": "daily_limit", "max_per_day": r.max_per_day, "balance_micros": balance}))
            return
        r.seq += 1
        r.day_count += 1
        r.last_us = now_us
        r.pending_id = f"ar_{r.seq}"
        r.pending_micros = self.recharge_amount(balance)
        r.pending_since_us = now_us
        fx.charges.append(self.pending_charge())

    def _recharge_retry_us(self) -> int | None:
        """When a charge held back by the cooldown or the daily cap may go out, if one is wanted."""
        r = self.recharge
        if (r is None or not r.enabled or r.pending_id is not None or r.paused is not None
                or not self.has_payment_method or self.balance_micros >= r.threshold_micros):
            return None
        at = r.last_us + r.cooldown_s * US_PER_S if r.last_us else 0
        if r.day_count >= r.max_per_day:
            at = max(at, (r.day + 1) * US_PER_DAY)
        return at or None

    def pending_charge(self) -> ChargeRequest | None:
        """The charge in flight, as the charger makes it; the same key every time it is asked."""
        r = self.recharge
        if r is None or r.pending_id is None:
            return None
        key = f"metergate:{self.org_id}:{self.created_us}:auto_recharge:{r.pending_id}"
        return ChargeRequest(self.org_id, r.pending_id, r.pending_micros, key, r.pending_since_us)

    def settle_recharge(self, charge_id: str, succeeded: bool, amount_micros: int,
                        payment_id: str | None, reason: str | None, now_us: int,
                        fx: Effects) -> LedgerEntry | None:
        """The outcome of a charge. Money taken is credited whatever else happened meanwhile;
        a failure counts only for the charge in flight (a late or repeated one changes nothing)."""
        self.advance(now_us, fx)
        r = self.recharge
        current = r is not None and r.pending_id == charge_id
        if current:
            r.pending_id, r.pending_micros, r.pending_since_us = None, 0, 0
        if succeeded:
            entry = self.credit("auto_recharge", amount_micros, None,
                                f"auto-recharge {charge_id} ({payment_id})", now_us, fx)
            fx.events.append(Event("auto_recharge.succeeded", self.org_id, now_us, {
                "charge_id": charge_id, "amount_micros": amount_micros, "payment_intent_id": payment_id,
                "balance_micros": self.balance_micros}))
            return entry
        if current:
            r.paused = "payment_failed"
            fx.events.append(Event("auto_recharge.failed", self.org_id, now_us, {
                "charge_id": charge_id, "amount_micros": amount_micros, "payment_intent_id": payment_id,
                "reason": reason or "payment_failed", "balance_micros": self.balance_micros}))
        return None

    def recharge_view(self) -> dict:
        r = self.recharge
        if r is None:
            return {"enabled": False}
        return {
            "enabled": r.enabled, "threshold_micros": r.threshold_micros, "amount_micros": r.amount_micros,
            "max_per_day": r.max_per_day, "cooldown_s": r.cooldown_s, "charges_today": r.day_count,
            "pending": {"charge_id": r.pending_id, "amount_micros": r.pending_micros,
                        "requested_at": us_to_rfc3339(r.pending_since_us)} if r.pending_id else None,
            "last_charge_at": us_to_rfc3339(r.last_us) if r.last_us else None,
            "paused": r.paused,
        }

    def set_limits(self, max_disk_mb: int | None, machine_quotas: dict[str, dict[str, int]] | None,
                   now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        if max_disk_mb is not None:
            self.max_disk_mb = max_disk_mb
        if machine_quotas is not None:
            self.machine_quotas = machine_quotas or None

    # ----- time -------------------------------------------------------------------------

    def advance(self, now_us: int, fx: Effects) -> None:
        """Apply what time alone changed: a new period, expired grants and leases, dunning."""
        new_period = now_us >= self.period_end_us
        if new_period:
            self._start_period(now_us, fx)
        for grant in self.grants or ():
            if grant.expires_at_us is not None and grant.expires_at_us <= now_us:
                self._expire_grants(now_us, fx)
                break
        if self.leases:
            for lease in self.leases.values():
                if lease.expires_at_us <= now_us:
                    self._expire_leases(now_us, fx)
                    break
        if self.dunning is not None:
            self._dunning_steps(now_us, fx)
        if self.recharge is not None:
            # A charge held back by the cooldown or the daily cap goes out once that ends, even
            # if no debit comes (a halted org sends none): the scheduler wakes the org for it.
            self._maybe_recharge(now_us, fx)
        if new_period:
            # The new period's quota is money to spend: a halt for lack of money lifts, as
            # after a credit; after the grant expiry above, so it never lifts then re-halts.
            self._resume_if_funded("period", now_us, fx)

    def next_due_us(self) -> int:
        """The next time at which time alone changes this org (the scheduler wakes it then)."""
        due = self.period_end_us
        for grant in self.grants or ():
            if grant.expires_at_us is not None and grant.expires_at_us < due:
                due = grant.expires_at_us
        for lease in (self.leases or {}).values():
            if lease.expires_at_us < due:
                due = lease.expires_at_us
        retry = self._recharge_retry_us()
        if retry is not None:
            due = min(due, retry)
        dunning = self.dunning
        if dunning is not None and dunning.step < 3:
            after = (dunning.suspend_after_s, dunning.degrade_after_s, dunning.downgrade_after_s)[dunning.step]
            due = min(due, dunning.since_us + after * US_PER_S)
        return due

    def _start_period(self, now_us: int, fx: Effects | None, plan: Plan | None = None) -> None:
        """Archive the running period (in `fx`) and start the one containing now_us, on `plan`
        or else on the version of the current plan in effect then."""
        old_start, old_end = self.period_start_us, self.period_end_us
        if fx is not None and self.period_key and now_us > old_start:
            fx.periods.append(ClosedPeriod(
                self.org_id, self.period_key, old_start, min(old_end, now_us),
                self.period_usage_micros, self.quota_used_micros, self.plan.id, self.plan.version))
        self.plan = plan or plan_for_period(self.plan, now_us)
        if (plan is None and self.period_anchor_us and old_start < old_end <= now_us
                and self.period_anchor_us < old_end):
            # A subscription sets the periods: the next one starts where the last one ended and
            # is as long, until Stripe's next period says otherwise (reset_period).
            length = old_end - max(old_start, self.period_anchor_us)
            start = old_end + (now_us - old_end) // length * length
            end = start + length
            key = "sub-" + us_to_rfc3339(start)[:10]
        else:
            key, start, end = period_bounds(self.plan.period, now_us)
            if plan is not None or (self.period_key and old_end > now_us):
                start = now_us  # cut short mid-period (a plan switch): the new one starts now
        self.period_key = sys.intern(key)
        self.period_start_us, self.period_end_us = start, end
        self.period_usage_micros = 0
        self.quota_used_micros = 0
        self.thresholds_fired = 0

    def reset_period(self, anchor_us: int, end_us: int | None, now_us: int, fx: Effects) -> bool:
        """Stripe's subscription period [anchor_us, end_us) from now on sets the org's periods.

        The first one aligns the running period's end with it. A later one whose start moved
        past the start of the running period begins a new period now, quota reset, the old one
        archived. If the running period already began at or after it (it rolled over at the
        renewal), only its end is aligned. The same or an older anchor changes nothing.
        """
        self.advance(now_us, fx)
        if anchor_us <= self.period_anchor_us:
            return False
        first = self.period_anchor_us == 0
        self.period_anchor_us = anchor_us
        reset = not first and anchor_us > self.period_start_us
        if reset:
            self._start_period(now_us, fx)
            self.period_start_us = now_us
            self.period_key = sys.intern("sub-" + us_to_rfc3339(now_us)[:10])
        if end_us is not None and end_us > now_us:
            self.period_end_us = end_us
        if reset:
            self._resume_if_funded("period", now_us, fx)
        return reset

    # ----- dunning ------------------------------------------------------------------------

    def invoice_failed(self, since_us: int, suspend_after_s: int, degrade_after_s: int,
                       downgrade_after_s: int, free_plan: Plan, now_us: int, fx: Effects,
                       invoice_id: str | None = None) -> bool:
        """An invoice payment failed at `since_us`: the past-due clock starts (once)."""
        self.advance(now_us, fx)
        if since_us < self.invoice_as_of_us:
            return False  # older than the last invoice news: a payment since then wins
        self.invoice_as_of_us = since_us
        if self.dunning is None:
            self.past_due_since_us = since_us
            self.dunning = Dunning(since_us, suspend_after_s, degrade_after_s, downgrade_after_s, free_plan)
            self._dunning_steps(now_us, fx)
        if invoice_id is not None and invoice_id not in (self.dunning.invoice_ids or ()):
            self.dunning.invoice_ids = (self.dunning.invoice_ids or []) + [invoice_id]
        return True

    def invoice_paid(self, as_of_us: int, now_us: int, fx: Effects, invoice_id: str | None = None,
                     amount_paid: int | None = None) -> bool:
        """An invoice was paid. Once every invoice that failed is paid, everything dunning did
        is undone at once. A zero-amount invoice (a trial, a proration) proves nothing."""
        self.advance(now_us, fx)
        if amount_paid == 0:
            return False
        dunning = self.dunning
        unpaid = dunning.invoice_ids if dunning is not None else None
        if invoice_id is None or unpaid is None:
            if as_of_us < self.invoice_as_of_us:
                return False  # an older payment: the failure since then stands
            self.invoice_as_of_us = as_of_us
        self.paid_invoice = True
        if dunning is None:
            return True
        if unpaid is not None and invoice_id is not None:
            if invoice_id not in unpaid:
                return True  # another invoice: the failed one is still unpaid
            dunning.invoice_ids = [i for i in unpaid if i != invoice_id] or None
            if dunning.invoice_ids:
                return True
        was_suspended = self.suspended
        self.dunning, self.past_due_since_us, self.suspended = None, None, False
        if dunning.prior_plan is not None:
            self.set_plan(dunning.prior_plan, now_us, fx)
        fx.events.append(Event("org.unsuspended", self.org_id, now_us, {
            "was_suspended": was_suspended, "step": dunning.step,
            "past_due_since": us_to_rfc3339(dunning.since_us)}))
        return True

    def _dunning_steps(self, now_us: int, fx: Effects) -> None:
        dunning = self.dunning
        elapsed = now_us - dunning.since_us
        if dunning.step < 1 and elapsed >= dunning.suspend_after_s * US_PER_S:
            dunning.step = 1
            if not self.paid_invoice:
                self.suspended = True
                fx.events.append(Event("org.suspended", self.org_id, now_us, {
                    "reason": "past_due", "past_due_since": us_to_rfc3339(dunning.since_us),
                    "lease_ids": sorted(self.leases or ())}))
        if dunning.step < 2 and elapsed >= dunning.degrade_after_s * US_PER_S:
            dunning.step = 2
        if dunning.step < 3 and elapsed >= dunning.downgrade_after_s * US_PER_S:
            dunning.step = 3
            if self.plan.id != dunning.free_plan.id:
                dunning.prior_plan = self.plan
                self._start_period(now_us, fx, dunning.free_plan)
                self._halt_if_out_of_money(now_us, fx)

    def _expire_grants(self, now_us: int, fx: Effects) -> None:
        kept = []
        for grant in self.grants or ():
            if grant.expires_at_us is not None and grant.expires_at_us <= now_us:
                fx.ledger.append((self.org_id, LedgerEntry(
                    "expiration", -grant.remaining_micros, now_us, grant.grant_id, grant.expires_at_us)))
            else:
                kept.append(grant)
        self.grants = kept or None
        self._halt_if_out_of_money(now_us, fx)
        if self.recharge is not None:
            self._maybe_recharge(now_us, fx)

    def _expire_leases(self, now_us: int, fx: Effects) -> None:
        assert self.leases is not None
        for lease in [l for l in self.leases.values() if l.expires_at_us <= now_us]:
            del self.leases[lease.lease_id]
            fx.events.append(Event("lease.expired", self.org_id, now_us, {
                "lease_id": lease.lease_id, "expired_at": us_to_rfc3339(lease.expires_at_us)}))
        if not self.leases:
            self.leases = None

    # ----- persistence ------------------------------------------------------------------

    def check_invariants(self) -> None:
        assert self.debt_micros >= 0, self.debt_micros
        assert 0 <= self.remainder_scaled < SCALED_PER_MICRO, self.remainder_scaled
        for grant in self.grants or ():
            assert grant.remaining_micros > 0, grant
        assert 0 <= self.quota_used_micros <= self.period_usage_micros
        assert len(self.leases or ()) <= MAX_LEASES_PER_ORG
        assert not (self.grants and self.debt_micros), "debt while credit remains"

    def to_snapshot(self) -> OrgSnapshot:
        self.check_invariants()
        return OrgSnapshot(
            plan_id=self.plan.id, plan_version=self.plan.version,
            grants=[msgspec.structs.replace(g) for g in self.grants] if self.grants else None,
            leases=[msgspec.structs.replace(l) for l in self.leases.values()] if self.leases else None,
            **{name: getattr(self, name) for name in _SNAPSHOT_PLAIN_FIELDS})

    @classmethod
    def from_snapshot(cls, snap: OrgSnapshot, plan: Plan) -> "OrgBillingActor":
        assert (plan.id, plan.version) == (snap.plan_id, snap.plan_version)
        org = cls.__new__(cls)
        for name in _SNAPSHOT_PLAIN_FIELDS:
            setattr(org, name, getattr(snap, name))
        org.plan = plan
        org.grants = snap.grants
        org.leases = {l.lease_id: l for l in snap.leases} if snap.leases else None
        # Shared strings: thousands of orgs hold the same period key and tier.
        org.org_id, org.tier, org.period_key = (sys.intern(snap.org_id), sys.intern(snap.tier),
                                                sys.intern(snap.period_key))
        org.check_invariants()
        return org

    def view(self, now_us: int) -> dict:
        """The org's state as GET /v1/orgs/{org_id} shows it."""
        active = [l for l in (self.leases or {}).values() if l.expires_at_us > now_us]
        quota_used = 0 if now_us >= self.period_end_us else self.quota_used_micros
        usage = 0 if now_us >= self.period_end_us else self.period_usage_micros
        return {
            "org_id": self.org_id,
            "email": self.email,
            "billing_mode": "prepaid" if self.prepaid else "postpaid",
            "balance_micros": self.balance_at(now_us),
            "debt_micros": self.debt_micros,
            "grants": [
                {"grant_id": g.grant_id, "kind": g.kind, "remaining_micros": g.remaining_micros,
                 "expires_at": us_to_rfc3339(g.expires_at_us) if g.expires_at_us else None}
                for g in sorted(self.grants or (), key=_burn_order)
            ],
            "period": {
                "key": self.period_key, "usage_micros": usage, "quota_micros": self.plan.included_micros,
                "quota_used_micros": quota_used, "resets_at": us_to_rfc3339(self.period_end_us),
                # kept under the names API.md lists as well
                "usage": usage, "quota": self.plan.included_micros,
            },
            "is_halted": self.halted is not None,
            "halt_reason": self.halted,
            "suspended": self.suspended,
            "degraded": self.dunning is not None and self.dunning.step >= 2,
            "past_due_since": us_to_rfc3339(self.past_due_since_us) if self.past_due_since_us else None,
            "active_leases": sum(l.quantity for l in active),
            "leases": [{"lease_id": l.lease_id, "expires_at": us_to_rfc3339(l.expires_at_us),
                        "quantity": l.quantity} for l in active],
            "max_concurrent": self.max_concurrent,
            "tier": self.tier,
            "plan": {"id": self.plan.id, "version": self.plan.version},
            "limits": {"max_disk_mb": self.max_disk_mb, "machine_quotas": self.machine_quotas or {}},
            "auto_recharge": self.recharge_view(),
            "has_payment_method": self.has_payment_method,
            "created_at": us_to_rfc3339(self.created_us),
        }


# Every piece of org state is in the snapshot, or recovery would silently forget it.
assert set(_SNAPSHOT_PLAIN_FIELDS) | {"plan", "grants", "leases"} == set(OrgBillingActor.__slots__)
