"""The one Stripe customer of each org."""

from __future__ import annotations

import asyncpg


async def customer_of(conn: asyncpg.Connection, org_id: str) -> str | None:
    return await conn.fetchval("SELECT customer_id FROM stripe_customers WHERE org_id = $1", org_id)


async def billing_contact(conn: asyncpg.Connection, org_id: str) -> tuple[str, str | None] | None:
    """(email, customer id or None) of an org, in one read; None if there is no such org."""
    row = await conn.fetchrow("SELECT o.email, c.customer_id FROM orgs o LEFT JOIN stripe_customers c USING (org_id)"
                              " WHERE o.org_id = $1", org_id)
    return None if row is None else (row["email"], row["customer_id"])


async def org_of(conn: asyncpg.Connection, customer_id: str) -> str | None:
    return await conn.fetchval("SELECT org_id FROM stripe_customers WHERE customer_id = $1", customer_id)


async def remember(conn: asyncpg.Connection, org_id: str, customer_id: str) -> str:
    """Record the org's customer unless it has one; returns the one it has (the first wins)."""
    await conn.execute("INSERT INTO stripe_customers (org_id, customer_id) VALUES ($1, $2)"
                       " ON CONFLICT (org_id) DO NOTHING", org_id, customer_id)
    return await customer_of(conn, org_id)
