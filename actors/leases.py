"""Leases and limits of an org: concurrency leases, their expiry, the caps they are held to.

A lease is what the gate's concurrency cap counts (invariant 3). A lower cap never ends a
running lease; it only stops new ones.
"""

from __future__ import annotations

import sys

import msgspec

from actors.effects import Effects, Event
from metergate_client.decision import Decision, Resources
from actors.refusals import BillingError, LeaseConflict, LeaseEnded, UnknownLease
from actors.timeutil import US_PER_S, us_to_rfc3339

MAX_LEASES_PER_ORG = 10_000
MAX_TTL_S = 86_400
ENDED_LEASE_MEMORY_S = 3_600  # a lease id that ended cannot be taken again for this long
MAX_ENDED_LEASES = 1_000


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


def same_resources(lease: Lease, resources: Resources) -> bool:
    return (lease.quantity, lease.region, lease.machine_type, lease.memory_mb,
            lease.cpu_count, lease.disk_mb) == (
            resources.quantity, resources.region, resources.machine_type,
            resources.memory_mb, resources.cpu_count, resources.disk_mb)


class Leases:
    """OrgBillingActor's leases and limits: leases, ended_leases, tier, max_concurrent,
    max_disk_mb, machine_quotas, tier_as_of_us."""

    __slots__ = ()

    # ----- reads ------------------------------------------------------------------------

    def active_leases_at(self, now_us: int) -> int:
        return sum(l.quantity for l in self.leases.values() if l.expires_at_us > now_us) if self.leases else 0

    def machines_in_use_at(self, now_us: int) -> dict[str, dict[str, int]]:
        """Active lease quantities by region and machine type (what machine quotas limit)."""
        in_use: dict[str, dict[str, int]] = {}
        for lease in (self.leases or {}).values():
            if lease.expires_at_us > now_us and lease.region is not None and lease.machine_type is not None:
                by_type = in_use.setdefault(lease.region, {})
                by_type[lease.machine_type] = by_type.get(lease.machine_type, 0) + lease.quantity
        return in_use

    # ----- leases -----------------------------------------------------------------------

    def acquire_lease(self, lease_id: str, resources: Resources, ttl_s: int, now_us: int,
                      fx: Effects) -> tuple[Decision | None, Lease | None, bool]:
        """(deny, None, False) | (None, lease, created) | (shadowed, lease, True): a shadow org's
        lease (billing-rules 2.12) comes with the decision it was let through by, whose
        would_allow/would_reason say what an enforced org would get. The same lease_id returns
        the lease."""
        assert 0 < ttl_s <= MAX_TTL_S, ttl_s
        assert resources.quantity >= 1, resources
        self.advance(now_us, fx)
        existing = self.leases.get(lease_id) if self.leases else None
        if existing is not None:
            if not same_resources(existing, resources):
                raise LeaseConflict(f"lease {lease_id} exists with other resources")
            return None, existing, False
        if self.ended_leases and lease_id in self.ended_leases:
            # A late retry of a take whose lease was already released (or expired): a new lease
            # would hold a slot nobody releases (billing-rules 7.5).
            ended = us_to_rfc3339(self.ended_leases[lease_id])
            raise LeaseEnded(f"lease {lease_id} ended at {ended}; an id is not taken again for an hour after it ends")
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
        assert self.active_leases_at(now_us) <= self.max_concurrent or decision.would_allow is not None, \
            "lease cap exceeded"  # (a shadow org's leases are not capped: billing-rules 2.12)
        return (decision if decision.would_allow is not None else None), lease, True

    def renew_lease(self, lease_id: str, now_us: int, fx: Effects) -> Lease:
        self.advance(now_us, fx)
        lease = self.leases.get(lease_id) if self.leases else None
        if lease is None:
            raise UnknownLease(f"lease {lease_id} is not active")
        lease.expires_at_us = max(lease.expires_at_us, now_us + lease.ttl_s * US_PER_S)
        return lease

    def release_lease(self, lease_id: str, now_us: int, fx: Effects) -> bool:
        """Release; releasing a lease that is already gone is not an error (a retried DELETE).
        The id counts as ended either way: a take that arrives after its release is refused."""
        self.advance(now_us, fx)
        self._lease_ended(lease_id, now_us)
        if self.leases and self.leases.pop(lease_id, None) is not None:
            if not self.leases:
                self.leases = None
            return True
        return False

    def _lease_ended(self, lease_id: str, now_us: int) -> None:
        ended = self.ended_leases if self.ended_leases is not None else {}
        ended.pop(lease_id, None)  # kept in the order they ended
        ended[lease_id] = now_us
        while len(ended) > MAX_ENDED_LEASES:
            del ended[next(iter(ended))]
        self.ended_leases = ended

    def _forget_ended_leases(self, now_us: int) -> None:
        ended = self.ended_leases
        while ended and now_us - next(iter(ended.values())) > ENDED_LEASE_MEMORY_S * US_PER_S:
            del ended[next(iter(ended))]
        if not ended:
            self.ended_leases = None

    def _expire_leases(self, now_us: int, fx: Effects) -> None:
        assert self.leases is not None
        for lease in [l for l in self.leases.values() if l.expires_at_us <= now_us]:
            del self.leases[lease.lease_id]
            self._lease_ended(lease.lease_id, now_us)
            fx.events.append(Event("lease.expired", self.org_id, now_us, {
                "lease_id": lease.lease_id, "expired_at": us_to_rfc3339(lease.expires_at_us)}))
        if not self.leases:
            self.leases = None

    # ----- limits -----------------------------------------------------------------------

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

    def set_limits(self, max_disk_mb: int | None, machine_quotas: dict[str, dict[str, int]] | None,
                   now_us: int, fx: Effects) -> None:
        self.advance(now_us, fx)
        if max_disk_mb is not None:
            self.max_disk_mb = max_disk_mb
        if machine_quotas is not None:
            self.machine_quotas = machine_quotas or None
