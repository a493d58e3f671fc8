"""metergate's metrics: every series, its tags, and the few calls that record them.

Ray exports them (ray.util.metrics) on each node's Prometheus endpoint, named `ray_` + the
name here (a counter also gets `_total`), with Ray's own tags added (WorkerId, NodeAddress,
SessionName...): a gauge of one process is told apart from another's by WorkerId.

Tags are a shard, a reason, a source, an outcome: small, fixed sets. Never an org: one series
per org would swamp Prometheus at 100k orgs, and would show whoever can scrape who the
customers are. docs/reference/metrics.md lists the series (with the HTTP requests' of
serve_app/request_metrics.py); tests/test_monitoring.py keeps it, and the alert rules and
the dashboard in deploy/monitoring/, in step with this file.

Ray registers a metric with the process that creates it, so the metric objects are made on
first use in the process that records (a shard, an ingress replica, the scheduler), never at
import: the driver that imports this module to start the service makes none. A record costs
a couple of µs; hot paths record once per commit, per batch or per request, never per tick or
per org.
"""

from __future__ import annotations

from collections import Counter as Tally
from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_MS_BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000]
ITEMS_BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000]
TICKS_BOUNDS = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000]
FEED_LAG_MS_BOUNDS = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000]


class Series:
    """Every metergate series, as this process records them (one instance: series())."""

    def __init__(self) -> None:
        # The ingress (and the billing page): each gate answer.
        self.gate_decisions = Counter(
            "metergate_gate_decisions",
            "Gate answers by reason (a refusal code when no decision was made), action, and source: "
            "local (the ingress's projection) or shard (asked the org's shard)",
            tag_keys=("reason", "action", "source"))
        self.gate_shadow_would_deny = Counter(
            "metergate_gate_shadow_would_deny",
            "Gate answers and leases of orgs in shadow (billing-rules 2.12) that were allowed but would have "
            "been denied, by the reason the rules would give (would_reason) and action (lease: a lease taken)",
            tag_keys=("reason", "action"))
        # Shards: the commit loop.
        self.ticks = Counter(
            "metergate_ticks", "Usage ticks answered by a shard after their commit, by outcome: "
            "accepted (billed), duplicate (tick id seen before), rejected (unknown org, wrong shard, unknown unit)",
            tag_keys=("shard", "outcome"))
        self.commit_items = Histogram(
            "metergate_commit_items", "Requests (commands and usage batches) per group commit",
            boundaries=ITEMS_BOUNDS, tag_keys=("shard",))
        self.commit_ticks = Histogram(
            "metergate_commit_ticks", "Usage ticks per group commit", boundaries=TICKS_BOUNDS, tag_keys=("shard",))
        self.commit_latency_ms = Histogram(
            "metergate_commit_latency_ms", "A group commit, from loading its orgs to answering its callers, in ms",
            boundaries=LATENCY_MS_BOUNDS, tag_keys=("shard",))
        self.runway_low = Counter(
            "metergate_runway_low", "balance.runway_low events committed: an org's runway fell under its alert "
            "(billing-rules 2.10)", tag_keys=("shard",))
        # Shards: what is in memory (set at housekeeping, about every second).
        self.orgs_loaded = Gauge("metergate_orgs_loaded", "Orgs in a shard's memory", tag_keys=("shard",))
        self.leases_active = Gauge(
            "metergate_leases_active", "Active leases (by quantity) of the orgs in a shard's memory, "
            "as of each org's last commit", tag_keys=("shard",))
        self.snapshot_lag_orgs = Gauge(
            "metergate_snapshot_lag_orgs", "Orgs in memory with journal entries not yet behind a snapshot",
            tag_keys=("shard",))
        self.snapshot_lag_entries = Gauge(
            "metergate_snapshot_lag_entries", "Journal entries a restart of the shard would replay "
            "(the tails of its orgs in memory)", tag_keys=("shard",))
        self.views_published = Counter(
            "metergate_views_published", "Gate views a shard published to its feed", tag_keys=("shard",))
        # The scheduler: outbound webhooks.
        self.outbox_backlog = Gauge("metergate_outbox_backlog", "Outbound webhook events waiting to be delivered")
        self.outbox_dead = Gauge("metergate_outbox_dead", "Outbound webhook events given up (dead letters)")
        self.outbox_deliveries = Counter(
            "metergate_outbox_deliveries", "Delivery attempts of outbound webhook events, by outcome: "
            "delivered, failed (retried later), dead", tag_keys=("outcome",))
        # The edge and the chargers.
        self.webhook_verification_failures = Counter(
            "metergate_webhook_verification_failures", "Inbound webhooks refused for their signature or timestamp",
            tag_keys=("source",))
        self.stripe_errors = Counter(
            "metergate_stripe_errors", "Stripe calls that failed, by caller (self_serve, auto_recharge, "
            "meter_events) and error (the stripe-python exception class)", tag_keys=("call", "error"))
        self.stripe_events = Counter(
            "metergate_stripe_events", "Verified Stripe events answered, by outcome: applied, ignored, dead_letter "
            "(an operator should look: metergate inbound list --outcome dead_letter)", tag_keys=("outcome",))
        self.feed_streams = Gauge(
            "metergate_feed_streams", "Open GET /v1/gate/feed streams of an ingress replica")
        self.usage_parity_org_hours = Gauge(
            "metergate_usage_parity_org_hours", "Org-hours the last usage parity report over every org of an "
            "ingress replica compared (GET /v1/parity/usage without org_id)")
        self.usage_parity_outside = Gauge(
            "metergate_usage_parity_outside_tolerance", "Org-hours outside the tolerance in the last usage parity "
            "report over every org of an ingress replica (GET /v1/parity/usage without org_id)")
        self.feed_lag_ms = Histogram(
            "metergate_feed_lag_ms", "Age of a shard's knowledge in each heartbeat a feed stream sends, in ms",
            boundaries=FEED_LAG_MS_BOUNDS, tag_keys=("shard",))


