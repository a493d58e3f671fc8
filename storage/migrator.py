"""Migrations: numbered SQL files applied in order, each recorded with a checksum of its text.

What a start enforces before it applies anything (docs/operations/upgrades.md):
- the database records no migration this code lacks (a newer metergate migrated it);
- no applied file's text changed since it was applied, unless the change is accepted by name
  and checksum (METERGATE_MIGRATIONS_ACCEPT_CHANGED);
- each migration waits at most lock_timeout for a lock (a DDL queued behind a job's lock
  would queue every commit behind itself), and is tried again a bounded number of times.

A file whose first line is `-- metergate: no-transaction` runs outside a transaction, one
statement at a time (for CREATE INDEX CONCURRENTLY). Its statements must be safe to run again
after a crash halfway: each CREATE INDEX names IF NOT EXISTS, and an index that an interrupted
CONCURRENTLY build left INVALID is dropped and built again before its statement runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from config.settings import Settings, SettingsError

log = logging.getLogger("metergate.storage")

# Any constant works as long as every migrator uses it: it serialises concurrent start-ups.
MIGRATION_LOCK = 7_310_001
NO_TRANSACTION = "-- metergate: no-transaction"
RETRY_PAUSE_S = (0.5, 5.0)  # between attempts of a migration that timed out on a lock: first, at most
BLOCKER_POLL_S = 0.25  # how often a waiting migration looks up who blocks it
CHECKSUM_SHOWN = 12  # hex digits of a checksum that a message shows and an acceptance names

_CONCURRENT_INDEX = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(IF\s+NOT\s+EXISTS\s+)?([A-Za-z_][A-Za-z0-9_]*)\s+ON\b",
    re.IGNORECASE)


class MigrationRefused(SettingsError):
    """A migration found the database in a state it must not upgrade from; the message says why
    and what to do (the start stops with it, one line)."""


class MigrationBlocked(MigrationRefused):
    """A migration could not take its locks in the attempts it had."""


class BadMigrationFile(AssertionError):
    """A migration file breaks the runner's rules: a bug of the release, found by every test."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def in_transaction(self) -> bool:
        return self.sql.split("\n", 1)[0].strip() != NO_TRANSACTION

    def statements(self) -> list[str]:
        """A no-transaction file's statements, in order: each ends with `;` at the end of a line."""
        assert not self.in_transaction
        return [part.strip() for part in re.split(r";[ \t]*(?:\n|$)", self.sql) if _has_code(part)]

    def check(self) -> None:
        """Raise BadMigrationFile if a no-transaction file could not be run again safely."""
        if self.in_transaction:
            return
        if "$$" in self.sql:
            raise BadMigrationFile(f"{self.name}: a no-transaction migration is split at `;`, so it takes no $$ bodies")
        if not self.statements():
            raise BadMigrationFile(f"{self.name}: no statement")
        for statement in self.statements():
            if re.search(r"\b(BEGIN|COMMIT|ROLLBACK)\b", _code_of(statement), re.IGNORECASE):
                raise BadMigrationFile(f"{self.name}: a no-transaction migration opens no transaction")
            index = _CONCURRENT_INDEX.match(_code_of(statement))
            if re.search(r"\bCREATE\s+(UNIQUE\s+)?INDEX\b", _code_of(statement), re.IGNORECASE) and (
                    index is None or index.group(1) is None):
                raise BadMigrationFile(f"{self.name}: each index is CREATE INDEX CONCURRENTLY IF NOT EXISTS name ON "
                                       "..., so a re-run after a crash finds what the first run built")


def _code_of(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))


def _has_code(text: str) -> bool:
    return bool(_code_of(text).strip())


def migrations(folder: Path | None = None) -> list[Migration]:
    """The migration files (storage/migrations, or `folder`), in order."""
    where = resources.files("storage") / "migrations" if folder is None else folder
    found = sorted((Migration(int(entry.name.split("_", 1)[0]), entry.name, entry.read_text())
                    for entry in where.iterdir() if entry.name.endswith(".sql")), key=lambda m: m.version)
    versions = [m.version for m in found]
    assert len(set(versions)) == len(versions), f"duplicate migration numbers: {versions}"
    for migration in found:
        migration.check()
    return found


