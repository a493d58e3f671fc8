"""Enforcement per org (billing-rules 2.12): `enforce`, or `shadow` beside the biller a
platform runs today. A shadow org is metered, debited, halted and reported inside metergate
exactly as an enforced one, but every gate and lease answer allows it (the decision it would
get rides along), no charge is asked for it, and its halts and suspensions are recorded as
`*.shadow` events that no compute plane acts on. A cutover at T ends the shadow at T.
"""

from __future__ import annotations

from actors.effects import Effects, Event
from actors.refusals import BillingError, Refusal
from actors.timeutil import us_to_rfc3339

SHADOW_FOREVER_US = 2**62  # shadow with no cutover set
# What tells the compute plane to stop or start an org's machines: sent as `<type>.shadow`.
SHADOWED_EVENTS = frozenset({"org.halted", "org.resumed", "org.suspended", "org.unsuspended"})
MODES = ("shadow", "enforce")


class CutoverCharged(BillingError):
    code = Refusal.CUTOVER_CHARGED


class Enforcement:
    """OrgBillingActor's enforcement: shadow until a cutover, or enforced."""

    __slots__ = ()

    def enforcement(self, now_us: int) -> str:
        return "shadow" if self.in_shadow(now_us) else "enforce"

    def set_enforcement(self, mode: str, at_us: int | None, undo: bool, now_us: int, fx: Effects) -> bool:
        """Billing-rules 2.12: whether it changed anything. `shadow`: shadow from now on, no
        cutover set (`undo`: only of a cutover, while no charge was asked at or after it nor is
        one in flight). `enforce`: a shadow org is enforced from `at_us` (None: now), an
        instant that may be past; an enforced org stays as it is."""
        assert mode in MODES, mode
        start = len(fx.events)
        self.advance(now_us, fx)
        self.shadow_events(fx, start)  # what time brought before the switch, as it was then
        if mode == "shadow":
            if self.shadow_until_us == SHADOW_FOREVER_US:
                return False
            if undo:
                self._check_undo()
            if not self.in_shadow(now_us):  # the compute plane stopped it: in shadow it runs
                self._tell_shadow(now_us, fx)
            self.shadow_until_us, self.cutover_told = SHADOW_FOREVER_US, False
            return True
        if not self.in_shadow(now_us):
            return False
        until = now_us if at_us is None else at_us
        if until == self.shadow_until_us:
            return False
        self.shadow_until_us, self.cutover_told = until, False  # kept once past: what an undo is checked against
        if until <= now_us:  # enforced now: the compute plane is told, a low balance may charge
            self.tell_cutover(now_us, fx)
            if self.recharge is not None:
                self._maybe_recharge(now_us, fx)
        return True

    def _tell_shadow(self, now_us: int, fx: Effects) -> None:
        """An enforced org goes into shadow (billing-rules 2.12): if it is halted or suspended, the
        compute plane, which stopped it and hears no more from it until a cutover, is told it
        runs: `org.resumed` (reason `shadow`), `org.unsuspended`."""
        if self.halted is not None:
            fx.events.append(Event("org.resumed", self.org_id, now_us,
                                   {"reason": "shadow", "balance_micros": self.balance_micros}))
        if self.suspended and self.dunning is not None:
            fx.events.append(Event("org.unsuspended", self.org_id, now_us, {
                "was_suspended": True, "step": self.dunning.step,
                "past_due_since": us_to_rfc3339(self.dunning.since_us)}))

    def tell_cutover(self, now_us: int, fx: Effects) -> None:
        """Once a cutover has passed (at the first advance at or after it, or at once): the compute
        plane, which had only shadow events, is told that the org is halted or suspended, if it is
        (billing-rules 2.12)."""
        until = self.shadow_until_us
        if until is None or until == SHADOW_FOREVER_US or until > now_us or self.cutover_told:
            return
        self.cutover_told = True
        if self.halted is not None:
            fx.events.append(Event("org.halted", self.org_id, now_us, {
                "reason": self.halted, "lease_ids": sorted(self.leases or ()), "balance_micros": self.balance_micros}))
        if self.suspended and self.dunning is not None:
            fx.events.append(Event("org.suspended", self.org_id, now_us, {
                "reason": "past_due", "past_due_since": us_to_rfc3339(self.dunning.since_us),
                "lease_ids": sorted(self.leases or ())}))

    def _check_undo(self) -> None:
        cutover = self.shadow_until_us
        if cutover is None:
            raise BillingError("this org was never cut over from shadow: there is nothing to undo")
        r = self.recharge
        if r is not None and (r.pending_id is not None or r.last_us >= cutover):
            raise CutoverCharged("a charge was asked for this org since its cutover: it cannot go back to shadow "
                                 "(refund the charge in Stripe first, then set shadow without undo)")

    def shadow_events(self, fx: Effects, start: int) -> None:
        """The org's events from fx.events[start:] that happened in shadow and would tell the
        compute plane to act are recorded as `<type>.shadow` instead."""
        if self.shadow_until_us is None:
            return
        for event in fx.events[start:]:
            if event.org_id == self.org_id and event.type in SHADOWED_EVENTS and self.in_shadow(event.at_us):
                event.type = f"{event.type}.shadow"
