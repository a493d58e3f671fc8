"""Time in an org: quota periods, what expires, and the dunning clock of an unpaid invoice.

Nothing here reads a clock: `advance(now_us)` applies what time alone changed since the last
command, and `next_due_us()` tells the scheduler when that will next be something.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import IntEnum

import msgspec

from actors.enforcement import SHADOW_FOREVER_US
from actors.effects import Effects, Event
from actors.timeutil import US_PER_S, period_bounds, us_to_rfc3339
from actors.subscriptions import ENDED
from config.catalog import Plan, plan_for_period


MAX_SETTLED_INVOICES = 100  # settled invoice ids kept: a late failure of one of them is ignored


class DunningStep(IntEnum):
    """How far dunning went; each step keeps the ones before it."""

    NONE = 0
    SUSPENDED = 1  # only an org that never paid an invoice is suspended
    DEGRADED = 2  # no purchases
    DOWNGRADED = 3  # moved to the free plan


class Dunning(msgspec.Struct, array_like=True):
    """An unpaid invoice's clock. The policy comes with the failure, so replay needs no settings.

    Payment clears every step and restores `prior_plan`. Live state only: a snapshot keeps its
    `saved()` form, the plans by id (format 1 kept this struct, whole plans in it).
    """

    since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan: Plan
    step: DunningStep = DunningStep.NONE
    prior_plan: Plan | None = None
    invoice_ids: list[str] | None = None  # the unpaid invoices; paying them all ends dunning
    invoice_subscriptions: dict[str, str] | None = None  # unpaid invoice -> the subscription it bills


    def saved(self) -> "SavedDunning":
        return SavedDunning(
            self.since_us, self.suspend_after_s, self.degrade_after_s, self.downgrade_after_s, self.free_plan.id,
            self.free_plan.version, self.step, None if self.prior_plan is None else self.prior_plan.id,
            0 if self.prior_plan is None else self.prior_plan.version,
            list(self.invoice_ids) if self.invoice_ids is not None else None,
            dict(self.invoice_subscriptions) if self.invoice_subscriptions is not None else None)


class SavedDunning(msgspec.Struct, array_like=True):
    """Dunning as a snapshot keeps it (format 2 on): its plans by id and version, resolved in
    the catalog at load, so a field added to `Plan` never touches a saved org."""

    since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan_id: str
    free_plan_version: int
    step: DunningStep = DunningStep.NONE
    prior_plan_id: str | None = None
    prior_plan_version: int = 0
    invoice_ids: list[str] | None = None
    invoice_subscriptions: dict[str, str] | None = None

    def live(self, plan_of: Callable[[str, int], Plan]) -> Dunning:
        prior = None if self.prior_plan_id is None else plan_of(self.prior_plan_id, self.prior_plan_version)
        return Dunning(self.since_us, self.suspend_after_s, self.degrade_after_s, self.downgrade_after_s,
                       plan_of(self.free_plan_id, self.free_plan_version), self.step, prior, self.invoice_ids,
                       self.invoice_subscriptions)


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


class Periods:
    """OrgBillingActor's time: plan, the period (key, bounds, anchor), dunning, suspended,
    past_due_since_us, paid_invoice, invoice_as_of_us."""

    __slots__ = ()

    @property
    def degraded(self) -> bool:
        return self.dunning is not None and self.dunning.step >= DunningStep.DEGRADED

    def advance(self, now_us: int, fx: Effects) -> None:
        """Apply what time alone changed: a new period, expired grants and leases, dunning."""
        if self.shadow_until_us is not None and not self.cutover_told:
            self.tell_cutover(now_us, fx)  # a cutover passed: first, as the org stood (billing-rules 2.12)
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
        if self.ended_leases:
            self._forget_ended_leases(now_us)
        if self.dunning is not None:
            self._dunning_steps(now_us, fx)
        if self.refunds:
            self._forget_refunds(now_us)
        if self.disputes:
            self._forget_disputes(now_us)
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
        moments = [self.period_end_us]
        moments += [grant.expires_at_us for grant in self.grants or () if grant.expires_at_us is not None]
        moments += [lease.expires_at_us for lease in (self.leases or {}).values()]
        retry = self._recharge_retry_us()
        until = self.shadow_until_us
        if until is not None and not self.cutover_told:  # in shadow (2.12): no charge before the cutover,
            if until != SHADOW_FOREVER_US:              # which is due itself (to tell the compute plane)
                moments.append(until)
            retry = None if retry is None or until == SHADOW_FOREVER_US else max(retry, until)
        if retry is not None:
            moments.append(retry)
        dunning = self.dunning
        if dunning is not None and dunning.step < DunningStep.DOWNGRADED:
            moments.append(self._dunning_due_us())
        return min(moments)

    def _dunning_due_us(self) -> int:
        """When the running dunning takes its next step (it has one: step < DOWNGRADED)."""
        dunning = self.dunning
        after = (dunning.suspend_after_s, dunning.degrade_after_s, dunning.downgrade_after_s)[dunning.step]
        return dunning.since_us + after * US_PER_S

    # ----- periods ----------------------------------------------------------------------

    def _grid_period(self, kind: str, at_us: int) -> tuple[str, int, int]:
        """(key, start, end) of the grid period containing at_us (billing-rules 5.2): the
        subscription's cycle once one gave a whole period, else the calendar of `kind`."""
        cycle = self.period_cycle_us
        if cycle:
            start = self.period_cycle_start_us + (at_us - self.period_cycle_start_us) // cycle * cycle
            return "sub-" + us_to_rfc3339(start)[:10], start, start + cycle
        return period_bounds(kind, at_us)

    def _archive_period(self, now_us: int, fx: Effects | None) -> None:
        """The running period, archived up to the earlier of its end and now (if it began)."""
        if fx is not None and self.period_key and now_us > self.period_start_us:
            fx.periods.append(ClosedPeriod(
                self.org_id, self.period_key, self.period_start_us, min(self.period_end_us, now_us),
                self.period_usage_micros, self.quota_used_micros, self.plan.id, self.plan.version))

    def _begin_period(self, key: str, start_us: int, end_us: int) -> None:
        self.period_key = sys.intern(key)
        self.period_start_us, self.period_end_us = start_us, end_us
        self.period_usage_micros = 0
        self.quota_used_micros = 0
        self.thresholds_fired = 0

    def _start_period(self, now_us: int, fx: Effects | None) -> None:
        """Archive the running period and begin the grid period containing now_us, on the plan
        version in effect at its start (billing-rules 5.4)."""
        self._archive_period(now_us, fx)
        key, start, end = self._grid_period(self.plan.period, now_us)
        self.plan = plan_for_period(self.plan, start)
        self._begin_period(key, start, end)

    def reset_period(self, anchor_us: int, end_us: int | None, now_us: int, fx: Effects) -> None:
        """Stripe's subscription period [anchor_us, end_us) (billing-rules 5.6).

        The first one aligns the running period's end with it. A later one whose start moved
        past the start of the running period begins a new period now, quota reset, the old one
        archived. If the running period already began at or after it (it rolled over at the
        renewal), only its end is aligned. The same or an older anchor changes nothing.
        """
        self.advance(now_us, fx)
        if anchor_us <= self.period_anchor_us:  # pragma: no mutate (< alike: the same report again changes nothing)
            return
        first = self.period_anchor_us == 0
        self.period_anchor_us = anchor_us
        if end_us is not None and end_us > anchor_us:
            self.period_cycle_start_us, self.period_cycle_us = anchor_us, end_us - anchor_us
        reset = not first and anchor_us > self.period_start_us
        if reset:
            self._archive_period(now_us, fx)
            if end_us is not None and end_us > now_us:
                end = end_us
            else:
                end = self._grid_period(self.plan.period, now_us)[2]
            self._begin_period("sub-" + us_to_rfc3339(now_us)[:10], now_us, end)
            self._resume_if_funded("period", now_us, fx)
        elif end_us is not None and end_us > now_us:
            self.period_end_us = end_us

    def set_plan(self, plan: Plan, now_us: int, fx: Effects) -> None:
        """A plan change never cuts the period (billing-rules 5.5): the running one goes on, on
        the new plan. On the calendar, a new period kind moves its end (and key) to that of
        the new kind's calendar period containing now."""
        self.advance(now_us, fx)
        self._switch_plan(plan, now_us, fx)

    def _switch_plan(self, plan: Plan, now_us: int, fx: Effects) -> None:
        if plan.period != self.plan.period and not self.period_cycle_us:
            key, _, end = period_bounds(plan.period, now_us)
            self.period_key, self.period_end_us = sys.intern(key), end
        self.plan = plan
        self._halt_if_out_of_money(now_us, fx)
        self._resume_if_funded("plan", now_us, fx)

    # ----- dunning ----------------------------------------------------------------------

    def invoice_failed(self, since_us: int, suspend_after_s: int, degrade_after_s: int,
                       downgrade_after_s: int, free_plan: Plan, now_us: int, fx: Effects,
                       invoice_id: str | None = None, subscription_id: str | None = None) -> None:
        """An invoice payment failed at `since_us`: the past-due clock starts (once). An invoice
        named is followed by itself (billing-rules 8.1): its failure counts unless that very
        invoice was settled, whatever other invoices did since."""
        self.advance(now_us, fx)
        if invoice_id is not None:
            if invoice_id in (self.settled_invoices or ()):
                return  # it was paid or voided already: this failure is old news
            if subscription_id is not None and any(
                    r.subscription_id == subscription_id and r.status in ENDED for r in self.subscriptions or ()):
                return  # its subscription ended: Stripe collects no more for it (rule 8.4)
        elif since_us < self.invoice_as_of_us:
            return  # older than the last invoice news: a payment since then wins
        self.invoice_as_of_us = max(self.invoice_as_of_us, since_us)
        if self.dunning is None:
            self.past_due_since_us = since_us
            self.dunning = Dunning(since_us, suspend_after_s, degrade_after_s, downgrade_after_s, free_plan)
            self._dunning_steps(now_us, fx)
        if invoice_id is not None and invoice_id not in (self.dunning.invoice_ids or ()):
            self.dunning.invoice_ids = (self.dunning.invoice_ids or []) + [invoice_id]
            if subscription_id is not None:
                self.dunning.invoice_subscriptions = {**(self.dunning.invoice_subscriptions or {}),
                                                      invoice_id: subscription_id}

    def invoice_paid(self, as_of_us: int, now_us: int, fx: Effects, invoice_id: str | None = None,
                     amount_paid: int | None = None, settled_by: str = "paid") -> None:
        """An invoice was settled: paid, or voided, marked uncollectible or credited in full
        (billing-rules 8.3). Once every invoice that failed is settled, everything dunning did
        is undone at once. Only a payment of money proves the org pays its invoices."""
        self.advance(now_us, fx)
        paid = settled_by == "paid" and amount_paid != 0  # a zero invoice (a trial) proves nothing
        dunning = self.dunning
        if invoice_id is not None:
            if invoice_id not in (self.settled_invoices or ()):
                self.settled_invoices = ((self.settled_invoices or []) + [invoice_id])[-MAX_SETTLED_INVOICES:]
            if paid:
                self.paid_invoice, self.invoice_as_of_us = True, max(self.invoice_as_of_us, as_of_us)
            if dunning is None:
                return
            unpaid = dunning.invoice_ids
            if unpaid is not None:
                self._drop_unpaid(dunning, {invoice_id})
                if dunning.invoice_ids:
                    return  # a failed invoice is still open
            elif not paid:
                return  # dunning of an invoice without an id ends only with a payment
        elif not paid:
            return
        elif as_of_us < self.invoice_as_of_us:
            return  # an older payment: the failure since then stands
        else:
            self.invoice_as_of_us = as_of_us
            self.paid_invoice = True
            if dunning is None:
                return
        self._end_dunning(dunning, now_us, fx)

    def _subscription_ended(self, subscription_id: str, now_us: int, fx: Effects) -> None:
        """Rule 8.4: the failed invoices of a subscription that ended are no longer waited for."""
        dunning = self.dunning
        if dunning is None or not dunning.invoice_ids:
            return
        ended = {i for i, s in (dunning.invoice_subscriptions or {}).items() if s == subscription_id}
        if not ended & set(dunning.invoice_ids):
            return
        self._drop_unpaid(dunning, ended)
        if not dunning.invoice_ids:
            self._end_dunning(dunning, now_us, fx)

    @staticmethod
    def _drop_unpaid(dunning: Dunning, invoice_ids: set[str]) -> None:
        dunning.invoice_ids = [i for i in dunning.invoice_ids if i not in invoice_ids] or None
        kept = {i: s for i, s in (dunning.invoice_subscriptions or {}).items() if i not in invoice_ids}
        dunning.invoice_subscriptions = kept or None

    def _end_dunning(self, dunning: Dunning, now_us: int, fx: Effects) -> None:
        was_suspended = self.suspended
        self.dunning, self.past_due_since_us, self.suspended = None, None, False
        if dunning.prior_plan is not None:
            self._switch_plan(dunning.prior_plan, now_us, fx)
        fx.events.append(Event("org.unsuspended", self.org_id, now_us, {
            "was_suspended": was_suspended, "step": dunning.step,
            "past_due_since": us_to_rfc3339(dunning.since_us)}))

    def _dunning_steps(self, now_us: int, fx: Effects) -> None:
        dunning = self.dunning
        elapsed = now_us - dunning.since_us
        if dunning.step < DunningStep.SUSPENDED and elapsed >= dunning.suspend_after_s * US_PER_S:
            dunning.step = DunningStep.SUSPENDED
            if not self.paid_invoice:
                self.suspended = True
                fx.events.append(Event("org.suspended", self.org_id, now_us, {
                    "reason": "past_due", "past_due_since": us_to_rfc3339(dunning.since_us),
                    "lease_ids": sorted(self.leases or ())}))
        if dunning.step < DunningStep.DEGRADED and elapsed >= dunning.degrade_after_s * US_PER_S:  # pragma: no mutate
            dunning.step = DunningStep.DEGRADED
        if dunning.step < DunningStep.DOWNGRADED and elapsed >= dunning.downgrade_after_s * US_PER_S:
            dunning.step = DunningStep.DOWNGRADED
            if self.plan.id != dunning.free_plan.id:
                dunning.prior_plan = self.plan
                self._switch_plan(dunning.free_plan, now_us, fx)