def accepted_changes(text: str) -> dict[str, str]:
    """METERGATE_MIGRATIONS_ACCEPT_CHANGED: `name@checksum,...` → {name: checksum prefix}."""
    accepted = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, digest = item.partition("@")
        if not name.endswith(".sql") or len(digest) < CHECKSUM_SHOWN:
            raise SettingsError(f"METERGATE_MIGRATIONS_ACCEPT_CHANGED: {item!r} is not NNNN_name.sql@<the "
                                f"{CHECKSUM_SHOWN} hex digits a refused start printed>")
        accepted[name] = digest.lower()
    return accepted


def migration_options(settings: Settings) -> dict:
    """migrate()'s options from the settings."""
    return {"lock_timeout_ms": settings.migration_lock_timeout_ms, "attempts": settings.migration_attempts,
            "accept_changed": settings.migrations_accept_changed}


async def migrate(url: str, *, lock_timeout_ms: int = 3000, attempts: int = 10, accept_changed: str = "",
                  folder: Path | None = None) -> list[str]:
    """Check the applied migrations, then apply the missing ones in order; returns their names."""
    from storage.pooler import refuse_transaction_pooler  # (a module of its own: the pools use it too)

    known = migrations(folder)
    accepted = accepted_changes(accept_changed)
    await refuse_transaction_pooler(url)
    conn = await asyncpg.connect(url)
    observer = None
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
        applied = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        _refuse_newer_database(applied, known)
        await _check_checksums(conn, applied, known, accepted)
        done = []
        for migration in known:
            if migration.version in applied:
                continue
            if observer is None:
                observer = await asyncpg.connect(url)
            await _apply(conn, observer, migration, lock_timeout_ms, attempts)
            log.info("applied migration %s", migration.name)
            done.append(migration.name)
        return done
    finally:
        if observer is not None:
            await observer.close()
        await conn.close()


def _refuse_newer_database(applied: dict, known: list[Migration]) -> None:
    ours = {m.version for m in known}
    unknown = sorted(v for v in applied if v not in ours)
    if unknown:
        names = ", ".join(applied[v]["name"] for v in unknown)
        raise MigrationRefused(
            f"the database was migrated by a newer metergate (migration {names}, which this version does not "
            f"have; this version knows up to {max(ours):04d}): start that version, or restore the database from a "
            "backup taken before it was migrated (docs/operations/upgrades.md)")


async def _check_checksums(conn, applied: dict, known: list[Migration], accepted: dict[str, str]) -> None:
    """Refuse an applied file whose text changed; record the checksums not recorded yet (files
    applied before checksums were kept: their text now is taken as what was applied)."""
    changed = []
    for migration in known:
        row = applied.get(migration.version)
        if row is None:
            continue
        if row["checksum"] is None:
            await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1 AND checksum IS NULL",
                               migration.version, migration.checksum)
        elif row["checksum"] != migration.checksum:
            if migration.checksum.startswith(accepted.get(migration.name, "-")):
                log.warning("migration %s: its text changed since it was applied (was %s, now %s); accepted by "
                            "METERGATE_MIGRATIONS_ACCEPT_CHANGED, and recorded: the setting can go",
                            migration.name, row["checksum"][:CHECKSUM_SHOWN], migration.checksum[:CHECKSUM_SHOWN])
                await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                                   migration.version, migration.checksum)
            else:
                changed.append(migration)
    if changed:
        first = changed[0]
        raise MigrationRefused(
            f"migration {first.name} was changed after it was applied to this database (checksum "
            f"{applied[first.version]['checksum'][:CHECKSUM_SHOWN]} then, {first.checksum[:CHECKSUM_SHOWN]} now"
            f"{f'; and {len(changed) - 1} more' if len(changed) > 1 else ''}): an applied migration never runs "
            "again, so its change never reached this database. Put the change in a new migration; if the change "
            "is only whitespace or comments, accept it with METERGATE_MIGRATIONS_ACCEPT_CHANGED="
            + ",".join(f"{m.name}@{m.checksum[:CHECKSUM_SHOWN]}" for m in changed))


