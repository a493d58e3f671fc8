"""Reads of the usage rollups (per org, lease and minute; written by the group commit)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from storage.times import optional_dt

_GROUPS = {"lease": "lease_id", "day": "date_trunc('day', minute)", "meter": "''"}


@dataclass(frozen=True, slots=True)
class UsageGroup:
    key: object  # the lease id, the day (a datetime), or "" for the whole window
    memory_mb_ms: int
    cpu_ms: int
    disk_mb_ms: int
    ticks: int
    cost_scaled: int  # exact (actors/metering.py's scaled units): the edge rounds the sum once


def _minutes_within(from_us: int | None, to_us: int | None, first: int) -> tuple[str, list]:
    """The condition on `minute` for the bounds given (fixed text, parameters from $first on),
    and its arguments. Not "$2 IS NULL OR minute >= $2": the generic plan of such a prepared
    statement (Postgres' choice after five runs) cannot bound the index scan through the OR
    and reads every rollup of the org, a row per lease and minute, for a 30-day page."""
    text, args = "", []
    for op, us in ((">=", from_us), ("<", to_us)):
        if us is not None:
            args.append(optional_dt(us))
            text += f" AND minute {op} ${first + len(args) - 1}"
    return text, args


async def report(conn: asyncpg.Connection, org_id: str, group_by: str, from_us: int | None,
                 to_us: int | None) -> list[UsageGroup]:
    key = _GROUPS[group_by]  # one of three fixed expressions, never caller text
    within, args = _minutes_within(from_us, to_us, 2)
    rows = await conn.fetch(
        f"SELECT {key} AS k, sum(memory_mb_ms)::int8 AS memory_mb_ms, sum(cpu_ms)::int8 AS cpu_ms,"
        " sum(disk_mb_ms)::int8 AS disk_mb_ms, sum(ticks)::int8 AS ticks,"
        f" sum(cost_scaled) AS cost_scaled FROM usage_rollups WHERE org_id = $1{within}"
        " GROUP BY 1 ORDER BY 1",
        org_id, *args)
    return [UsageGroup(r["k"], r["memory_mb_ms"], r["cpu_ms"], r["disk_mb_ms"], r["ticks"], int(r["cost_scaled"]))
            for r in rows]


async def lease_ms_by_month(conn: asyncpg.Connection, org_id: str, since_us: int | None = None) -> dict[str, int]:
    """Lease time per UTC month ('YYYY-MM' → milliseconds), from since_us on (None: all)."""
    within, args = _minutes_within(since_us, None, 2)
    rows = await conn.fetch(
        "SELECT to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM') AS month, sum(duration_ms)::int8 AS ms"
        f" FROM usage_rollups WHERE org_id = $1{within} GROUP BY 1", org_id, *args)
    return {r["month"]: r["ms"] for r in rows}



@dataclass(frozen=True, slots=True)
class LeaseCost:
    lease_id: str
    duration_ms: int  # lease time
    ticks: int
    cost_scaled: int


async def lease_costs(conn: asyncpg.Connection, org_id: str, from_us: int, to_us: int,
                      limit: int) -> tuple[list[LeaseCost], int]:
    """The costliest leases of a window, most first, at most `limit`, and how many leases the
    window has in all."""
    rows = await conn.fetch(
        "SELECT lease_id, sum(duration_ms)::int8 AS lease_ms, sum(ticks)::int8 AS lease_ticks,"
        " sum(cost_scaled) AS lease_scaled, count(*) OVER ()::int8 AS leases"
        " FROM usage_rollups WHERE org_id = $1 AND minute >= $2 AND minute < $3"
        " GROUP BY lease_id ORDER BY lease_scaled DESC, lease_id LIMIT $4",
        org_id, optional_dt(from_us), optional_dt(to_us), limit)
    return ([LeaseCost(r["lease_id"], r["lease_ms"], r["lease_ticks"], int(r["lease_scaled"])) for r in rows],
            rows[0]["leases"] if rows else 0)
