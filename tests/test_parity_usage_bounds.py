"""Usage parity's bounds (docs/operations/parity.md; review of issue 22 part 3), without Ray:

- the metered side sums only the hours a report needs: a window far over the org-hour limit is
  refused after reading the first hours, not after summing every rollup of the window;
- a report's queries run under a statement_timeout, answered as a 422 that says what to do;
- only a report over every org sets the gauges (one org's report is not the service's parity);
- `parity usage post` reads lines on LF only and refuses an org and hour given twice.

The storage and route tests run on an embedded Postgres of their own (or a database on
METERGATE_DATABASE_URL's server), with the parity routes mounted in this process.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from actors.timeutil import us_to_rfc3339
from cli.client import CliError
from cli.parity_usage import read_lines
from config.catalog import load_catalog
from config.settings import Settings
from serve_app.context import Context
from serve_app.errors import install_error_handlers
from serve_app.routes import parity as parity_routes
from storage import parity
from storage.times import us_to_dt
from tests.helpers import migrated_database

HOUR_US = 3_600_000_000
MINUTE_US = 60_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
ADMIN = "mg_adm_" + "a" * 30


# ----- the CLI's file (no service) ------------------------------------------------------------


def line(org_id: str, hour: str | int, **quantities) -> dict:
    return {"org_id": org_id, "hour": hour, "memory_mb_ms": 1, **quantities}


def test_a_json_string_holding_a_unicode_line_separator_stays_one_line(tmp_path):
    """U+2028, U+2029 and U+0085 are valid raw inside a JSON string; str.splitlines() cut the
    line there and called it not JSON."""
    file = tmp_path / "platform.jsonl"
    rows = [line("org_a", "2026-01-01T10:00:00Z", units={f"a{sep}b": 1}) for sep in ("\u2028", "\u2029", "\x85")]
    rows = [{**row, "org_id": f"org_{k}"} for k, row in enumerate(rows)]
    file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), encoding="utf-8")
    assert read_lines(file) == [(k + 1, row) for k, row in enumerate(rows)]


def test_an_org_and_hour_on_two_lines_is_refused_naming_the_lines(tmp_path):
    """The service refuses an org and hour twice in one post; across two posts the second
    silently replaced the first. The file is refused before anything is sent, naming each
    org-hour given twice and its lines, the same hour in another spelling included."""
    file = tmp_path / "platform.jsonl"
    rows = [line("org_a", "2026-01-01T10:00:00Z"), line("org_b", "2026-01-01T10:00:00Z"),
            line("org_a", "2026-01-01T11:00:00Z"), line("org_a", 1_767_261_600, memory_mb_ms=2),
            line("org_b", "2026-01-01T10:00:00+00:00"), line("org_a", "2026-01-01T10:00:00Z")]
    file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(CliError) as refused:
        read_lines(file)
    assert str(refused.value) == (
        f"{file}: 2 org-hours on more than one line: org_a at 2026-01-01T10:00:00Z on lines 1, 4, 6; "
        "org_b at 2026-01-01T10:00:00Z on lines 2, 5. Give each org and hour once; nothing was posted")
    file.write_text("\n".join(json.dumps(row) for row in rows[:3]))
    assert [number for number, _ in read_lines(file)] == [1, 2, 3]


# ----- storage and the route, on Postgres ---------------------------------------------------


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    """A new, migrated database; dropped (or its server stopped) at the end."""
    yield from migrated_database(tmp_path_factory.mktemp("parity_bounds"), "parity")


ORGS = 30
HOURS = 40
LEASES = 2
MINUTES = (0, 59)  # two minutes of each hour, at its ends


def rollup_of(org: int, hour: int, lease: int, minute: int) -> tuple[int, int, int, str | None]:
    """(memory_mb_ms, cpu_ms, disk_mb_ms, units) of one seeded rollup row: all different."""
    base = ((org * HOURS + hour) * LEASES + lease) * 100 + minute
    return base * 1_000, base, base % 7, json.dumps({"ingest_bytes": base}) if org % 3 == 0 else None


@pytest.fixture(scope="module")
def seeded(database_url):
    """usage_rollups: ORGS orgs x HOURS hours from START_US x LEASES leases x MINUTES, analysed
    (as autovacuum would have, on a table this size)."""
    async def seed() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            rows = [(f"org_b{org:02d}", f"lease_{lease}", us_to_dt(START_US + hour * HOUR_US + minute * MINUTE_US),
                     *rollup_of(org, hour, lease, minute))
                    for org in range(ORGS) for hour in range(HOURS) for lease in range(LEASES) for minute in MINUTES]
            await conn.executemany(
                "INSERT INTO usage_rollups (org_id, lease_id, minute, memory_mb_ms, cpu_ms, disk_mb_ms, ticks,"
                " cost_scaled, units) VALUES ($1, $2, $3, $4, $5, $6, 1, 0, $7::jsonb)", rows)
            await conn.execute("ANALYZE usage_rollups")
        finally:
            await conn.close()

    asyncio.run(seed())
    return database_url


def expected_hour(org: int, hour: int) -> parity.HourUsage:
    parts = [rollup_of(org, hour, lease, minute) for lease in range(LEASES) for minute in MINUTES]
    units = sum(json.loads(u)["ingest_bytes"] for *_, u in parts if u)
    return parity.HourUsage(f"org_b{org:02d}", START_US + hour * HOUR_US, sum(p[0] for p in parts),
                            sum(p[1] for p in parts), sum(p[2] for p in parts),
                            {"ingest_bytes": units} if units else {})


async def rows_read(conn: asyncpg.Connection, call) -> tuple[object, int]:
    """call()'s answer, and the usage_rollups rows this backend read for it (by any scan)."""
    async with conn.transaction():
        answer = await call()
        read = await conn.fetchval(
            "SELECT pg_stat_get_xact_tuples_returned('usage_rollups'::regclass)"
            " + pg_stat_get_xact_tuples_fetched('usage_rollups'::regclass)")
    return answer, read


