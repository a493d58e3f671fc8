"""Auto-recharge of an org: when a charge is asked for, and how its outcome is settled.

The core only asks (a ChargeRequest in the effects); the shard makes the charge after the
commit and sends the outcome back as a command, so replay never talks to Stripe.
"""

from __future__ import annotations

import msgspec

from actors.effects import Effects, Event
from actors.money import LedgerEntry
from actors.runway import HOUR_S
from actors.timeutil import US_PER_S

MICROS_PER_CENT = 10_000  # card charges are whole cents
MAX_CHARGE_MICROS = 10**10  # one auto-recharge charge: at most 10,000 USD (Stripe's cap is 999,999.99)
US_PER_DAY = 86_400 * US_PER_S
# Why auto-recharge is paused (besides "disputed", rule 3.6): a charge that failed (9.4), or one that
# failed because the org had no Stripe customer to charge, which linking the customer lifts (2.11).
PAYMENT_FAILED, NO_STRIPE_CUSTOMER = "payment_failed", "no_stripe_customer"


class ChargeRequest(msgspec.Struct, frozen=True):
    """An auto-recharge charge the org asked for; the shard makes it after the commit."""

    org_id: str
    charge_id: str
    amount_micros: int
    idempotency_key: str
    requested_us: int = 0


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
    threshold_runway_s: int = 0  # also charge when the runway (billing-rules 2.10) is under this; 0: off


