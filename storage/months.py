"""The monthly accounting of months that are over, kept once computed (see serve_app/calls.py)."""

from __future__ import annotations

import json

import asyncpg


async def closed(conn: asyncpg.Connection, org_id: str) -> list[tuple[str, dict, dict]]:
    """(month, summary, carry) of the months kept, oldest first. A month kept before the summary
    had `imported_applied_micros` reads with it at 0 (no import was applied in it then)."""
    rows = await conn.fetch("SELECT month, summary, carry FROM org_months WHERE org_id = $1 ORDER BY month", org_id)
    return [(r["month"], {"imported_applied_micros": 0, **json.loads(r["summary"])}, json.loads(r["carry"]))
            for r in rows]


async def keep(conn: asyncpg.Connection, org_id: str, months: list[tuple[str, dict, dict]]) -> None:
    """Keep months that are over; one kept already stays as it is (two readers compute the same)."""
    if months:
        await conn.execute(
            "INSERT INTO org_months (org_id, month, summary, carry)"
            " SELECT $1, m, s, c FROM unnest($2::text[], $3::jsonb[], $4::jsonb[]) AS k(m, s, c)"
            " ON CONFLICT DO NOTHING",
            org_id, [m for m, _, _ in months], [json.dumps(s) for _, s, _ in months],
            [json.dumps(c) for _, _, c in months])
