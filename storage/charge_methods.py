"""The payment method each auto-recharge charge was first sent with, by idempotency key.

Stripe refuses a key sent again with other parameters; the charger reads the method here
before every attempt, so an attempt after a restart sends what the first one sent.
"""

from __future__ import annotations

import asyncpg

KEEP_S = 2 * 86_400  # Stripe forgets a key after 24 hours; the charger gives up after 23
PRUNE_LIMIT = 1_000


async def chosen(conn: asyncpg.Connection, idempotency_key: str) -> str | None:
    return await conn.fetchval("SELECT payment_method_id FROM charge_payment_methods WHERE idempotency_key = $1",
                               idempotency_key)


async def choose(conn: asyncpg.Connection, idempotency_key: str, payment_method_id: str) -> str:
    """Record the method unless the key has one; returns the one it has (the first wins)."""
    await conn.execute("INSERT INTO charge_payment_methods (idempotency_key, payment_method_id) VALUES ($1, $2)"
                       " ON CONFLICT (idempotency_key) DO NOTHING", idempotency_key, payment_method_id)
    method = await chosen(conn, idempotency_key)
    assert method is not None, idempotency_key
    return method


async def prune(conn: asyncpg.Connection, keep_s: int = KEEP_S, limit: int = PRUNE_LIMIT) -> int:
    """Forget methods chosen more than keep_s ago, at most `limit` rows a call."""
    deleted = await conn.fetchval(
        "WITH gone AS (DELETE FROM charge_payment_methods WHERE idempotency_key = ANY(ARRAY("
        " SELECT idempotency_key FROM charge_payment_methods WHERE chosen_at < now() - make_interval(secs => $1)"
        " LIMIT $2)) RETURNING 1) SELECT count(*) FROM gone", keep_s, limit)
    return int(deleted)
