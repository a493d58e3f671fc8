"""The test clock's offset (METERGATE_TEST_CLOCK=1 only), shared by every process."""

from __future__ import annotations

import asyncpg


async def offset_us(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT offset_us FROM test_clock WHERE id = 1") or 0


async def advance(conn: asyncpg.Connection, seconds: int) -> int:
    """Move the clock forward; returns the new offset in µs."""
    return await conn.fetchval(
        "INSERT INTO test_clock (id, offset_us) VALUES (1, $1) ON CONFLICT (id)"
        " DO UPDATE SET offset_us = test_clock.offset_us + $1 RETURNING offset_us", seconds * 1_000_000)