@cache
def series() -> Series:
    """This process's series, made on first use."""
    return Series()


# ----- the ingress ---------------------------------------------------------------------------


def gate_decided(reason: str, action: str, source: str, would_reason: str | None = None) -> None:
    """One gate answer. source: local (from the projection) or shard (asked the org's shard).
    would_reason: a shadow org's decision's (billing-rules 2.12), counted when not ok."""
    series().gate_decisions.inc(1, {"reason": str(reason), "action": action, "source": source})
    if would_reason is not None and would_reason != "ok":
        shadow_would_deny(would_reason, action)


def gates_decided(decided: Tally) -> None:
    """A batch of gate answers, as a tally of (reason, action, source, would_reason): one record
    per kind (would_reason None for an enforced org's answer or a refusal)."""
    counter = series().gate_decisions
    for (reason, action, source, would_reason), count in decided.items():
        counter.inc(count, {"reason": str(reason), "action": action, "source": source})
        if would_reason is not None and would_reason != "ok":
            shadow_would_deny(would_reason, action, count)


def shadow_would_deny(would_reason: str, action: str, count: int = 1) -> None:
    """A shadow org's gate answer or lease (action `lease`) allowed though the rules would deny it."""
    series().gate_shadow_would_deny.inc(count, {"reason": str(would_reason), "action": action})


class FeedMetrics:
    """An ingress replica's feed streams: how many are open, and the lag their heartbeats report."""

    def __init__(self) -> None:
        self.open_streams = 0
        self.shard_tags: list[dict[str, str]] = []

    def opened(self) -> None:
        self.open_streams += 1
        series().feed_streams.set(self.open_streams)

    def closed(self) -> None:
        self.open_streams -= 1
        series().feed_streams.set(self.open_streams)

    def heartbeat(self, age_ms: list[int]) -> None:
        """A heartbeat went out. The stream count is set again too: Ray drops a gauge that is
        not set for a while, and a stream may stay open for days."""
        while len(self.shard_tags) < len(age_ms):
            self.shard_tags.append({"shard": str(len(self.shard_tags))})
        series().feed_streams.set(self.open_streams)
        lag = series().feed_lag_ms
        for tags, age in zip(self.shard_tags, age_ms):
            lag.observe(age, tags)


def usage_parity_reported(org_hours: int, outside_tolerance: int) -> None:
    """A usage parity report over every org answered: what it compared, and how many org-hours
    were outside (a report of one org sets nothing)."""
    s = series()
    s.usage_parity_org_hours.set(org_hours)
    s.usage_parity_outside.set(outside_tolerance)


def webhook_refused(source: str) -> None:
    series().webhook_verification_failures.inc(1, {"source": source})


def stripe_event_answered(outcome: str) -> None:
    series().stripe_events.inc(1, {"outcome": outcome})


def stripe_failed(call: str, exc: BaseException) -> None:
    series().stripe_errors.inc(1, {"call": call, "error": type(exc).__name__})


# ----- the shards ----------------------------------------------------------------------------


class ShardMetrics:
    """What one shard records, tagged with its number."""

    def __init__(self, shard: int) -> None:
        self.tags = {"shard": str(shard)}
        self.outcome_tags = {outcome: {"shard": str(shard), "outcome": outcome}
                             for outcome in ("accepted", "duplicate", "rejected")}
        self.views_reported = 0  # views published as of the last report

    def commit(self, items: int, ticks: int, latency_ms: float, accepted: int, duplicates: int,
               rejected: int) -> None:
        """One group commit that went through."""
        s, tags = series(), self.tags
        s.commit_items.observe(items, tags)
        s.commit_ticks.observe(ticks, tags)
        s.commit_latency_ms.observe(latency_ms, tags)
        for outcome, count in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
            if count:
                s.ticks.inc(count, self.outcome_tags[outcome])

    def runway_low(self, events: list) -> None:
        """The runway alerts of one group commit that went through."""
        count = sum(1 for event in events if event.type == "balance.runway_low")
        if count:
            series().runway_low.inc(count, self.tags)

    def memory(self, orgs_loaded: int, leases_active: int, tail_orgs: int, tail_entries: int,
               views_published: int) -> None:
        """The shard's running totals (housekeeping: about every second, never per request)."""
        s, tags = series(), self.tags
        s.orgs_loaded.set(orgs_loaded, tags)
        s.leases_active.set(leases_active, tags)
        s.snapshot_lag_orgs.set(tail_orgs, tags)
        s.snapshot_lag_entries.set(tail_entries, tags)
        if views_published > self.views_reported:
            s.views_published.inc(views_published - self.views_reported, tags)
            self.views_reported = views_published


# ----- the scheduler -------------------------------------------------------------------------


def outbox_counted(pending: int, dead: int) -> None:
    s = series()
    s.outbox_backlog.set(pending)
    s.outbox_dead.set(dead)


def outbox_delivered(counts: dict[str, int]) -> None:
    """One delivery run: attempts by outcome (delivered, failed, dead)."""
    counter = series().outbox_deliveries
    for outcome in ("delivered", "failed", "dead"):
        if counts.get(outcome):
            counter.inc(counts[outcome], {"outcome": outcome})
