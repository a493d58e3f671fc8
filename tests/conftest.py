"""One real service per test session: Postgres, Ray, shard actors, Serve on loopback.

Postgres is the embedded pgserver in a temporary folder, or a fresh database on the server
that METERGATE_DATABASE_URL points at. Ray starts once (it takes seconds) and stops at the end.
Only fixtures live here; helpers shared by test files are in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from actors.placement import slot_of
from config.settings import Settings
from tests.helpers import (
    ADMIN_TOKEN,
    OUTBOUND_SECRET,
    SERVICE_TOKEN,
    STRIPE_SECRET_KEY,
    STRIPE_WEBHOOK_SECRET,
    SVIX_SECRET,
    Sql,
    database_url_named,
    free_port,
)
from tests.pgproxy import PgProxy
from tests.stripe_servers import stripe_on_loopback


def pytest_collection_modifyitems(config, items):
    """Tests that move the shared test clock run last: the rest of the session sees real time.
    Of those, the chaos model runs last: its random orgs (postpaid ones with usage among them)
    and its clock moves must not reach the time-travel tests' exact counts. A test that
    restores the database from a backup runs after all of them."""
    def order(item) -> tuple[bool, bool, bool]:
        moves_clock = item.get_closest_marker("time_travel") is not None
        restores = item.get_closest_marker("restores_database") is not None  # replaces the database: last
        return restores, moves_clock, moves_clock and "chaos" in item.path.parts

    items.sort(key=order)


@pytest.fixture(scope="session")
def receiver():
    from tests.webhook_receiver import Receiver

    running = Receiver(OUTBOUND_SECRET).start()
    yield running
    running.stop()


def _on_server(base_url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(base_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def service(tmp_path_factory, receiver):
    """The service, reaching Postgres through tests/pgproxy.py (`service.pg_proxy`), so that a
    test can cut its connection in the middle of a COMMIT."""
    from serve_app import launch
    from storage.db import start_embedded_postgres, stop_embedded_postgres

    data_dir: Path = tmp_path_factory.mktemp("metergate")
    external = os.environ.get("METERGATE_DATABASE_URL")
    database = f"metergate_test_{uuid.uuid4().hex[:10]}"
    pg_server = None
    with stripe_on_loopback(tmp_path_factory.mktemp("stripe")) as stripe_api_base:
        if external:  # a database of its own on that server, dropped at the end
            _on_server(external, f'CREATE DATABASE "{database}"')
            upstream_url = database_url_named(external, database)
        else:  # the embedded Postgres in the service's data folder, as launch would start it
            upstream_url, pg_server = start_embedded_postgres(data_dir)
        proxy = PgProxy(upstream_url)
        settings = Settings(
            database_url=proxy.url,
            data_dir=data_dir,
            http_port=free_port(),
            service_token=SERVICE_TOKEN,
            admin_token=ADMIN_TOKEN,
            shards=2,
            snapshot_every_entries=8,  # small, so tests cross snapshot + compaction often
            passivate_after_s=1,  # idle orgs leave memory within seconds: later steps reload them
            svix_webhook_secret=SVIX_SECRET,
            stripe_webhook_secret=STRIPE_WEBHOOK_SECRET,
            stripe_secret_key=STRIPE_SECRET_KEY,
            stripe_api_base=stripe_api_base,
            test_clock=True,
            webhook_urls=receiver.url,
            webhook_secret=OUTBOUND_SECRET,
            webhook_backoff_s=1,
            webhook_max_attempts=4,
            dashboard=False,  # its processes cost CPU the tests need; tests/test_metrics.py scrapes instead
            allowed_return_origins="https://app.example.com",  # tests.helpers.URLS
            max_feed_streams_per_token=8,  # low, so that test_security.py can reach it
            org_token_burst=200,  # tests use one org token for many routes; test_security.py loops past it
            metrics_port=free_port(),
        )
        running = None
        try:
            running = launch.start(settings, ray_init_kwargs={"num_cpus": 2})
            running.pg_server = pg_server  # stopped with the service (tests restart it)
            running.pg_proxy = proxy
            yield running
        finally:
            if running is not None:
                launch.stop(running)
            elif pg_server is not None:
                stop_embedded_postgres(pg_server)
            proxy.stop()
            if external:
                _on_server(external, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def admin(service):
    with httpx.Client(base_url=service.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        yield client


@pytest.fixture(scope="session")
def compute(service):
    with httpx.Client(base_url=service.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
        yield client


@pytest.fixture(scope="session")
def sql(service) -> Sql:
    return Sql(service.settings.database_url)


_org_numbers = itertools.count(1)


@pytest.fixture
def org_id_on(service):
    """A new org id whose slot maps to the given shard."""

    def make(shard: int, prefix: str = "org") -> str:
        while True:
            candidate = f"{prefix}_{uuid.uuid4().hex[:8]}_{next(_org_numbers)}"
            if service.slot_map[slot_of(candidate)] == shard:
                return candidate

    return make


@pytest.fixture
def new_org(admin):
    """Create an org through the API; returns its id."""

    def make(plan_id: str | None = None, billing_mode: str = "prepaid", org_id: str | None = None) -> str:
        org_id = org_id or f"org_{uuid.uuid4().hex[:12]}"
        body = {"org_id": org_id, "email": f"{org_id}@example.com", "billing_mode": billing_mode}
        if plan_id:
            body["plan_id"] = plan_id
        response = admin.post("/v1/orgs", json=body)
        assert response.status_code == 201, response.text
        return org_id

    return make


@pytest.fixture(scope="module")
def shard_database(service):
    """A database of its own on the session's Postgres, for a shard run in this process (it
    claims shard 0 there, apart from the service's)."""
    from storage.db import migrate
    from storage.slots import ensure_slots

    name = f"metergate_shard_{uuid.uuid4().hex[:10]}"

    async def on_server(statement: str) -> None:
        conn = await asyncpg.connect(service.settings.database_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def prepare(url: str) -> None:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await ensure_slots(conn, 1)
        finally:
            await conn.close()

    asyncio.run(on_server(f'CREATE DATABASE "{name}"'))
    url = database_url_named(service.settings.database_url, name)
    asyncio.run(prepare(url))
    yield url
    asyncio.run(on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
