"""Money of an org: grants and their burn order, credit, debit, spending usage, halts.

The balance is the sum of the live grants minus the debt; the period quota is spent before
any grant and is not money in the ledger. A prepaid org with nothing left to spend is halted
(invariant 5) and the next money lifts the halt.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import msgspec

from actors.effects import Effects, Event
from metergate_client.decision import HaltCause
from actors.metering import SCALED_PER_MICRO, LeaseUsage, cost_scaled, split_micros
from actors.refusals import BillingError
from actors.timeutil import US_PER_S

MAX_GRANTS_PER_ORG = 1_000
MAX_AMOUNT_MICROS = 10**12  # 1,000,000 USD in one ledger operation

PROMOTIONAL_KINDS = frozenset({"signup_grant", "grant"})
PURCHASED_KINDS = frozenset({"topup", "auto_recharge", "adjustment"})
PAID_KINDS = frozenset({"topup", "auto_recharge"})
CREDIT_KINDS = PROMOTIONAL_KINDS | PURCHASED_KINDS
DEBIT_KINDS = frozenset({"refund", "adjustment"})
REVERSAL_KINDS = frozenset({"refund_reversal", "dispute_reversal"})  # ledger entries giving money back
IMPORT_KIND = "import"  # the ledger entry of an amount brought over from another biller (billing-rules 2.11)
THRESHOLD_PERCENTS = (80, 100)


class Grant(msgspec.Struct, array_like=True):
    grant_id: str
    kind: str
    remaining_micros: int
    expires_at_us: int | None = None
    payment_id: str | None = None  # the Stripe payment that bought it: what its refunds claw back


class LedgerEntry(msgspec.Struct, omit_defaults=True):
    kind: str
    amount_micros: int
    at_us: int
    grant_id: str | None = None
    expires_at_us: int | None = None
    note: str | None = None
    invoiced_micros: int = 0  # usage of a postpaid org that no credit covered: billed by Stripe
    idempotency_key: str | None = None  # set by the core only: a refund applied when its payment's credit came
    paid_micros: int | None = None  # a credit's: what its payment was, tax included (billing-rules 2.3, 3.0)


def credit_share(paid_part_micros: int, credited_micros: int, paid_micros: int | None) -> int:
    """Billing-rules 3.0: what `paid_part_micros` of a payment (a refund, a dispute; tax
    included) stands for in the credit it bought: `credited_micros` of `paid_micros`, rounded
    down; the amount itself when either is unknown."""
    if not paid_micros or paid_micros <= 0 or credited_micros <= 0:
        return paid_part_micros
    return paid_part_micros * credited_micros // paid_micros


def credit_share_after(earlier_micros: int, earlier_shares_micros: int, paid_part_micros: int,
                       credited_micros: int, paid_micros: int | None) -> int:
    """Billing-rules 3.0: the share of a refund whose payment's earlier refunds add up to
    `earlier_micros` and took shares adding up to `earlier_shares_micros`: what they all stand
    for together, less what the earlier ones took (never below 0), so the customer keeps one
    rounded-down fraction per payment, not one per refund, also after one is reversed."""
    if not paid_micros or paid_micros <= 0 or credited_micros <= 0:
        return paid_part_micros
    return max(0, credit_share(earlier_micros + paid_part_micros, credited_micros, paid_micros)
               - earlier_shares_micros)


def burn_order(grant: Grant) -> tuple:
    # Expiring grants first (soonest first), then promotional credit, then purchased credit.
    expiring = grant.expires_at_us is not None
    return (not expiring, grant.expires_at_us or 0, grant.kind in PURCHASED_KINDS)


def clawback_order(grant: Grant) -> tuple:
    # A refund takes back purchased credit first; only then anything else, in burn order.
    return (grant.kind not in PURCHASED_KINDS,) + burn_order(grant)


class Money:
    """OrgBillingActor's money: grants, debt_micros, remainder_scaled, the period's usage and
    quota used, thresholds_fired, halted, grant_seq, paid_credit, low_balance_micros,
    low_balance_armed."""

    __slots__ = ()

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
            # A postpaid org's usage past its credit is invoiced (billing-rules 6.2, 6.5), never
            # debt: debt would be paid again by its next credit, after Stripe billed it.
            taken = from_credit if self.prepaid else min(from_credit, sum(g.remaining_micros for g in self.grants or ()))
            if taken:
                self._take(taken, burn_order)
            fx.ledger.append((self.org_id, LedgerEntry("usage", -taken, now_us,
                                                       invoiced_micros=from_credit - taken)))
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

    # ----- credit and debit -------------------------------------------------------------

    def credit(self, kind: str, amount_micros: int, expires_at_us: int | None, note: str | None,
               now_us: int, fx: Effects, payment_id: str | None = None, paid_micros: int | None = None) -> LedgerEntry:
        """Add credit (billing-rules 2.3); debt is paid first. A halt for lack of money lifts.
        `paid_micros`: what its payment was, tax included (its refunds take their share, 3.0)."""
        self.advance(now_us, fx)
        return self._add_credit(kind, amount_micros, expires_at_us, note, now_us, fx, payment_id,
                                paid_micros=paid_micros)

    def _add_credit(self, kind: str, amount_micros: int, expires_at_us: int | None, note: str | None,
                    now_us: int, fx: Effects, payment_id: str | None = None,
                    entry_kind: str | None = None, paid_micros: int | None = None,
                    idempotency_key: str | None = None) -> LedgerEntry:
        """Credit without advancing first: the caller has, at this same `now_us`. `entry_kind`:
        the ledger entry's kind when it is not the grant's (money given back, or an import whose
        caps were counted before: never refused here). `idempotency_key`: the entry's, stamped
        by the core (an import's)."""
        assert kind in CREDIT_KINDS, kind
        assert entry_kind is None or entry_kind in REVERSAL_KINDS or entry_kind == IMPORT_KIND, entry_kind
        assert 0 < amount_micros <= MAX_AMOUNT_MICROS, amount_micros
        to_debt = min(self.debt_micros, amount_micros)
        if (amount_micros > to_debt and len(self.grants or ()) >= MAX_GRANTS_PER_ORG and kind not in PAID_KINDS
                and entry_kind is None):
            # Money paid is never refused (the card was charged); an operator's credit is.
            raise BillingError(f"an org holds at most {MAX_GRANTS_PER_ORG} live grants")
        self.grant_seq += 1
        grant_id = f"gr_{self.grant_seq}"
        if kind in PAID_KINDS:
            self.paid_credit = True
        self.debt_micros -= to_debt
        grant = None
        if amount_micros > to_debt:
            grant = Grant(grant_id, sys.intern(kind), amount_micros - to_debt, expires_at_us, payment_id)
            self.grants = (self.grants or []) + [grant]
        entry = LedgerEntry(entry_kind or kind, amount_micros, now_us, grant_id, expires_at_us, note,
                            idempotency_key=idempotency_key,
                            paid_micros=paid_micros if payment_id is not None else None)
        fx.ledger.append((self.org_id, entry))
        if expires_at_us is not None and expires_at_us <= now_us:
            # Reported after its expiry (a late payment event for a pack that lapses): it is
            # credited and lapses at once, so the ledger shows both.
            self._expire_grants(now_us, fx)
            return entry
        if payment_id is not None and paid_micros is not None and entry_kind is None:
            self._remember_paid(payment_id, amount_micros, paid_micros)
        if payment_id is not None:
            if grant is not None:
                self._apply_waiting_refunds(grant, amount_micros, paid_micros, now_us, fx)
            if self.disputes:
                self._apply_waiting_disputes(payment_id, amount_micros, paid_micros, now_us, fx)
        self._resume_if_funded("credit", now_us, fx)
        return entry

    def debit(self, kind: str, amount_micros: int, note: str | None, now_us: int,
              fx: Effects, entry_kind: str | None = None, idempotency_key: str | None = None) -> LedgerEntry:
        """Take credit back (refund, negative adjustment): purchased credit first. `entry_kind`
        and `idempotency_key`: an imported debt's entry (billing-rules 2.11)."""
        assert kind in DEBIT_KINDS, kind
        assert entry_kind is None or entry_kind == IMPORT_KIND, entry_kind
        assert 0 < amount_micros <= MAX_AMOUNT_MICROS, amount_micros
        self.advance(now_us, fx)
        self._take(amount_micros, clawback_order)
        entry = LedgerEntry(entry_kind or kind, -amount_micros, now_us, None, None, note,
                            idempotency_key=idempotency_key)
        fx.ledger.append((self.org_id, entry))
        self._halt_if_out_of_money(now_us, fx)
        if self.recharge is not None:
            self._maybe_recharge(now_us, fx)
        return entry

    def _expire_grants(self, now_us: int, fx: Effects) -> None:
        kept = []
        for grant in self.grants or ():
            if grant.expires_at_us is not None and grant.expires_at_us <= now_us:
                fx.ledger.append((self.org_id, LedgerEntry(
                    "expiration", -grant.remaining_micros, now_us, grant.grant_id, grant.expires_at_us)))
                if grant.payment_id is not None:
                    self._note_lapsed(grant.payment_id, grant.remaining_micros)
            else:
                kept.append(grant)
        self.grants = kept or None
        self._halt_if_out_of_money(now_us, fx)
        if self.recharge is not None:
            self._maybe_recharge(now_us, fx)

    # ----- alerts -----------------------------------------------------------------------

    def set_low_balance_alert(self, threshold_micros: int, now_us: int, fx: Effects) -> None:
        assert threshold_micros >= 0, threshold_micros
        self.advance(now_us, fx)
        self.low_balance_micros = threshold_micros
        self.low_balance_armed = True

    def check_low_balance(self, now_us: int, fx: Effects) -> None:
        """After every command (billing-rules 2.9): once per fall under the threshold."""
        threshold = self.low_balance_micros
        balance = self.balance_micros
        if self.low_balance_armed:
            if threshold and balance < threshold:
                self.low_balance_armed = False
                fx.events.append(Event("balance.threshold_crossed", self.org_id, now_us, {
                    "threshold_micros": threshold, "balance_micros": balance}))
        elif balance >= threshold:  # disarmed means a threshold is set: SetAlerts re-arms
            self.low_balance_armed = True

    # ----- halts ------------------------------------------------------------------------

    def _halt_if_out_of_money(self, now_us: int, fx: Effects) -> None:
        if not self.prepaid or self.halted is not None:
            return
        if self.balance_micros + self.quota_remaining_at(now_us) > 0:
            return
        self.halted = HaltCause.BALANCE
        fx.events.append(Event("org.halted", self.org_id, now_us, {
            "reason": HaltCause.BALANCE, "lease_ids": sorted(self.leases or ()),
            "balance_micros": self.balance_micros}))

    def _resume_if_funded(self, reason: str, now_us: int, fx: Effects) -> None:
        """Lift a halt for lack of money once there is money (credit or quota) again."""
        if self.halted == HaltCause.BALANCE and self.balance_micros + self.quota_remaining_at(now_us) > 0:
            self.halted = None
            fx.events.append(Event("org.resumed", self.org_id, now_us,
                                   {"reason": reason, "balance_micros": self.balance_micros}))

    def halt(self, now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        if self.halted != HaltCause.ADMIN:
            self.halted = HaltCause.ADMIN
            fx.events.append(Event("org.halted", self.org_id, now_us, {
                "reason": HaltCause.ADMIN, "lease_ids": sorted(self.leases or ()),
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
