"""Refunds and disputes of Stripe payments: each acts only on what its payment bought
(billing-rules 3).

A credit paid through Stripe remembers its payment on its grant. A refund of that payment
takes at most what remains of that grant, once per refund id, and never any other credit:
a refund of a subscription invoice bought no credit and claws back nothing, and a pack that
lapsed unused leaves nothing to take. A refund that arrives before its payment's credit (a
webhook retried late) waits for it for a while. A refund that fails or is canceled gives
back what it took. A dispute is the customer's bank taking the money back: its withdrawal
takes what the payment bought even if it was spent (as debt), its reinstatement gives it back.
"""

from __future__ import annotations

import msgspec

from actors.effects import Effects
from actors.money import Grant, LedgerEntry, clawback_order, credit_share, credit_share_after
from actors.recharge import AutoRecharge
from actors.timeutil import US_PER_S

REFUND_MEMORY_S = 180 * 86_400  # a refund id is applied once for this long
REFUND_WAIT_S = 30 * 86_400  # a refund of a payment not credited yet waits this long for it
MAX_REFUNDS_KEPT = 1_000
MAX_REFUNDS_WAITING = 100
DISPUTE_MEMORY_S = 400 * 86_400  # a dispute can be reinstated months after its withdrawal
MAX_DISPUTES_KEPT = 1_000
MAX_LAPSED_KEPT = 1_000  # payments whose credit lapsed (in part) unused, the latest first kept
MAX_PAID_KEPT = 1_000  # payments whose credit and total the org remembers (billing-rules 3.0)


class RefundRecord(msgspec.Struct, array_like=True):
    refund_id: str
    payment_id: str
    amount_micros: int  # what Stripe refunded, whatever was clawed back
    at_us: int
    waiting: bool  # no credit of its payment was live yet: a credit within REFUND_WAIT_S meets it
    key: str | None = None  # its idempotency key: stamped on the clawback if it is made later
    taken_micros: int = 0  # what it clawed back: a failed refund gives this back
    grant_kind: str | None = None  # the kind and expiry of the grant it took from, for the give-back
    grant_expires_us: int | None = None
    reversed: bool = False  # failed or canceled (possibly before it was seen): it takes nothing more
    share_micros: int = 0  # its share (billing-rules 3.0), set when it took credit; 0: before it was kept


class DisputeRecord(msgspec.Struct, array_like=True):
    dispute_id: str
    payment_id: str
    at_us: int
    taken_micros: int = 0  # what its withdrawal took: a reinstatement gives this back
    grant_kind: str = "topup"
    withdrawn: bool = False
    reinstated: bool = False  # (possibly before the withdrawal was seen: then neither moves money)
    grant_expires_us: int | None = None
    waiting: bool = False  # withdrawn before its payment's credit was known: that credit meets it
    amount_micros: int = 0  # what the dispute withdrew (D), for a waiting one
    key: str | None = None  # its withdrawal's idempotency key: stamped on its entry if made later


