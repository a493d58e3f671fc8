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


async def forget(conn: asyncpg.Connection, customer_id: str) -> str | None:
    """Drop the mapping of a customer Stripe deleted (the org gets a new one on its next
    Checkout or portal visit) and keep it among the forgotten; returns the org it was of, or
    None if no org had it (any more)."""
    async with conn.transaction():
        org_id = await conn.fetchval("DELETE FROM stripe_customers WHERE customer_id = $1 RETURNING org_id",
                                     customer_id)
        if org_id is not None:
            await conn.execute("INSERT INTO stripe_customers_forgotten (customer_id, org_id) VALUES ($1, $2)"
                               " ON CONFLICT DO NOTHING", customer_id, org_id)
    return org_id


async def forgotten_count(conn: asyncpg.Connection, org_id: str) -> int:
    """How many customers of the org Stripe deleted: the number of its next customer, so that
    the idempotency key of that creation is not the one Stripe answers with a deleted customer."""
    return await conn.fetchval("SELECT count(*) FROM stripe_customers_forgotten WHERE org_id = $1", org_id)


async def customers_of(conn: asyncpg.Connection, org_ids: list[str]) -> dict[str, str]:
    """The customer of each of these orgs that has one."""
    rows = await conn.fetch("SELECT org_id, customer_id FROM stripe_customers WHERE org_id = ANY($1::text[])", org_ids)
    return {row["org_id"]: row["customer_id"] for row in rows}


async def remember_many(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> tuple[set[str], dict[str, str]]:
    """`remember` for many orgs in one statement (an import): each org gets its customer unless
    it has one, or the customer is another org's. Returns the orgs linked now, and the customer
    each org holds after it."""
    rows = await conn.fetch(
        "INSERT INTO stripe_customers (org_id, customer_id) SELECT * FROM unnest($1::text[], $2::text[])"
        " ON CONFLICT DO NOTHING RETURNING org_id", [org for org, _ in pairs], [cus for _, cus in pairs])
    return {row["org_id"] for row in rows}, await customers_of(conn, [org for org, _ in pairs])


async def orgs_of_customers(conn: asyncpg.Connection, customer_ids: list[str]) -> dict[str, str]:
    """The org of each of these customers that one holds."""
    rows = await conn.fetch("SELECT org_id, customer_id FROM stripe_customers WHERE customer_id = ANY($1::text[])",
                            customer_ids)
    return {row["customer_id"]: row["org_id"] for row in rows}