def test_the_metered_side_sums_each_org_and_hour_exactly(seeded):
    async def check() -> None:
        conn = await asyncpg.connect(seeded)
        try:
            window = (START_US + 3 * HOUR_US, START_US + 7 * HOUR_US)
            every = await parity.metered(conn, *window, None, 10_000)
            assert every == [expected_hour(org, hour) for hour in range(3, 7) for org in range(ORGS)]
            one = await parity.metered(conn, *window, "org_b03", 10_000)
            assert one == [expected_hour(3, hour) for hour in range(3, 7)]
            assert await parity.metered(conn, *window, "org_nobody", 10_000) == []
        finally:
            await conn.close()

    asyncio.run(check())


def test_a_window_over_the_limit_reads_only_the_hours_up_to_the_limit(seeded):
    """The whole window holds ORGS x HOURS org-hours; with a limit of 45 the answer is full after
    the second hour, and only those two hours' rollups may be read (the GROUP BY over the window
    read all HOURS hours' of them before its LIMIT)."""
    per_hour = ORGS * LEASES * len(MINUTES)

    async def check() -> None:
        conn = await asyncpg.connect(seeded)
        try:
            window = (START_US, START_US + HOURS * HOUR_US)
            found, read = await rows_read(conn, lambda: parity.metered(conn, *window, None, 45))
            assert len(found) == 45
            assert read <= 2 * per_hour, (read, per_hour)
            found, read = await rows_read(conn, lambda: parity.metered(conn, *window, "org_b07", 3))
            assert found == [expected_hour(7, hour) for hour in range(3)]
            assert read <= 3 * per_hour, read  # the three hours it needed, at most
            # Over the limit on the metered side: report_sides says so (None).
            assert await parity.report_sides(conn, *window, None, 44, 10_000) is None
        finally:
            await conn.close()

    asyncio.run(check())


def test_a_report_past_its_statement_timeout_is_report_timed_out(seeded):
    """A query that waits (here for a lock another session holds) past the timeout is cancelled
    by Postgres and told as ReportTimedOut, and the connection is usable after it."""
    async def check() -> None:
        locker, conn = await asyncpg.connect(seeded), await asyncpg.connect(seeded)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(parity.ReportTimedOut):
                    await parity.report_sides(conn, START_US, START_US + HOUR_US, None, 10, 300)
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            sides = await parity.report_sides(conn, START_US, START_US + HOUR_US, "org_b01", 10, 10_000)
            assert sides == ([expected_hour(1, 0)], [])
        finally:
            await locker.close()
            await conn.close()

    asyncio.run(check())


def app_on(url: str, tmp_path) -> FastAPI:
    settings = Settings(data_dir=tmp_path, database_url=url, service_token="mg_svc_" + "s" * 30, admin_token=ADMIN,
                        org_token_secret="o" * 32)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(parity_routes.routes(Context(settings, load_catalog(settings.catalog), router=None)))
    return app


def run_requests(app: FastAPI, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Each (method, params) on /v1/parity/usage in turn, as the admin."""
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            return [await client.request(method, "/v1/parity/usage", params=params) for method, params in requests]

    return asyncio.run(go())


def hours(first: int, count: int) -> dict:
    return {"from": us_to_rfc3339(START_US + first * HOUR_US),
            "to": us_to_rfc3339(START_US + (first + count) * HOUR_US)}


def test_only_a_report_over_every_org_sets_the_gauges(seeded, tmp_path, monkeypatch):
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(parity_routes.metrics, "usage_parity_reported", lambda *counts: set_to.append(counts))
    every, one = run_requests(app_on(seeded, tmp_path), [("GET", hours(0, 2)),
                                                         ("GET", {**hours(0, 3), "org_id": "org_b05"})])
    assert every.status_code == 200 and one.status_code == 200, (every.text, one.text)
    assert (every.json()["checked"], one.json()["checked"]) == (2 * ORGS, 3)
    assert set_to == [(2 * ORGS, 2 * ORGS)]  # every org-hour is only metergate's: all outside


def test_a_report_past_its_timeout_is_a_422_saying_to_narrow_it(seeded, tmp_path, monkeypatch):
    monkeypatch.setattr(parity_routes, "REPORT_TIMEOUT_MS", 300)
    app = app_on(seeded, tmp_path)

    async def go() -> httpx.Response:
        locker = await asyncpg.connect(seeded)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE")
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                             headers={"Authorization": f"Bearer {ADMIN}"}) as client:
                    return await client.get("/v1/parity/usage", params=hours(0, 1))
        finally:
            await locker.close()

    answer = asyncio.run(go())
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == {
        "code": "invalid_request", "field": "to",
        "message": "the window took longer than 300 ms to sum: narrow it, or pass org_id"}
