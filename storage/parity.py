"""Usage parity: the platform's own usage per org and UTC hour (usage_parity_posted, migration
0018), and metergate's usage_rollups summed to the same org and hour, for the edge to compare
(docs/operations/parity.md).

A rollup row is a minute (or, past METERGATE_USAGE_DETAIL_DAYS, an hour: storage/retention.py)
of the ticks that started in it, so summing rollups by the hour of their `minute` gives the
ticks that started in that hour, whether or not the hour was folded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from storage.times import dt_to_us, us_to_dt

HOUR_US = 3_600_000_000


@dataclass(frozen=True, slots=True)
class HourUsage:
    """One org's usage in one UTC hour, in metergate's units."""

    org_id: str
    hour_us: int  # the hour's start
    memory_mb_ms: int
    cpu_ms: int  # vCPU·ms
    disk_mb_ms: int
    units: dict[str, int]  # unit name → count; no zero counts


def _units(text: str | None) -> dict[str, int]:
    """jsonb text → {name: count}. mg_units_add sums as numeric; a count is whole (the tick
    decoder takes integers only), and is read as an exact integer, never through a float."""
    if text is None:
        return {}
    counts = json.loads(text, parse_float=Decimal)
    assert isinstance(counts, dict), counts
    whole = {name: int(count) for name, count in counts.items() if count}
    assert all(whole[name] == counts[name] for name in whole), counts
    return whole


async def store_posted(conn: asyncpg.Connection, rows: list[HourUsage], posted_at_us: int) -> list[tuple[str, int]]:
    """Store the platform's usage, one row per (org, hour), replacing what an earlier post said
    for the same org and hour. Returns the (org, hour) pairs that replaced a row. The caller
    gives each (org, hour) once (Postgres cannot update one row twice in a statement)."""
    assert len({(r.org_id, r.hour_us) for r in rows}) == len(rows), "an (org, hour) twice in one post"
    assert all(r.hour_us % HOUR_US == 0 for r in rows)
    # xmax is not 0 on a row version an ON CONFLICT update wrote: the row was there before.
    replaced = await conn.fetch(
        "INSERT INTO usage_parity_posted (org_id, hour, memory_mb_ms, cpu_ms, disk_mb_ms, units, posted_at)"
        " SELECT o, h, m, c, d, u, $7 FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::int8[],"
        " $5::int8[], $6::jsonb[]) AS p(o, h, m, c, d, u)"
        " ON CONFLICT (org_id, hour) DO UPDATE SET memory_mb_ms = EXCLUDED.memory_mb_ms,"
        " cpu_ms = EXCLUDED.cpu_ms, disk_mb_ms = EXCLUDED.disk_mb_ms, units = EXCLUDED.units,"
        " posted_at = EXCLUDED.posted_at"
        " RETURNING org_id, hour, xmax <> 0 AS replaced",
        [r.org_id for r in rows], [us_to_dt(r.hour_us) for r in rows], [r.memory_mb_ms for r in rows],
        [r.cpu_ms for r in rows], [r.disk_mb_ms for r in rows],
        [json.dumps(r.units, sort_keys=True) if r.units else None for r in rows], us_to_dt(posted_at_us))
    assert len(replaced) == len(rows)
    return sorted((r["org_id"], dt_to_us(r["hour"])) for r in replaced if r["replaced"])


def _window(from_us: int, to_us: int, org_id: str | None, column: str) -> tuple[str, list]:
    """The condition on the window and the org (fixed text), and its arguments from $1 on. No
    "$3 IS NULL OR org_id = $3": a prepared statement's generic plan could not use the index
    through the OR (storage/usage.py says the same of its bounds)."""
    text = f"{column} >= $1 AND {column} < $2"
    args: list = [us_to_dt(from_us), us_to_dt(to_us)]
    if org_id is not None:
        text += " AND org_id = $3"
        args.append(org_id)
    return text, args


class ReportTimedOut(Exception):
    """A report's queries took longer than their statement_timeout (Postgres cancelled them)."""


