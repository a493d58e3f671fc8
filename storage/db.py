"""Connections, the embedded Postgres, and migrations."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from importlib import resources
from pathlib import Path

import asyncpg

from config.settings import SettingsError

from storage.slots import Fenced

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


# Any constant works as long as every migrator uses it: it serialises concurrent start-ups.
_MIGRATION_LOCK = 7_310_001


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


def migration_files() -> list[tuple[int, str, str]]:
    folder = resources.files("storage") / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        version = int(name.split("_", 1)[0])
        found.append((version, name, entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    assert len(set(versions)) == len(versions), f"duplicate migration numbers: {versions}"
    return found


class MigrationRefused(SettingsError):
    """A migration found the database in a state it must not upgrade from; the message says why
    and what to do (the start stops with it, one line)."""


async def migrate(url: str) -> list[str]:
    """Apply the migrations not yet recorded, in order, each in its own transaction."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        done = []
        for version, name, sql in migration_files():
            if version in applied:
                continue
            async with conn.transaction():
                try:
                    await conn.execute(sql)
                except asyncpg.exceptions.RaiseError as exc:  # a migration that refuses this database
                    raise MigrationRefused(f"{name}: {exc}") from None
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration %s", name)
            done.append(name)
        return done
    finally:
        await conn.close()


async def create_pool(url: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size,
                                     command_timeout=60)


async def ping(pool: asyncpg.Pool) -> None:
    """Raises if Postgres cannot answer a query."""
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
