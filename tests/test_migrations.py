"""Migrations that cannot hurt a running system, on a real Postgres (no service, no Ray).

Each test migrates a database of its own; extra migration files go in a folder of the test's
(a copy of storage/migrations plus the files under test), so the real files are never touched.
A transaction-mode pooler is a real PgBouncer on loopback, when the host has one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from storage.db import (
    BadMigrationFile,
    MigrationBlocked,
    MigrationRefused,
    TransactionPoolerRefused,
    migrate,
    migration_files,
    migrations,
)
from storage.migrator import Migration
from tests.helpers import free_port
from tests.pgproxy import PgProxy

MIGRATIONS = Path(__file__).resolve().parent.parent / "storage" / "migrations"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A Postgres server: METERGATE_DATABASE_URL's, or an embedded one for this module."""
    external = os.environ.get("METERGATE_DATABASE_URL")
    if external:
        yield external
        return
    from storage.db import start_embedded_postgres, stop_embedded_postgres

    url, server = start_embedded_postgres(tmp_path_factory.mktemp("pg"))
    yield url
    stop_embedded_postgres(server)


def run(coroutine):
    return asyncio.run(coroutine)


async def _on(url: str, statement: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


@pytest.fixture
def database(server_url):
    """A new, empty database; its URL."""
    name = f"metergate_mig_{uuid.uuid4().hex[:10]}"
    run(_on(server_url, f'CREATE DATABASE "{name}"'))
    yield urlsplit(server_url)._replace(path=f"/{name}").geturl()  # (a socket folder in the query stays)
    run(_on(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A copy of the real migrations, for a test to add or change files in."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, target)
    return target


def latest() -> int:
    return migrations()[-1].version


def add(folder: Path, name: str, text: str) -> str:
    """A migration after every real one (9001, 9002, ...); its file name."""
    numbered = f"{9001 + len(list(folder.glob('9*_*.sql')))}_{name}.sql"
    (folder / numbered).write_text(text)
    return numbered


# ----- checksums and the versions a database records ------------------------------------


def test_a_fresh_database_records_every_migration_with_its_checksum_and_a_second_run_applies_nothing(database):
    applied = run(migrate(database))
    assert applied == [name for _, name, _ in migration_files()]
    rows = run(_on(database, "SELECT name, checksum FROM schema_migrations ORDER BY version"))
    assert {r["name"]: r["checksum"] for r in rows} == {m.name: m.checksum for m in migrations()}
    assert run(migrate(database)) == []


def test_checksums_are_backfilled_for_migrations_applied_before_they_were_kept(database):
    run(migrate(database))
    # A database as the version before this one left it: no checksum column.
    run(_on(database, "ALTER TABLE schema_migrations DROP COLUMN checksum"))
    assert run(migrate(database)) == []
    rows = run(_on(database, "SELECT name, checksum FROM schema_migrations ORDER BY version"))
    assert [r["checksum"] for r in rows] == [m.checksum for m in migrations()]


def test_an_applied_migration_whose_text_changed_refuses_the_start_until_the_change_is_accepted(database, folder):
    run(migrate(database, folder=folder))
    edited = folder / "0003_stripe_customers.sql"
    edited.write_text(edited.read_text() + "\n-- a comment added after the release\n")
    with pytest.raises(MigrationRefused) as refused:
        run(migrate(database, folder=folder))
    message = str(refused.value)
    assert "0003_stripe_customers.sql was changed after it was applied" in message
    new_checksum = Migration(3, edited.name, edited.read_text()).checksum
    acceptance = f"0003_stripe_customers.sql@{new_checksum[:12]}"
    assert f"METERGATE_MIGRATIONS_ACCEPT_CHANGED={acceptance}" in message
    # An acceptance of other text (an older edit) does not let this one through.
    with pytest.raises(MigrationRefused):
        run(migrate(database, folder=folder, accept_changed="0003_stripe_customers.sql@000000000000"))
    assert run(migrate(database, folder=folder, accept_changed=acceptance)) == []
    # Recorded: the next start needs the setting no more.
    assert run(migrate(database, folder=folder)) == []


def test_a_database_migrated_by_a_newer_version_refuses_the_start(database, folder):
    newer = add(folder, "from_a_newer_release", "CREATE TABLE from_the_future (id int);\n")
    run(migrate(database, folder=folder))
    with pytest.raises(MigrationRefused) as refused:
        run(migrate(database))
    message = str(refused.value)
    assert f"migrated by a newer metergate (migration {newer}" in message
    assert f"this version knows up to {latest():04d}" in message
    assert "restore" in message


# ----- lock_timeout -------------------------------------------------------------------------


async def _blocker(url: str) -> asyncpg.Connection:
    """A job's transaction that read orgs and is still open: it holds ACCESS SHARE on orgs."""
    conn = await asyncpg.connect(url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT count(*) FROM orgs /* the nightly report */")
    return conn


def test_a_migration_behind_a_lock_retries_and_applies_once_the_blocker_ends(database, folder, caplog):
    run(migrate(database, folder=folder))
    name = add(folder, "add_column", "ALTER TABLE orgs ADD COLUMN probe_note text;\n")

    async def scenario() -> tuple[list[str], float]:
        blocker = await _blocker(database)
        migrating = asyncio.ensure_future(migrate(database, folder=folder, lock_timeout_ms=200, attempts=10))
        await asyncio.sleep(1.5)
        assert not migrating.done()
        # Meanwhile a commit that needs orgs waits no more than lock_timeout at a time (without
        # it, queued behind the waiting ALTER, it would wait for the nightly report to end).
        started = time.monotonic()
        writer = await asyncpg.connect(database)
        await writer.fetch("SELECT count(*) FROM orgs", timeout=5)
        read_s = time.monotonic() - started
        await writer.close()
        await blocker.execute("COMMIT")
        await blocker.close()
        return await asyncio.wait_for(migrating, 20), read_s

    with caplog.at_level(logging.WARNING, logger="metergate.storage"):
        applied, read_s = run(scenario())
    assert applied == [name]
    assert read_s < 1.0
    retries = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert retries, caplog.text
    assert "attempt 2 of 10" in retries[0]
    assert "the nightly report" in retries[0]  # who held the lock, by its query
    columns = run(_on(database, "SELECT 1 FROM information_schema.columns WHERE table_name = 'orgs' "
                                "AND column_name = 'probe_note'"))
    assert len(columns) == 1


def test_a_migration_blocked_for_good_stops_the_start_naming_the_blocking_query(database, folder):
    run(migrate(database, folder=folder))
    name = add(folder, "add_column", "ALTER TABLE orgs ADD COLUMN probe_note text;\n")

    async def scenario():
        blocker = await _blocker(database)
        try:
            await migrate(database, folder=folder, lock_timeout_ms=200, attempts=2)
        finally:
            await blocker.close()

    with pytest.raises(MigrationBlocked) as blocked:
        run(scenario())
    message = str(blocked.value)
    assert f"migration {name} could not take its locks: 2 attempt(s) each waited 200 ms" in message
    assert "the nightly report" in message and "idle in transaction" in message
    assert "\n" not in message
    assert not run(_on(database, "SELECT 1 FROM schema_migrations WHERE name = $1", name))


# ----- migrations outside a transaction ------------------------------------------------------


NO_TRANSACTION = "-- metergate: no-transaction\n"


def test_a_no_transaction_migration_builds_its_indexes_concurrently_one_statement_at_a_time(database, folder):
    run(migrate(database, folder=folder))
    name = add(folder, "concurrent_indexes", NO_TRANSACTION + (
        "-- Two indexes, each built without blocking writes.\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_ledger_kind ON ledger (kind);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_orgs_email ON orgs (email);\n"))
    assert run(migrate(database, folder=folder)) == [name]
    rows = run(_on(database, "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                             " WHERE c.relname LIKE 'probe_%' ORDER BY 1"))
    assert [(r["relname"], r["indisvalid"]) for r in rows] == [("probe_ledger_kind", True),
                                                               ("probe_orgs_email", True)]


def test_a_no_transaction_migration_run_again_after_a_build_cut_short_rebuilds_the_invalid_index(database, folder):
    run(migrate(database, folder=folder))
    # A first run cut short: a CONCURRENTLY build that failed half way (here: duplicates for a
    # unique index) leaves its index behind, INVALID, and records nothing.
    run(_on(database, "CREATE TABLE probe_accounts (email text)"))
    run(_on(database, "INSERT INTO probe_accounts VALUES ('a@example.com'), ('a@example.com')"))
    with pytest.raises(asyncpg.UniqueViolationError):
        run(_on(database, "CREATE UNIQUE INDEX CONCURRENTLY probe_accounts_email ON probe_accounts (email)"))
    valid = "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = 'probe_accounts_email'::regclass"
    assert run(_on(database, valid))[0]["indisvalid"] is False
    run(_on(database, "DELETE FROM probe_accounts"))
    name = add(folder, "unique_email", NO_TRANSACTION +
               "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS probe_accounts_email ON probe_accounts (email);\n")
    # IF NOT EXISTS alone would keep the INVALID index for good.
    assert run(migrate(database, folder=folder)) == [name]
    assert run(_on(database, valid))[0]["indisvalid"] is True
    run(_on(database, "INSERT INTO probe_accounts VALUES ('b@example.com')"))
    with pytest.raises(asyncpg.UniqueViolationError):
        run(_on(database, "INSERT INTO probe_accounts VALUES ('b@example.com')"))


@pytest.mark.parametrize("text, says", [
    (NO_TRANSACTION + "CREATE INDEX CONCURRENTLY probe_x ON orgs (email);\n", "IF NOT EXISTS"),
    (NO_TRANSACTION + "CREATE INDEX probe_x ON orgs (email);\n", "IF NOT EXISTS"),
    (NO_TRANSACTION + "DO $$ BEGIN PERFORM 1; END $$;\n", "$$"),
    (NO_TRANSACTION + "BEGIN;\nCREATE INDEX CONCURRENTLY IF NOT EXISTS probe_x ON orgs (email);\nCOMMIT;\n",
     "opens no transaction"),
    (NO_TRANSACTION + "-- nothing\n", "no statement"),
])
def test_a_no_transaction_migration_that_could_not_run_again_safely_is_refused_when_read(folder, text, says):
    add(folder, "bad", text)
    with pytest.raises(BadMigrationFile, match=None) as bad:
        migrations(folder)
    assert says in str(bad.value)


def test_every_migration_of_this_release_reads_and_splits():
    found = migrations()
    assert [m.version for m in found] == sorted({m.version for m in found})
    for migration in found:
        if not migration.in_transaction:
            assert migration.statements()


# ----- connection poolers --------------------------------------------------------------------


PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)


class PgBouncer:
    """A real PgBouncer on 127.0.0.1, in front of the test Postgres (through the loopback relay
    of tests/pgproxy.py, so PgBouncer needs no access to its socket folder)."""

    def __init__(self, folder: Path, upstream_url: str, pool_mode: str) -> None:
        self.relay = PgProxy(upstream_url)
        upstream = urlsplit(self.relay.url)
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "users.txt").write_text('"postgres" ""\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={upstream.port} user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = 4\nmax_client_conn = 50\n"
            "ignore_startup_parameters = extra_float_digits,options\n")
        for name in ("users.txt", "pgbouncer.ini"):
            (folder / name).chmod(0o644)
        user = ["-u", "nobody"] if os.getuid() == 0 else []  # PgBouncer refuses to run as root
        self.log = folder / "pgbouncer.log"  # its stderr (as nobody it could not open a file here)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([PGBOUNCER, *user, str(folder / "pgbouncer.ini")],
                                            stdout=subprocess.DEVNULL, stderr=log)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}{upstream.path}?sslmode=disable"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                run(_on(self.url, "SELECT 1"))
                return
            except (OSError, asyncpg.PostgresError):
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"PgBouncer did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.relay.stop()


needs_pgbouncer = pytest.mark.skipif(PGBOUNCER is None, reason="no pgbouncer here (apt-get install pgbouncer)")


@needs_pgbouncer
def test_a_pgbouncer_in_transaction_mode_is_refused_before_anything_is_migrated(database, tmp_path):
    bouncer = PgBouncer(tmp_path / "bouncer", database, "transaction")
    try:
        with pytest.raises(TransactionPoolerRefused) as refused:
            run(migrate(bouncer.url))
    finally:
        bouncer.stop()
    message = str(refused.value)
    assert "pooler in transaction mode" in message and "session mode" in message
    assert "docs/operations/postgres.md" in message
    assert not run(_on(database, "SELECT 1 FROM pg_tables WHERE tablename = 'schema_migrations'"))


async def _pids(url: str) -> tuple[int, int, int, int]:
    """(the pid asyncpg was told at connect, and its session's own) of a plain connection, then
    the same two of a pool connection (storage.db.create_pool's)."""
    from storage.db import create_pool

    raw = await asyncpg.connect(url)
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            return (raw.get_server_pid(), await raw.fetchval("SELECT pg_backend_pid()"),
                    conn.get_server_pid(), await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await pool.close()
        await raw.close()


@needs_pgbouncer
def test_a_pgbouncer_in_session_mode_is_accepted_and_its_connections_know_their_session_pid(database, tmp_path):
    bouncer = PgBouncer(tmp_path / "bouncer", database, "session")
    try:
        applied = run(migrate(bouncer.url))
        told_raw, session_raw, told_pooled, session_pooled = run(_pids(bouncer.url))
    finally:
        bouncer.stop()
    assert applied == [name for _, name, _ in migration_files()]
    # PgBouncer makes up the pid it tells a client; lost-commit resolution ends a backend by
    # pid, so a pool connection gives its session's own.
    assert told_raw != session_raw
    assert told_pooled == session_pooled


def test_a_direct_pool_connection_gives_its_session_pid(database):
    told_raw, session_raw, told_pooled, session_pooled = run(_pids(database))
    assert told_raw == session_raw
    assert told_pooled == session_pooled
