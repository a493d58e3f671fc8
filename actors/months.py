"""GET /v1/orgs/{org_id}/months: the monthly accounting of free credits, recomputed from scratch.

Pure: the org's ledger (oldest first) and its lease time per month in, one row per month out,
so the same rows always give the same numbers. Credit is tracked in three pools, free
(signup and promotional grants), imported (`import` entries: credit brought over from another
biller, billing-rules 2.11, which is neither free credit nor money paid here) and paid
(top-ups, auto-recharge, adjustments). Usage is applied to free credit first, then to imported
credit (its own line); what neither covers is billable (paid from purchased credit, or invoiced
for a postpaid org). Expiry takes from the pool of its grant; a refund or negative adjustment
(an imported debt too) from paid credit first, then imported, then free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from actors.money import IMPORT_KIND
from actors.org import PROMOTIONAL_KINDS
from actors.timeutil import US_PER_S

MS_PER_HOUR = 3_600_000


def month_of(us: int) -> str:
    return datetime.fromtimestamp(us // US_PER_S, tz=timezone.utc).strftime("%Y-%m")


def next_month(month: str) -> str:
    year, number = map(int, month.split("-"))
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


def month_start_us(month: str) -> int:
    year, number = map(int, month.split("-"))
    return int(datetime(year, number, 1, tzinfo=timezone.utc).timestamp()) * US_PER_S


@dataclass
class Carry:
    """What the months before hand on: the free, paid and imported pools, and the pool of each
    grant that may still expire (only those: a grant without expiry is never asked for again)."""

    free: int = 0
    paid: int = 0
    pool_of: dict[str, str] = field(default_factory=dict)
    imported: int = 0

    def to_json(self) -> dict:
        return {"free": self.free, "paid": self.paid, "pool_of": dict(self.pool_of), "imported": self.imported}

    @classmethod
    def from_json(cls, data: dict) -> "Carry":
        return cls(data["free"], data["paid"], dict(data["pool_of"]), data.get("imported", 0))


def summarize(entries: list[tuple], usage_ms: dict[str, int], now_us: int) -> list[dict]:
    return summarize_months(entries, usage_ms, now_us)[0]


def summarize_months(entries: list[tuple], usage_ms: dict[str, int], now_us: int,
                     carry: Carry | None = None) -> tuple[list[dict], dict[str, Carry]]:
    """(one row per month, what each month hands on at its end).

    entries: (kind, amount_micros, grant_id, at_us[, invoiced_micros[, expires_at_us]]),
    oldest first, from where `carry` left off (None: the org's first entry); usage_ms: lease
    time per month. A postpaid org's invoiced usage is spend and billable, never credit."""
    carry = Carry(carry.free, carry.paid, dict(carry.pool_of), carry.imported) if carry is not None else Carry()
    pools = {"free": carry.free, "imported": carry.imported, "paid": carry.paid}
    pool_of = carry.pool_of
    months: dict[str, dict] = {}
    ends: dict[str, Carry] = {}

    def row(month: str) -> dict:
        return months.setdefault(month, {"spend_micros": 0, "credits_applied_micros": 0,
                                         "imported_applied_micros": 0, "billable_micros": 0})

    def take(amount: int, order: tuple[str, ...]) -> None:
        for pool in order:
            taken = min(amount, pools[pool])
            pools[pool] -= taken
            amount -= taken

    def hand_on(month_key: str) -> None:
        ends[month_key] = Carry(pools["free"], pools["paid"], dict(pool_of), pools["imported"])

    last_key = None
    for kind, amount, grant_id, at_us, *more in entries:
        invoiced_micros = more[0] if more else 0
        expires = more[1] if len(more) > 1 else "unknown"
        month_key = month_of(at_us)
        if month_key != last_key:
            if last_key is not None:
                hand_on(last_key)
            last_key = month_key
        month = row(month_key)
        if kind == "usage":
            spent = -amount
            free = min(spent, pools["free"])
            imported = min(spent - free, pools["imported"])
            month["spend_micros"] += spent + invoiced_micros
            month["credits_applied_micros"] += free
            month["imported_applied_micros"] += imported
            month["billable_micros"] += spent - free - imported + invoiced_micros
            take(spent, ("free", "imported", "paid"))
        elif amount > 0:
            pool = "free" if kind in PROMOTIONAL_KINDS else "imported" if kind == IMPORT_KIND else "paid"
            pools[pool] += amount
            if grant_id and expires is not None:
                pool_of[grant_id] = pool
        elif kind == "expiration":
            take(-amount, (pool_of.pop(grant_id or "", "free"),))
        else:  # refund, negative adjustment, imported debt
            take(-amount, ("paid", "imported", "free"))
    if last_key is not None:
        hand_on(last_key)
    for month in usage_ms:
        row(month)
    current = month_of(now_us)
    rows = [{"month": month, **months[month],
             "usage_hours": round(usage_ms.get(month, 0) / MS_PER_HOUR, 3), "usage_ms": usage_ms.get(month, 0),
             "status": "open" if month >= current else "closed"} for month in sorted(months)]
    return rows, ends
