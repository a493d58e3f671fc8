"""Connections, the embedded Postgres, and migrations."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path

import asyncpg

from storage.migrator import (BadMigrationFile, MigrationBlocked, MigrationRefused, migrate, migration_options,
                              migrations)
from storage.pooler import TransactionPoolerRefused
from storage.slots import Fenced

__all__ = ["BadMigrationFile", "MigrationBlocked", "MigrationRefused", "TransactionPoolerRefused", "migrate",
           "migration_options"]

log = logging.getLogger("metergate.storage")

# What one item of a commit can make it fail with: a value Postgres refuses, a constraint it breaks.
ITEM_FAILURES_IN_POSTGRES = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# Everything else from Postgres or the link to it (a lost connection, a server shutting down
# or starting, a failover to a read-only standby, a deadlock, the epoch fenced) is an outage:
# what failed may be retried once it is over.
DATABASE_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
                     asyncio.TimeoutError, Fenced)


def is_outage(exc: BaseException) -> bool:
    """A failure of the database, not of any one value sent to it."""
    return isinstance(exc, DATABASE_FAILURES) and not isinstance(exc, ITEM_FAILURES_IN_POSTGRES)


async def roll_back(conn, transaction) -> None:
    """Roll back after a failure inside the transaction; a connection that cannot is dropped
    (Postgres rolls back what it held). The failure itself is what the caller re-raises."""
    try:
        await transaction.rollback()
    except Exception:  # noqa: BLE001 - the link is gone or unusable
        drop(conn)


def drop(conn) -> None:
    """Close a pool connection at once, without a word to Postgres. One whose link was lost
    is closed (and out of the pool) already."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass


# pgserver's pg_ctl start waits up to 10 s; initdb before it (a new data folder) a few more.
EMBEDDED_START_WAIT_S = 15.0


def start_embedded_postgres(data_dir: Path) -> tuple[str, object]:
    """Start (or reuse) an embedded Postgres in data_dir/pg; returns (url, server handle).

    The handle stops the server when the last process holding one exits.

    The start runs in a thread that nothing interrupts: pg_ctl starts the postmaster in a
    session of its own, and this process counts as its holder only once pgserver's start has
    returned. A stop signal (a KeyboardInterrupt, or metergate's own start-up interruption)
    in between would leave a Postgres that no stop reaches. Interrupted, this waits for the
    start to end, lets go of the server (which stops it if no one else holds it), and
    re-raises.
    """
    import pgserver  # only the embedded path needs it

    pg_dir = Path(data_dir) / "pg"
    pg_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_holders(pg_dir)
    started: list = []
    failed: list[BaseException] = []
    # An Event, not Thread.join: a join that a signal handler's exception interrupts marks the
    # thread as ended (CPython 3.11), and the join after it would return at once.
    done = threading.Event()

    def start() -> None:
        try:
            started.append(pgserver.get_server(pg_dir, cleanup_mode="stop"))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=start, name="start-postgres", daemon=True).start()
    try:
        done.wait()
    except BaseException:
        done.wait(EMBEDDED_START_WAIT_S)
        if started:
            stop_embedded_postgres(started[0])
        else:  # still starting after all that time: stop whatever runs there
            stop_postgres_now(data_dir)
        raise
    if failed:
        raise failed[0]
    return started[0].get_uri(), started[0]


def stop_embedded_postgres(server) -> None:
    """Let go of the server; pgserver stops it if no other holder is left. Holders killed
    since the start are forgotten first: a run killed with -9 just before this one started
    may not have been dead yet then (a zombie until someone reaps it)."""
    _forget_dead_holders(Path(server.pgdata))
    server.cleanup()


def stop_postgres_now(data_dir: Path, wait_s: float = 1.5) -> None:
    """Fast shutdown (SIGINT: clients cut off, in-flight transactions rolled back, data safe)
    of the embedded Postgres in data_dir, if one runs; waits for it at most wait_s."""
    import psutil

    try:
        pid = int((Path(data_dir) / "pg" / "postmaster.pid").read_text().split()[0])
        postmaster = psutil.Process(pid)
        postmaster.send_signal(signal.SIGINT)
        postmaster.wait(wait_s)
    except (OSError, ValueError, IndexError, psutil.Error):
        pass  # not running, already gone, or not ours to wait for


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs: a zombie has ended (a container's init may reap it only
    much later)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _forget_dead_holders(pg_dir: Path) -> None:
    """pgserver stops its server when the last process holding it lets go, and keeps those
    pids in a file. A holder killed with -9 never lets go, so its pid would keep the server
    running past every later stop: drop the pids of processes that no longer run."""
    holders = pg_dir / ".handle_pids.json"
    try:
        pids = json.loads(holders.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and pid_running(pid)]
    if alive != pids:
        log.info("embedded Postgres: forgetting holders that are gone: %s", sorted(set(pids) - set(alive)))
        holders.write_text(json.dumps(alive))


def migration_files(folder: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, file name, text) of every migration, in order."""
    return [(m.version, m.name, m.sql) for m in migrations(folder)]


class SessionConnection(asyncpg.Connection):
    """A pool connection whose get_server_pid() is its Postgres session's own pid.

    asyncpg's is the pid the server sent when the link opened: through a pooler (PgBouncer,
    even in session mode) a number the pooler made up. A lost COMMIT is resolved by ending the
    backend that held it (actors/claim.py), which needs the real one: asked of the session."""

    _session_pid: int | None = None

    def get_server_pid(self) -> int:
        return self._session_pid if self._session_pid is not None else super().get_server_pid()


async def _learn_session_pid(conn: SessionConnection) -> None:
    conn._session_pid = await conn.fetchval("SELECT pg_backend_pid()")


async def create_pool(url: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, command_timeout=60,
                                     connection_class=SessionConnection, init=_learn_session_pid)


async def ping(pool: asyncpg.Pool) -> None:
    """Raises if Postgres cannot answer a query."""
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
