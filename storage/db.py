"""Connections, the embedded Postgres, and migrations."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import asyncpg

log = logging.getLogger("metergate.storage")

# Any constant works as long as every migrator uses it: it serialises concurrent start-ups.
_MIGRATION_LOCK = 7_310_001


def start_embedded_postgres(data_dir: Path) -> tuple[str, object]:
    """Start (or reuse) an embedded Postgres in data_dir/pg; returns (url, server handle).

    The handle stops the server when the last process holding one exits.
    """
    import pgserver  # only the embedded path needs it

    pg_dir = Path(data_dir) / "pg"
    pg_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pg_dir, cleanup_mode="stop")
    return server.get_uri(), server


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
                await conn.execute(sql)
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