class Recharge:
    """OrgBillingActor's auto-recharge: recharge, has_payment_method."""

    __slots__ = ()

    def set_payment_method(self, present: bool, now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        self.has_payment_method = present
        if present and self.recharge is not None:
            if self.recharge.paused in (PAYMENT_FAILED, NO_STRIPE_CUSTOMER):
                self.recharge.paused = None  # a new card: auto-recharge may try again
            self._maybe_recharge(now_us, fx)

    def configure_recharge(self, enabled: bool, threshold_micros: int, amount_micros: int,
                           max_per_day: int, cooldown_s: int, now_us: int, fx: Effects,
                           lift_dispute: bool = False, threshold_runway_s: int = 0) -> None:
        """Turn auto-recharge on or off. Turning it on with the balance already under the
        threshold makes the first (arming) charge at once; a charge in flight still settles.
        Turning it on lifts a pause, but a `disputed` one only when `lift_dispute` (an admin)."""
        self.advance(now_us, fx)
        current = self.recharge
        if not enabled:
            if current is not None:
                current.enabled = False
            return
        assert threshold_micros >= 0 and amount_micros > 0 and amount_micros % MICROS_PER_CENT == 0
        assert max_per_day >= 1 and cooldown_s >= 0 and threshold_runway_s >= 0
        if current is None:
            self.recharge = current = AutoRecharge(True, threshold_micros, amount_micros, max_per_day, cooldown_s)
        else:
            current.enabled, current.threshold_micros, current.amount_micros = True, threshold_micros, amount_micros
            current.max_per_day, current.cooldown_s = max_per_day, cooldown_s
            if current.paused != "disputed" or lift_dispute:  # a dispute's pause is the operator's to lift
                current.paused = None
        current.threshold_runway_s = threshold_runway_s
        self._maybe_recharge(now_us, fx)

    def recharge_amount(self, balance: int, now_us: int) -> int:
        """The configured amount, or more when that would not bring the balance above the
        threshold, or (with a runway threshold and something running) the runway up to its
        threshold, in one charge; whole cents (billing-rules 9.2)."""
        r = self.recharge
        short = r.threshold_micros - balance + 1
        burn = self.burn_at(now_us) if r.threshold_runway_s and self.prepaid else 0
        if burn:  # runway >= T  <=>  funds x 3,600 >= T x burn
            funds = balance + self.quota_remaining_at(now_us)
            short = max(short, -(-r.threshold_runway_s * burn // HOUR_S) - funds)
        needed = -(-short // MICROS_PER_CENT) * MICROS_PER_CENT
        return min(max(r.amount_micros, needed), MAX_CHARGE_MICROS)

    def _maybe_recharge(self, now_us: int, fx: Effects) -> None:
        r = self.recharge
        if r.pending_id is not None:
            self._grow_unsent_charge(now_us, fx)
            return
        if not r.enabled or r.paused is not None or not self.has_payment_method or self.in_shadow(now_us):
            return  # (a shadow org asks for no charge: billing-rules 2.12)
        balance = self.balance_micros
        if not self._short_of_money(now_us):
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
        r.pending_micros = self.recharge_amount(balance, now_us)
        r.pending_since_us = now_us
        fx.charges.append(self.pending_charge())

    def _short_of_money(self, now_us: int) -> bool:
        """Billing-rules 9.2: the balance is under the threshold, or the runway under its own."""
        r = self.recharge
        if self.balance_micros < r.threshold_micros:
            return True
        if not r.threshold_runway_s:
            return False
        left = self.runway_at(now_us)
        return left is not None and left < r.threshold_runway_s

    def _grow_unsent_charge(self, now_us: int, fx: Effects) -> None:
        """A charge asked for at this same instant (earlier in this command, or in this
        batch) has not gone out yet: charges start after their commit. If money was taken
        since (a refund after time passed), it asks for enough to bring the balance back
        above the threshold, as a charge asked for now would. Decided by the state, `now_us`
        and this commit's effects: a journal row is one commit's commands, and its replay
        collects their effects alike (commands.replay), so replaying does the same."""
        r = self.recharge
        if r.pending_since_us != now_us or not any(
                c.org_id == self.org_id and c.charge_id == r.pending_id for c in fx.charges):
            return  # from an earlier instant, or sent already (an earlier commit at this instant)
        r.pending_micros = max(r.pending_micros, self.recharge_amount(self.balance_micros, now_us))
        charge = self.pending_charge()
        fx.charges[:] = [charge if c.org_id == self.org_id and c.charge_id == charge.charge_id else c
                         for c in fx.charges]

    def _recharge_retry_us(self) -> int | None:
        """When a charge held back by the cooldown or the daily cap may go out, if one is wanted."""
        r = self.recharge
        if (r is None or not r.enabled or r.pending_id is not None or r.paused is not None
                or not self.has_payment_method or self.balance_micros >= r.threshold_micros):
            return None  # (by the balance: a charge for the runway waits for the next check, 9.3)
        at = r.last_us + r.cooldown_s * US_PER_S if r.last_us else 0
        if r.day_count >= r.max_per_day:
            at = max(at, (r.day + 1) * US_PER_DAY)
        return at or None

    def pending_charge(self) -> ChargeRequest | None:
        """The charge in flight, as the charger makes it; the same key every time it is asked."""
        r = self.recharge
        if r is None or r.pending_id is None:
            return None
        # With the instant it was asked for: a restore rewinds the org's charge count k, and
        # Stripe forgets a key after 24 h, so `ar_k` alone would come round again as a new charge.
        key = f"metergate:{self.org_id}:{self.created_us}:auto_recharge:{r.pending_id}:{r.pending_since_us}"
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
            # Advanced already: credited at once, so no check runs on the balance before this
            # very credit (it would ask for another charge as if this one had not paid).
            entry = self._add_credit("auto_recharge", amount_micros, None,
                                     f"auto-recharge {charge_id} ({payment_id})", now_us, fx, payment_id)
            fx.events.append(Event("auto_recharge.succeeded", self.org_id, now_us, {
                "charge_id": charge_id, "amount_micros": amount_micros, "payment_intent_id": payment_id,
                "balance_micros": self.balance_micros}))
            return entry
        if current:  # told in any case; a dispute's pause stays the operator's to lift (rule 9.4)
            if r.paused != "disputed":
                r.paused = NO_STRIPE_CUSTOMER if reason == NO_STRIPE_CUSTOMER else PAYMENT_FAILED
            fx.events.append(Event("auto_recharge.failed", self.org_id, now_us, {
                "charge_id": charge_id, "amount_micros": amount_micros, "payment_intent_id": payment_id,
                "reason": reason or "payment_failed", "balance_micros": self.balance_micros}))
        return None
