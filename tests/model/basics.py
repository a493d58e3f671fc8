"""The reference model's basics: time and calendar helpers, the catalog, and the plain records
an org holds (tests/model/reference.py). Written from docs/concepts/billing-rules.md alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from fractions import Fraction

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

US = 1_000_000                     # microseconds per second
HOUR_US = 3_600 * US
DAY_US = 86_400 * US

SCALE = 1_024_000_000              # scaled units per µUSD (rule 6.1: 1,024,000 per nano, 1,000 nano per µUSD)
MAX_GRANTS = 1_000                 # rule 2.3
MAX_LEASES = 10_000                # brief (not in the rules document)
MAX_WAITING_REFUNDS = 100          # rule 3.3
SHADOW_FOREVER = 2**62             # rule 2.12: in shadow with no cutover (any instant later than all)
SHADOWED = frozenset({"org.halted", "org.resumed", "org.suspended", "org.unsuspended"})  # rule 2.12.3
REFUND_MEMORY_US = 180 * DAY_US    # rule 3.2
REFUND_WAIT_US = 30 * DAY_US       # rule 3.3
DISPUTE_MEMORY_US = 400 * DAY_US   # rule 3.4
ENDED = ("canceled", "incomplete_expired")  # rule 7.7: subscriptions that have ended
ENDED_LEASE_MEMORY_US = HOUR_US    # rule 7.5
MAX_ENDED_LEASES = 1_000           # rule 7.5
MAX_CHARGE_MICROS = 10_000 * US    # rule 9.2: at most 10,000 USD (10,000 × 1,000,000 µUSD)
CENT_MICROS = 10_000               # one cent in µUSD

PROMOTIONAL = ("signup_grant", "grant")                 # rule 2.2
PURCHASED = ("topup", "auto_recharge", "adjustment")    # rule 2.2
PAID = ("topup", "auto_recharge")                       # rule 2.2


# ----------------------------------------------------------------------------------------
# Time helpers (rules 5.2, 10)
# ----------------------------------------------------------------------------------------

def dt_to_us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - EPOCH
    return delta.days * DAY_US + delta.seconds * US + delta.microseconds


def us_to_dt(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def parse_time(value) -> int:
    """A catalog time: an RFC 3339 string or a TOML datetime."""
    if isinstance(value, datetime):
        return dt_to_us(value)
    if isinstance(value, date):
        return dt_to_us(datetime.combine(value, time(0), UTC))
    text = str(value)
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    return dt_to_us(datetime.fromisoformat(text))


def rfc3339(us: int) -> str:
    """Rule 10: `2026-03-02T09:00:00Z`, with `.ffffff` only when the microseconds are not 0."""
    dt = us_to_dt(us)
    text = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if dt.microsecond != 0:
        text += f".{dt.microsecond:06d}"
    return text + "Z"


def utc_day(us: int) -> int:
    """Index of the UTC day containing `us` (floor division: correct before 1970 too)."""
    return us // DAY_US


def calendar_period(kind: str, at_us: int) -> tuple[str, int, int]:
    """Rule 5.2: the calendar period of kind `week` (ISO week) or `month` containing at_us."""
    dt = us_to_dt(at_us)
    if kind == "month":
        start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
        if dt.month == 12:
            end = datetime(dt.year + 1, 1, 1, tzinfo=UTC)
        else:
            end = datetime(dt.year, dt.month + 1, 1, tzinfo=UTC)
        key = f"{dt.year:04d}-{dt.month:02d}"
        return key, dt_to_us(start), dt_to_us(end)
    if kind == "week":
        d = dt.date()
        monday = d - timedelta(days=d.weekday())
        start = datetime.combine(monday, time(0), UTC)
        end = start + timedelta(days=7)
        iso_year, iso_week, _ = d.isocalendar()
        key = f"{iso_year:04d}-W{iso_week:02d}"
        return key, dt_to_us(start), dt_to_us(end)
    raise ValueError(f"unknown period kind {kind!r}")


def sub_key(at_us: int) -> str:
    dt = us_to_dt(at_us)
    return f"sub-{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"


# ----------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------

@dataclass
class RefPlan:
    id: str
    version: int
    effective_from_us: int
    effective_until_us: int | None
    period: str
    included_micros: int
    overage: bool
    memory_nanos_per_gib_s: int
    cpu_nanos_per_vcpu_s: int
    disk_nanos_per_gib_s: int
    unit_nanos: dict


class RefCatalog:
    def __init__(self, raw: dict):
        self.plans: dict[tuple[str, int], RefPlan] = {}
        for p in raw.get("plans", []):
            until = p.get("effective_until")
            plan = RefPlan(
                id=str(p["id"]),
                version=int(p["version"]),
                effective_from_us=parse_time(p["effective_from"]),
                effective_until_us=None if until is None else parse_time(until),
                period=str(p["period"]),
                included_micros=int(p.get("included_micros", 0)),
                overage=bool(p.get("overage", True)),
                memory_nanos_per_gib_s=int(p.get("memory_nanos_per_gib_s", 0)),
                cpu_nanos_per_vcpu_s=int(p.get("cpu_nanos_per_vcpu_s", 0)),
                disk_nanos_per_gib_s=int(p.get("disk_nanos_per_gib_s", 0)),
                unit_nanos={str(k): int(v) for k, v in dict(p.get("unit_nanos", {})).items()},
            )
            self.plans[(plan.id, plan.version)] = plan
        self.tiers: dict[str, int] = {str(k): int(v) for k, v in dict(raw.get("tiers", {})).items()}
        self.signup_grant_micros: int = int(raw.get("signup_grant_micros", 0))
        self.default_max_disk_mb: int = int(raw.get("default_max_disk_mb", 0))
        self.default_tier: str = str(raw.get("default_tier", "base"))
        self.low_balance_micros: int = int(raw.get("low_balance_micros", 0))
        self.runway_alert_s: int = int(raw.get("runway_alert_s", 3_600))  # rule 2.10

    def plan(self, plan_id: str, version: int) -> RefPlan:
        return self.plans[(plan_id, version)]

    def plan_in_effect(self, plan_id: str, at_us: int) -> tuple[str, int] | None:
        """Rule 5.3: the highest version with effective_from <= at < effective_until."""
        best = None
        for (pid, ver), p in self.plans.items():
            if pid != plan_id:
                continue
            if p.effective_from_us <= at_us and (p.effective_until_us is None or at_us < p.effective_until_us):
                if best is None or ver > best:
                    best = ver
        return None if best is None else (plan_id, best)

    def successor(self, plan_id: str, version: int) -> int | None:
        """Rule 5.3: the next higher version of the same plan (not necessarily version + 1)."""
        higher = [ver for (pid, ver) in self.plans if pid == plan_id and ver > version]
        return min(higher) if higher else None


# ----------------------------------------------------------------------------------------
# Org state pieces
# ----------------------------------------------------------------------------------------

@dataclass
class Grant:
    grant_id: str
    seq: int                  # the credit counter n: the order the grants were made
    kind: str
    remaining: int
    expires_at_us: int | None
    payment_id: str | None


@dataclass
class Lease:
    lease_id: str
    expires_at_us: int
    quantity: int
    ttl_s: int
    resources: dict


def share(amount: int, credited: int, paid: int | None) -> int:
    """Rule 3.0: a refund's or dispute's amount of money paid, as credit: amount × A / P rounded
    down, when A and P (> 0) are both known; else the amount."""
    if paid is None or paid <= 0 or credited <= 0:
        return amount
    return math.floor(Fraction(amount) * Fraction(credited, paid))


def share_after(earlier: int, earlier_shares: int, amount: int, credited: int, paid: int | None) -> int:
    """Rule 3.0: a refund's share when its payment's earlier refunds sum to `earlier` and their
    shares to `earlier_shares`: what the refunds stand for together, less those shares, at least 0."""
    if paid is None or paid <= 0 or credited <= 0:
        return amount
    return max(0, share(earlier + amount, credited, paid) - earlier_shares)


@dataclass
class WaitingRefund:
    refund_id: str
    payment_id: str
    amount: int
    at_us: int


@dataclass
class Dunning:
    past_due_since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan_id: str
    free_plan_version: int
    step: int = 0
    unpaid: list = field(default_factory=list)
    billing: dict = field(default_factory=dict)  # unpaid invoice -> the subscription it bills (8.1)
    plan_before: tuple | None = None


@dataclass
class Recharge:
    enabled: bool
    threshold_micros: int
    amount_micros: int
    max_per_day: int
    cooldown_s: int
    paused: bool | str = False  # or why: "payment_failed" (9.4), "disputed" (3.6)
    pending_id: str | None = None
    pending_micros: int | None = None
    pending_asked_us: int | None = None
    last_ask_us: int | None = None
    day: int | None = None
    day_count: int = 0
    limit_event_day: int | None = None
    threshold_runway_s: int = 0  # rule 9.1


def kind_is_purchased(kind: str) -> bool:
    if kind in PURCHASED:
        return True
    if kind in PROMOTIONAL:
        return False
    # AMBIGUOUS: 2.2 lists only five credit kinds; any other credit kind is a harness error.
    raise ValueError(f"unknown credit kind {kind!r}")