async def report_sides(conn: asyncpg.Connection, from_us: int, to_us: int, org_id: str | None, limit: int,
                       timeout_ms: int) -> tuple[list[HourUsage], list[HourUsage]] | None:
    """(metered, posted) for the hours from `from_us` to `to_us`, each by hour then org, or None
    when either side holds more than `limit` org-hours (the posted side is read first: over the
    limit, the rollups are not summed at all). Both queries run in one transaction under
    `SET LOCAL statement_timeout`; past it, ReportTimedOut."""
    try:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
            theirs = await posted(conn, from_us, to_us, org_id, limit + 1)
            if len(theirs) > limit:
                return None
            ours = await metered(conn, from_us, to_us, org_id, limit + 1)
            if len(ours) > limit:
                return None
    except asyncpg.QueryCanceledError as exc:
        if exc.sqlstate != "57014" or "statement timeout" not in str(exc):
            raise
        raise ReportTimedOut(f"the report took longer than {timeout_ms:,} ms") from None
    return ours, theirs


async def posted(conn: asyncpg.Connection, from_us: int, to_us: int, org_id: str | None,
                 limit: int) -> list[HourUsage]:
    """What the platform posted for the hours from `from_us` to `to_us` (hour starts), by hour
    then org, at most `limit` rows."""
    within, args = _window(from_us, to_us, org_id, "hour")
    rows = await conn.fetch(
        "SELECT org_id, hour, memory_mb_ms, cpu_ms, disk_mb_ms, units::text AS units FROM usage_parity_posted"
        f" WHERE {within} ORDER BY hour, org_id LIMIT ${len(args) + 1}", *args, limit)
    return [HourUsage(r["org_id"], dt_to_us(r["hour"]), r["memory_mb_ms"], r["cpu_ms"], r["disk_mb_ms"],
                      _units(r["units"])) for r in rows]


async def metered(conn: asyncpg.Connection, from_us: int, to_us: int, org_id: str | None,
                  limit: int) -> list[HourUsage]:
    """What metergate metered, per org and UTC hour, for the ticks that started from `from_us`
    to `to_us` (hour starts), by hour then org: all of them when the window holds at most
    `limit`, else `limit` of them (the earliest hours', and some of the last hour's: a caller
    asks for one more than it takes, to learn that the window holds too many).

    Hour by hour, not one GROUP BY over the window: a GROUP BY would sum every rollup of the
    window before its LIMIT could stop it (a hash aggregate ends its input first), so a window
    far over the limit cost as much as reading it all. Here each hour of the list is one
    index range scan (usage_rollups_minute, or the primary key's (org_id, minute) with an
    org), summed per org; the nested loop stops at the hour where the `limit`-th org-hour
    appears, so the work is the hours the report needs, and no more. No ORDER BY over the
    whole result (a sort would read every hour too): the rows are ordered here. The units are
    summed over the rows that have some (mg_units_add is a SQL function: called for every
    row, it cost more than the scan)."""
    assert from_us % HOUR_US == 0 and to_us % HOUR_US == 0 and from_us < to_us
    hours = [us_to_dt(hour_us) for hour_us in range(from_us, to_us, HOUR_US)]
    org_filter = " AND r.org_id = $3" if org_id is not None else ""
    args: list = [hours, limit] + ([org_id] if org_id is not None else [])
    rows = await conn.fetch(
        "SELECT s.org_id, h.hour, s.memory_mb_ms, s.cpu_ms, s.disk_mb_ms, s.units"
        " FROM unnest($1::timestamptz[]) AS h(hour) CROSS JOIN LATERAL ("
        "  SELECT r.org_id, sum(r.memory_mb_ms)::int8 AS memory_mb_ms, sum(r.cpu_ms)::int8 AS cpu_ms,"
        "  sum(r.disk_mb_ms)::int8 AS disk_mb_ms,"
        "  mg_units_sum(r.units) FILTER (WHERE r.units IS NOT NULL)::text AS units"
        "  FROM usage_rollups r WHERE r.minute >= h.hour AND r.minute < h.hour + interval '1 hour'"
        f"{org_filter} GROUP BY r.org_id) AS s LIMIT $2", *args)
    found = [HourUsage(r["org_id"], dt_to_us(r["hour"]), r["memory_mb_ms"], r["cpu_ms"], r["disk_mb_ms"],
                       _units(r["units"])) for r in rows]
    found.sort(key=lambda u: (u.hour_us, u.org_id))
    return found
