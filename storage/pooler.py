"""Refuse a connection pooler in transaction (or statement) mode in front of Postgres.

metergate needs each client connection to be one Postgres session: a lost COMMIT is resolved
by ending the backend (pg_backend_pid) that held it, asyncpg keeps prepared statements per
connection, and the migrator holds a session advisory lock. Behind PgBouncer's
pool_mode=transaction (or statement), pgcat in transaction mode or Supavisor's transaction
port, consecutive statements of one client may run on different server connections, and each
of those breaks silently (docs/operations/postgres.md, "Connection poolers").

The probe: one client connection sets a session setting; a second client connection then
holds a transaction open (a transaction pooler gives it a server connection, most often the
one just released: PgBouncer reuses the last used first); then the first client reads its
setting back. A session of its own (direct, or a session pooler) still has it; a transaction
pooler ran the read on another server connection, which has not, or made it wait for a free
one. Only simple-protocol statements (no prepared statements), so the probe itself works
through any pooler.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import asyncpg

from config.settings import SettingsError

log = logging.getLogger("metergate.storage")

PROBE_WAIT_S = 5.0  # a probe statement that waits longer is waiting for a server connection
# Read back this often: a pooler that picks a server connection at random (not PgBouncer's
# last-used-first) may hand one read the session that made the setting, hardly four in a row.
PROBE_READS = 4
_LOST = "metergate_pooler_probe_lost"


class TransactionPoolerRefused(SettingsError):
    """METERGATE_DATABASE_URL leads through a transaction pooler; the message says what to do."""


REFUSAL = ("METERGATE_DATABASE_URL leads through a connection pooler in transaction mode (PgBouncer "
           "pool_mode=transaction or statement, pgcat, Supavisor's transaction port 6543): {why}. metergate "
           "needs each connection to stay one Postgres session (lost-commit resolution by backend pid, prepared "
           "statements, the migration lock): connect to Postgres directly, or through a pooler in session mode "
           "(docs/operations/postgres.md, \"Connection poolers\")")


async def refuse_transaction_pooler(url: str) -> None:
    """Raise TransactionPoolerRefused if statements of one connection to `url` can land on
    different Postgres sessions."""
    token = secrets.token_hex(8)
    first = await asyncpg.connect(url, statement_cache_size=0)
    try:
        try:
            await first.execute(f"SELECT set_config('metergate.pooler_probe', '{token}', false)")
        except asyncpg.PostgresError as exc:  # Supavisor's txn_mode_leak_action=reject, say
            if isinstance(exc, (asyncpg.exceptions.OperatorInterventionError, asyncpg.PostgresConnectionError)):
                raise  # a server going away, not a refusal
            raise TransactionPoolerRefused(REFUSAL.format(
                why=f"it refused a session setting ({type(exc).__name__}: {exc})")) from None
        second = await _busy_second_connection(url)
        try:
            for _ in range(PROBE_READS):
                await asyncio.wait_for(first.execute(
                    "DO $$ BEGIN IF current_setting('metergate.pooler_probe', true) IS DISTINCT FROM "
                    f"'{token}' THEN RAISE EXCEPTION '{_LOST}'; END IF; END $$"), PROBE_WAIT_S)
        except asyncpg.exceptions.RaiseError as exc:
            if _LOST not in str(exc):
                raise
            raise TransactionPoolerRefused(REFUSAL.format(
                why="a session setting made by one statement was gone at the next statement of the same "
                    "connection")) from None
        except asyncio.TimeoutError:
            raise TransactionPoolerRefused(REFUSAL.format(
                why=f"a statement of a connection waited over {PROBE_WAIT_S:.0f} s for a server connection while "
                    "another connection held one in a transaction")) from None
        finally:
            if second is not None:
                await _close(second)
    finally:
        await _close(first)


async def _busy_second_connection(url: str) -> asyncpg.Connection | None:
    """A second connection inside an open transaction, or None if it cannot get one in time
    (a full pool: then the first connection's check runs alone, which a session still passes)."""
    try:
        second = await asyncio.wait_for(asyncpg.connect(url, statement_cache_size=0), PROBE_WAIT_S)
    except (asyncio.TimeoutError, asyncpg.TooManyConnectionsError):
        log.info("pooler probe: no second connection to the database; checking with one")
        return None
    try:
        await asyncio.wait_for(second.execute("BEGIN; SELECT 1"), PROBE_WAIT_S)
    except asyncio.TimeoutError:  # a session pooler with no free server connection for it
        second.terminate()
        return None
    return second


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), PROBE_WAIT_S)
    except (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        conn.terminate()
