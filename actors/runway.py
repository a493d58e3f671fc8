"""Runway: how long an org's money lasts at the burn of its live leases (billing-rules 2.10).

The burn is what one hour of every live lease's resources costs at the org's plan's rates;
the runway is the money the org may still spend (balance and the period's quota left) over
that burn. Both are read from the org's state and `now` alone, so a replay decides the same.
A prepaid org whose runway falls under its alert gets one `balance.runway_low` per crossing;
auto-recharge may ask for a charge on the runway too (billing-rules 9.2).
"""

from __future__ import annotations

from actors.effects import Effects, Event
from actors.leases import Lease
from actors.metering import SCALED_PER_MICRO, LeaseUsage, cost_scaled
from config.catalog import Plan

HOUR_S = 3_600
HOUR_MS = HOUR_S * 1_000
DEFAULT_RUNWAY_ALERT_S = 3_600  # a new org's balance.runway_low alert: 60 minutes (0: off)
MAX_RUNWAY_ALERT_S = 30 * 86_400


def lease_burn_scaled(plan: Plan, lease: Lease) -> int:
    """One hour of a lease's resources (all of its `quantity`), in scaled units."""
    per_hour = lease.quantity * HOUR_MS
    return cost_scaled(plan, LeaseUsage(lease.lease_id, memory_mb_ms=lease.memory_mb * per_hour,
                                        cpu_ms=lease.cpu_count * per_hour, disk_mb_ms=lease.disk_mb * per_hour))


def burn_micros_per_hour(plan: Plan, leases) -> int:
    """µUSD an hour of these leases' resources costs, rounded up. Units are not counted (they
    are billed as they come, and no lease declares them): a lease whose cost is mostly units
    burns more than this says."""
    return -(-sum(lease_burn_scaled(plan, lease) for lease in leases) // SCALED_PER_MICRO)


def runway_s(spendable_micros: int, burn_per_hour: int) -> int | None:
    """Whole seconds the money lasts at this burn; None when nothing burns."""
    if burn_per_hour <= 0:
        return None
    return max(0, spendable_micros) * HOUR_S // burn_per_hour


class Runway:
    """OrgBillingActor's runway: runway_alert_s, runway_armed."""

    __slots__ = ()

    def live_leases(self, now_us: int) -> list[Lease]:
        return sorted((lease for lease in (self.leases or {}).values() if lease.expires_at_us > now_us),
                      key=lambda lease: lease.lease_id)

    def burn_at(self, now_us: int) -> int:
        """The burn of the org's live leases, µUSD per hour."""
        leases = self.leases
        if not leases:
            return 0
        return burn_micros_per_hour(self.plan, (lease for lease in leases.values() if lease.expires_at_us > now_us))

    def runway_at(self, now_us: int) -> int | None:
        """Billing-rules 2.10: seconds until a prepaid org's money runs out at its burn; None
        for a postpaid org (it is never halted for money) or one with nothing running."""
        if not self.prepaid:
            return None
        return runway_s(self.balance_at(now_us) + self.quota_remaining_at(now_us), self.burn_at(now_us))

    def set_runway_alert(self, alert_s: int, now_us: int, fx: Effects) -> None:
        assert 0 <= alert_s <= MAX_RUNWAY_ALERT_S, alert_s
        self.advance(now_us, fx)
        self.runway_alert_s = alert_s
        self.runway_armed = True

    def check_alerts(self, now_us: int, fx: Effects) -> None:
        """The alerts that run after every command: low balance (2.9), then runway (2.10)."""
        self.check_low_balance(now_us, fx)
        self.check_runway(now_us, fx)

    def check_runway(self, now_us: int, fx: Effects) -> None:
        """After every command (billing-rules 2.10): once per fall under the alert. Re-armed
        only by a runway at or above it (or the alert off): starting a lease while the money is
        low again is no new crossing."""
        alert = self.runway_alert_s
        if not alert:
            self.runway_armed = True
            return
        if self.runway_armed and not self.leases:
            return  # nothing runs: nothing to say, nothing to re-arm
        left = self.runway_at(now_us)
        if self.runway_armed:
            if left is not None and left < alert:
                self.runway_armed = False
                leases = self.live_leases(now_us)
                fx.events.append(Event("balance.runway_low", self.org_id, now_us, {
                    "threshold_s": alert, "runway_s": left, "burn_micros_per_hour": self.burn_at(now_us),
                    "balance_micros": self.balance_at(now_us), "lease_ids": [lease.lease_id for lease in leases]}))
        elif left is not None and left >= alert:
            self.runway_armed = True
