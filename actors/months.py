"""GET /v1/orgs/{org_id}/months: the monthly accounting of free credits, recomputed from scratch.

Pure: the org's ledger (oldest first) and its lease time per month in, one row per month out,
so the same rows always give the same numbers. Credit is tracked in two pools, free
(signup and promotional grants) and paid (top-ups, auto-recharge, adjustments). Usage is
applied to free credit first; what free credit does not cover is billable (paid from
purchased credit, or invoiced for a postpaid org). Expiry takes from the pool of its grant;
a refund or negative adjustment from paid credit first.
"""

from __future__ import annotations

from datetime import datetime, timezone

from actors.org import PROMOTIONAL_KINDS
from actors.timeutil import US_PER_S

MS_PER_HOUR = 3_600_000


def month_of(us: int) -> str:
    return datetime.fromtimestamp(us // US_PER_S, tz=timezone.utc).strftime("%Y-%m")


def summarize(entries: list[tuple], usage_ms: dict[str, int], now_us: int) -> list[dict]:
    """entries: (kind, amount_micros, grant_id, at_us[, invoiced_micros]), oldest first; usage_ms:
    lease time per month. A postpaid org's invoiced usage is spend and billable, never credit."""
    pools = {"free": 0, "paid": 0}
    pool_of: dict[str, str] = {}
    months: dict[str, dict] = {}

    def row(month: str) -> dict:
        return months.setdefault(month, {"spend_micros": 0, "credits_applied_micros": 0, "billable_micros": 0})

    def take(amount: int, order: tuple[str, ...]) -> None:
        for pool in order:
            taken = min(amount, pools[pool])
            pools[pool] -= taken
            amount -= taken

    for kind, amount, grant_id, at_us, *invoiced in entries:
        month = row(month_of(at_us))
        if kind == "usage":
            spent = -amount
            free = min(spent, pools["free"])
            invoiced_micros = invoiced[0] if invoiced else 0
            month["spend_micros"] += spent + invoiced_micros
            month["credits_applied_micros"] += free
            month["billable_micros"] += spent - free + invoiced_micros
            take(spent, ("free", "paid"))
        elif amount > 0:
            pool = "free" if kind in PROMOTIONAL_KINDS else "paid"
            pools[pool] += amount
            if grant_id:
                pool_of[grant_id] = pool
        elif kind == "expiration":
            take(-amount, (pool_of.get(grant_id or "", "free"),))
        else:  # refund, negative adjustment
            take(-amount, ("paid", "free"))
    for month in usage_ms:
        row(month)
    current = month_of(now_us)
    return [{"month": month, **months[month],
             "usage_hours": round(usage_ms.get(month, 0) / MS_PER_HOUR, 3), "usage_ms": usage_ms.get(month, 0),
             "status": "open" if month >= current else "closed"} for month in sorted(months)]