class Refunds:
    """OrgBillingActor's refunds and disputes of Stripe payments: refunds, disputes."""

    __slots__ = ()

    def refund_payment(self, refund_id: str, payment_id: str, amount_micros: int, note: str | None,
                       now_us: int, fx: Effects, key: str | None = None, grant_id: str | None = None,
                       credited_micros: int = 0, paid_micros: int | None = None) -> tuple[LedgerEntry | None, bool]:
        """(the clawback's ledger entry, or None when nothing was taken; whether the refund
        was applied before). `amount_micros` is money paid; it takes its share of the credit
        (billing-rules 3.0: `credited_micros` of `paid_micros`, as the credit's ledger entry
        keeps them). `grant_id`: the grant the payment's ledger entry names, for a credit made
        before grants recorded their payment."""
        assert amount_micros > 0, amount_micros
        self.advance(now_us, fx)
        if any(r.refund_id == refund_id for r in self.refunds or ()):
            return None, True
        grants = self._grants_of_payment(payment_id, grant_id)
        record = RefundRecord(refund_id, payment_id, amount_micros, now_us, not grants, key)
        self._remember_refund(record)
        if not grants:
            return None, False
        credited_micros, paid_micros = self._paid_of(payment_id, credited_micros, paid_micros)
        share = credit_share_after(*self._refunded(payment_id), amount_micros, credited_micros, paid_micros)
        entry = self._claw_back(grants, share, note, now_us, fx, record=record)
        if entry is not None:
            self._halt_if_out_of_money(now_us, fx)
            if self.recharge is not None:
                self._maybe_recharge(now_us, fx)
        return entry, False

    def _refunded(self, payment_id: str) -> tuple[int, int]:
        """Billing-rules 3.0: (S, what their shares came to) of the payment's remembered refunds
        that took credit and were not reversed (so their shares round down once, together)."""
        s = shares = 0
        for r in self.refunds or ():
            if r.payment_id == payment_id and r.taken_micros > 0 and not r.reversed:
                s += r.amount_micros
                shares += r.share_micros or r.taken_micros
        return s, shares

    def _grants_of_payment(self, payment_id: str, grant_id: str | None = None) -> list[Grant]:
        """The live grants the payment bought, in the order the org holds them: its credit's,
        and any that gave back what a failed refund or a reinstated dispute took from it."""
        grants = [g for g in self.grants or () if g.payment_id == payment_id]
        if not grants:  # written before grants carried their payment
            grants = [g for g in self.grants or () if g.grant_id == grant_id and g.payment_id is None]
        return grants

    def _take_from(self, grants: list[Grant], amount_micros: int) -> int:
        """Take up to amount_micros from these grants in order (each removed at 0): what was taken."""
        taken = 0
        for grant in grants:
            part = min(amount_micros - taken, grant.remaining_micros)
            grant.remaining_micros -= part
            taken += part
        if taken:
            self.grants = [g for g in self.grants if g.remaining_micros > 0] or None
        return taken

    def _claw_back(self, grants: list[Grant], amount_micros: int, note: str | None, now_us: int,
                   fx: Effects, key: str | None = None, record: RefundRecord | None = None) -> LedgerEntry | None:
        first = grants[0]
        taken = self._take_from(grants, amount_micros)
        if taken == 0:
            return None
        if record is not None:
            record.taken_micros, record.grant_kind, record.grant_expires_us = taken, first.kind, first.expires_at_us
            record.share_micros = amount_micros
        entry = LedgerEntry("refund", -taken, now_us, first.grant_id, None, note, idempotency_key=key)
        fx.ledger.append((self.org_id, entry))
        return entry

    def _apply_waiting_refunds(self, grant: Grant, credited_micros: int, paid_micros: int | None, now_us: int,
                               fx: Effects) -> None:
        """A credit of a payment whose refunds came first is reduced by them at once, each by its
        share of that credit (billing-rules 3.0, 3.3)."""
        for record in self.refunds or ():
            if record.waiting and record.payment_id == grant.payment_id:
                record.waiting = False
                if grant.remaining_micros:
                    # Keyed as the refund's own request would have been: Stripe lists a refund
                    # again in later events, and that must replay, never take it twice.
                    share = credit_share_after(*self._refunded(record.payment_id), record.amount_micros,
                                               credited_micros, paid_micros)
                    self._claw_back([grant], share, f"Stripe refund {record.refund_id}", now_us, fx, record.key, record)

    def reverse_refund(self, refund_id: str, payment_id: str, now_us: int, fx: Effects,
                       key: str | None = None) -> LedgerEntry | None:
        """A refund that failed or was canceled (billing-rules 3.5): what it took comes back, once."""
        self.advance(now_us, fx)
        record = next((r for r in self.refunds or () if r.refund_id == refund_id), None)
        if record is None:  # its failure came first: the refund, when it comes, takes nothing
            self._remember_refund(RefundRecord(refund_id, payment_id, 0, now_us, False, key, reversed=True))
            return None
        if record.reversed:
            return None
        record.reversed, record.waiting = True, False
        if record.taken_micros == 0:
            return None
        return self._add_credit(record.grant_kind, record.taken_micros, record.grant_expires_us,
                                f"Stripe refund {refund_id} failed", now_us, fx, payment_id,
                                entry_kind="refund_reversal")

    def dispute_funds(self, command, now_us: int, fx: Effects) -> tuple[LedgerEntry | None, bool]:
        """A dispute's withdrawal or reinstatement (billing-rules 3.6): (its ledger entry, or None
        when it moved no money; whether this half of the dispute was applied before)."""
        self.advance(now_us, fx)
        record = next((d for d in self.disputes or () if d.dispute_id == command.dispute_id), None)
        if record is None:
            record = DisputeRecord(command.dispute_id, command.payment_id, now_us)
            self.disputes = ((self.disputes or []) + [record])[-MAX_DISPUTES_KEPT:]
        if not command.withdrawn:
            if record.reinstated:
                return None, True
            record.reinstated, record.waiting = True, False
            if record.taken_micros == 0:
                return None, False
            return self._add_credit(record.grant_kind, record.taken_micros, record.grant_expires_us, command.note,
                                    now_us, fx, command.payment_id, entry_kind="dispute_reversal"), False
        if record.withdrawn or record.reinstated:
            return None, record.withdrawn
        record.withdrawn = True
        # Never charge again, unasked, a card its owner disputes (an operator lifts this).
        if self.recharge is None:
            self.recharge = AutoRecharge(False, 0, 0, 1, 0)
        self.recharge.paused = "disputed"
        credited, paid = self._paid_of(command.payment_id, command.credited_micros, command.paid_micros)
        if credited == 0:
            # No credit of the payment is known (yet): the credit, if it comes, meets the dispute.
            record.waiting, record.amount_micros, record.key = True, command.amount_micros, command.idempotency_key
            return None, False
        lapsed = max(command.lapsed_micros, (self.lapsed or {}).get(command.payment_id, 0))
        disputed = credit_share(command.amount_micros, credited, paid)
        entry = self._withdraw(record, command.payment_id, disputed, credited - lapsed,
                               command.grant_id, command.note, now_us, fx)
        if entry is not None:
            self._halt_if_out_of_money(now_us, fx)
        return entry, False

    def _withdraw(self, record: DisputeRecord, payment_id: str, disputed: int, kept_micros: int,
                  grant_id: str | None, note: str | None, now_us: int, fx: Effects,
                  key: str | None = None) -> LedgerEntry | None:
        """Take back what the payment bought and kept (`kept_micros`: not lapsed) and no refund
        took back, at most what was disputed: spent or still held, it is owed back."""
        refunded = sum(r.taken_micros for r in self.refunds or () if r.payment_id == payment_id and not r.reversed)
        owed = max(0, min(disputed, kept_micros - refunded))
        if owed == 0:
            return None
        grants = self._grants_of_payment(payment_id, grant_id)
        first = grants[0] if grants else None
        from_grants = self._take_from(grants, owed)
        if owed > from_grants:
            self._take(owed - from_grants, clawback_order)
        record.taken_micros = owed
        if first is not None:
            record.grant_kind, record.grant_expires_us = first.kind, first.expires_at_us
        entry = LedgerEntry("dispute", -owed, now_us, first.grant_id if first is not None else None, None, note,
                            idempotency_key=key)
        fx.ledger.append((self.org_id, entry))
        return entry

    def _apply_waiting_disputes(self, payment_id: str, credited_micros: int, paid_micros: int | None, now_us: int,
                                fx: Effects) -> None:
        """A credit of a payment whose dispute came first is taken back by it at once (after the
        payment's waiting refunds); no halt check follows: the balance is not below what it was
        before the credit."""
        for record in self.disputes or ():
            if record.waiting and record.payment_id == payment_id:
                record.waiting = False
                disputed = credit_share(record.amount_micros, credited_micros, paid_micros)
                self._withdraw(record, payment_id, disputed, credited_micros, None,
                               f"Stripe dispute {record.dispute_id}", now_us, fx, record.key)

    def _remember_refund(self, record: RefundRecord) -> None:
        records = (self.refunds or []) + [record]
        waiting = [r for r in records if r.waiting]
        for stale in waiting[:max(0, len(waiting) - MAX_REFUNDS_WAITING)]:
            stale.waiting = False
        self.refunds = records[-MAX_REFUNDS_KEPT:]

    def _forget_refunds(self, now_us: int) -> None:
        kept = [r for r in self.refunds if now_us - r.at_us <= REFUND_MEMORY_S * US_PER_S]
        for record in kept:
            if record.waiting and now_us - record.at_us > REFUND_WAIT_S * US_PER_S:
                record.waiting = False
        self.refunds = kept or None

    def _paid_of(self, payment_id: str, credited_micros: int, paid_micros: int | None) -> tuple[int, int | None]:
        """A payment's credit and what was paid for it (billing-rules 3.0): as the org remembers
        them from the credit, else as the refund or dispute names them (read by the edge from
        the credit's ledger entry, which may be older than the credit the org already holds)."""
        known = (self.paid_credits or {}).get(payment_id)
        return (known[0], known[1]) if known is not None else (credited_micros, paid_micros)

    def _remember_paid(self, payment_id: str, credited_micros: int, paid_micros: int) -> None:
        paid = self.paid_credits or {}
        paid.pop(payment_id, None)
        paid[payment_id] = [credited_micros, paid_micros]
        while len(paid) > MAX_PAID_KEPT:
            del paid[next(iter(paid))]
        self.paid_credits = paid

    def _note_lapsed(self, payment_id: str, micros: int) -> None:
        """What of a payment's credit expired unused (a dispute does not take it again)."""
        lapsed = self.lapsed or {}
        lapsed[payment_id] = lapsed.pop(payment_id, 0) + micros
        while len(lapsed) > MAX_LAPSED_KEPT:
            del lapsed[next(iter(lapsed))]
        self.lapsed = lapsed

    def _forget_disputes(self, now_us: int) -> None:
        kept = [d for d in self.disputes if now_us - d.at_us <= DISPUTE_MEMORY_S * US_PER_S]
        for record in kept:
            if record.waiting and now_us - record.at_us > REFUND_WAIT_S * US_PER_S:
                record.waiting = False
        self.disputes = kept or None