async def _apply(conn, observer, migration: Migration, lock_timeout_ms: int, attempts: int) -> None:
    if migration.in_transaction:
        async def run() -> None:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                try:
                    await conn.execute(migration.sql)
                except asyncpg.exceptions.RaiseError as exc:  # a migration that refuses this database
                    raise MigrationRefused(f"{migration.name}: {exc}") from None
                await _record(conn, migration)

        await _with_lock_retries(conn, observer, migration.name, run, lock_timeout_ms, attempts)
        return
    await conn.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
    try:
        for number, statement in enumerate(migration.statements(), 1):
            async def run(statement: str = statement) -> None:
                await _drop_invalid_index(conn, migration.name, statement)
                await conn.execute(statement)

            await _with_lock_retries(conn, observer, f"{migration.name} (statement {number})", run,
                                     lock_timeout_ms, attempts)
        await _record(conn, migration)
    finally:
        await conn.execute("RESET lock_timeout")


async def _record(conn, migration: Migration) -> None:
    await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                       migration.version, migration.name, migration.checksum)


async def _drop_invalid_index(conn, name: str, statement: str) -> None:
    """A CREATE INDEX CONCURRENTLY cut short (a crash, a lock timeout, a cancel) leaves its
    index behind, INVALID: IF NOT EXISTS would then keep it for good, unused by every query
    and updated by every write. Drop it, so the statement builds it again."""
    index = _CONCURRENT_INDEX.match(_code_of(statement))
    if index is None:
        return
    valid = await conn.fetchval(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)", index.group(2))
    if valid is False:
        log.warning("migration %s: index %s is INVALID (an earlier build was cut short); dropping it to build "
                    "it again", name, index.group(2))
        await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{index.group(2)}"')


async def _with_lock_retries(conn, observer, what: str, run, lock_timeout_ms: int, attempts: int) -> None:
    """Run `run` until it does not time out on a lock, at most `attempts` times; log each wait
    and name who held the lock (if pg_blocking_pids saw it while we waited)."""
    pause_s = RETRY_PAUSE_S[0]
    pid = await conn.fetchval("SELECT pg_backend_pid()")  # (through a pooler, not the one asyncpg was told)
    poll_s = min(BLOCKER_POLL_S, lock_timeout_ms / 4000)
    for attempt in range(1, attempts + 1):
        blockers: list[str] = []
        stop = asyncio.Event()
        watch = asyncio.ensure_future(_watch_blockers(observer, pid, blockers, stop, poll_s))
        started = time.monotonic()
        try:
            await run()
            return
        except asyncpg.exceptions.LockNotAvailableError:
            held_by = blockers[-1] if blockers else "a session pg_blocking_pids did not name in time"
            if attempt == attempts:
                raise MigrationBlocked(
                    f"migration {what} could not take its locks: {attempts} attempt(s) each waited "
                    f"{lock_timeout_ms} ms (METERGATE_MIGRATION_LOCK_TIMEOUT_MS) behind {held_by}. End or wait "
                    "out that session, then start again; METERGATE_MIGRATION_ATTEMPTS sets how often a start "
                    "tries (docs/operations/upgrades.md)") from None
            log.warning("migration %s: waited %.0f ms for a lock held by %s; attempt %s of %s in %.1f s",
                        what, (time.monotonic() - started) * 1000, held_by, attempt + 1, attempts, pause_s)
        finally:
            stop.set()  # not cancelled: a query cancelled half way would leave the observer busy
            await watch
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, RETRY_PAUSE_S[1])


async def _watch_blockers(observer, pid: int, seen: list[str], stop: asyncio.Event, poll_s: float) -> None:
    """While a migration runs, note who blocks it: once its lock_timeout fires, the wait (and so
    pg_blocking_pids) is over."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), poll_s)
            return
        except asyncio.TimeoutError:
            pass
        try:
            rows = await observer.fetch(
                "SELECT pid, state, usename, application_name, left(query, 160) AS query,"
                " extract(epoch FROM now() - xact_start)::int AS in_transaction_s"
                " FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids($1))", pid)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return  # only a better message is lost
        if rows:
            seen.append("; ".join(_blocker(r) for r in rows))


def _blocker(row) -> str:
    """A blocking session, as a log line names it."""
    who = ", ".join(filter(None, (row["usename"], row["application_name"], row["state"])))
    held = f", its transaction open {row['in_transaction_s']} s" if row["in_transaction_s"] is not None else ""
    return f"pid {row['pid']} ({who}{held}, last query {' '.join((row['query'] or '').split())!r})"
