"""Stripe subscriptions of an org, by id: the tier is the highest one a live subscription
pays for, and only that subscription's period is the org's quota period (billing-rules 7.6).

A customer may hold several subscriptions (a tier change that opened a second one, a
portal switch): each is tracked on its own, in the order Stripe decided its changes, so a
late event of one never undoes a newer one, and ending one subscription leaves the others.
"""

from __future__ import annotations

import sys

import msgspec

from actors.effects import Effects

# The statuses in which a subscription pays for its tier (past_due: still its tier, dunning
# runs on its invoice). incomplete, incomplete_expired, paused, canceled, unpaid do not.
GRANTING = frozenset({"active", "trialing", "past_due"})
ENDED = frozenset({"canceled", "incomplete_expired"})  # final: Stripe never changes such a subscription again
MAX_SUBSCRIPTIONS_KEPT = 20  # past that, ones that pay for nothing and have not ended are forgotten first


class SubscriptionRecord(msgspec.Struct, array_like=True):
    subscription_id: str
    status: str
    tier: str | None
    max_concurrent: int
    as_of_us: int
    anchor_us: int | None = None
    end_us: int | None = None

    @property
    def grants_tier(self) -> bool:
        return self.status in GRANTING and self.tier is not None


def _kept(records: list[SubscriptionRecord]) -> list[SubscriptionRecord]:
    """Past MAX_SUBSCRIPTIONS_KEPT, forget (never the last one, just reported) the first that pays
    for no tier and has not ended, else the first that pays for none, else the first."""
    while len(records) > MAX_SUBSCRIPTIONS_KEPT:
        others = records[:-1]
        forgotten = next((r for r in others if not r.grants_tier and r.status not in ENDED), None) or \
            next((r for r in others if not r.grants_tier), others[0])
        records.remove(forgotten)
    return records


class Subscriptions:
    """OrgBillingActor's Stripe subscriptions: subscriptions (and the tier they set)."""

    __slots__ = ()

    def subscription_changed(self, change, now_us: int, fx: Effects) -> bool:
        """Apply one subscription's news; False when it is stale (ignored): older than what it
        said last, an `incomplete` at the same second as a later status, or news of one that ended."""
        self.advance(now_us, fx)
        records = self.subscriptions or []
        record = next((r for r in records if r.subscription_id == change.subscription_id), None)
        unrelated = record is None and change.tier is None  # another product's, never a tier's
        fresh = SubscriptionRecord(change.subscription_id, change.status, change.tier, change.max_concurrent,
                                   change.as_of_us, change.anchor_us, change.end_us)
        if unrelated or (record is not None and (
                change.as_of_us < record.as_of_us or record.status in ENDED or (
                    change.as_of_us == record.as_of_us and change.status == "incomplete" != record.status))):
            # Stale news, or news of another product. Its end still ends the wait for its failed
            # invoices, and another product's end is remembered: a failure of its invoice
            # delivered later then starts nothing (rule 8.1). The tier is left alone.
            if change.status in ENDED:
                if unrelated:
                    self.subscriptions = _kept(records + [fresh])
                self._subscription_ended(change.subscription_id, now_us, fx)
            return False
        self.subscriptions = _kept([r for r in records if r is not record] + [fresh])
        ruling = self._ruling_subscription()
        if ruling is None:
            self.tier, self.max_concurrent = sys.intern(change.base_tier), change.base_max_concurrent
        else:
            self.tier, self.max_concurrent = sys.intern(ruling.tier), ruling.max_concurrent
            if ruling is fresh and fresh.anchor_us is not None:
                self.reset_period(fresh.anchor_us, fresh.end_us, now_us, fx)
        self.tier_as_of_us = max(self.tier_as_of_us, change.as_of_us)
        if fresh.status in ENDED:
            self._subscription_ended(fresh.subscription_id, now_us, fx)
        return True

    def _ruling_subscription(self) -> SubscriptionRecord | None:
        """The live subscription of the highest tier (the newest of equals)."""
        live = [r for r in self.subscriptions or () if r.grants_tier]
        return max(live, key=lambda r: (r.max_concurrent, r.as_of_us)) if live else None
