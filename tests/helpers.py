"""Helpers shared by several test files. Fixtures live in conftest.py; test files import
helpers from here, never from one another."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import datetime, timezone

import asyncpg
import httpx
import ray
import stripe
from svix.webhooks import Webhook

from actors.metering import LeaseUsage
from actors.org import Effects, OrgBillingActor
from actors.placement import NAMESPACE, shard_name
from actors.timeutil import US_PER_S, rfc3339_to_us
from serve_app.launch import unshared_port
from config.catalog import load_catalog
from config.settings import DEFAULT_CATALOG

# ----- secrets and tokens of the test service ------------------------------------------

SERVICE_TOKEN = "test-service-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
STRIPE_SECRET_KEY = "sk_test_metergate_loopback"
STRIPE_WEBHOOK_SECRET = "whsec_test_stripe_endpoint_secret_0123"
SVIX_SECRET = "whsec_" + base64.b64encode(b"metergate-test-svix-secret-32-b!").decode()
OUTBOUND_SECRET = "whsec_" + base64.b64encode(b"metergate-outbound-secret-32-by!").decode()


# ----- waiting and ports -------------------------------------------------------------------


def wait_for(what: str, probe, timeout_s: float = 30.0):
    """probe() until it gives something truthy (returned), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


_handed_out: set[int] = set()  # never the same port twice in one process, free or not


def free_port() -> int:
    """A TCP port free on every interface now, for a server that may have to bind it again
    later (HAProxy replaced after a kill, a service restarted): launch.unshared_port's, below
    the ephemeral range and outside Serve's replica ports, and never one handed out before."""
    for _ in range(200):
        port = unshared_port()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no TCP port free that this process has not handed out already")


class Sql:
    """Direct reads of the service's Postgres, to check what it wrote."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, method: str, query: str, *args):
        async def go():
            conn = await asyncpg.connect(self.url)
            try:
                return await getattr(conn, method)(query, *args)
            finally:
                await conn.close()

        return asyncio.run(go())

    def fetch(self, query: str, *args):
        return self._run("fetch", query, *args)

    def val(self, query: str, *args):
        return self._run("fetchval", query, *args)


# ----- usage ticks and what the service wrote ----------------------------------------------

# payg: 4 GiB × 3600 s × 4,500 nanos + 2 vCPU × 3600 s × 14,000 nanos = 165,600 micro-USD
HOUR_TICK_MICROS = 165_600
SIGNUP_MICROS = 5_000_000


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hour_tick(org_id: str, tick_id: str, lease_id: str = "sbx_1") -> dict:
    return {"tick_id": tick_id, "org_id": org_id, "lease_id": lease_id, "started_at": now_rfc3339(),
            "duration_ms": 3_600_000, "memory_mb": 4096, "cpu_count": 2, "disk_mb": 0}


def database_url_named(base_url: str, name: str) -> str:
    """The URL of database `name` on the server of `base_url`."""
    head, _, tail = base_url.rpartition("/")
    query = "?" + tail.split("?", 1)[1] if "?" in tail else ""
    return f"{head}/{name}{query}"


def migrated_database(folder, label: str):
    """A generator for a module fixture: the URL of a new, migrated database named after
    `label` (on METERGATE_DATABASE_URL's server, else on an embedded one started in `folder`),
    dropped (or its server stopped) when the generator is closed."""
    import os
    from urllib.parse import urlsplit, urlunsplit

    from storage.db import migrate, start_embedded_postgres, stop_embedded_postgres

    external = os.environ.get("METERGATE_DATABASE_URL")
    server = None
    if external:
        base = external
    else:
        base, server = start_embedded_postgres(folder)
    name = f"metergate_{label}_{uuid.uuid4().hex[:10]}"

    async def on_server(statement: str) -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(on_server(f'CREATE DATABASE "{name}"'))
    url = urlunsplit(urlsplit(base)._replace(path=f"/{name}"))  # (pgserver's URL keeps its socket query)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    if server is not None:
        stop_embedded_postgres(server)


def ledger_sum(sql, org_id: str) -> int:
    return sql.val("SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger WHERE org_id = $1", org_id)


def outbox(sql, org_id: str, event_type: str) -> list[dict]:
    rows = sql.fetch("SELECT payload FROM outbox WHERE org_id = $1 AND type = $2 ORDER BY id", org_id, event_type)
    return [json.loads(r["payload"]) for r in rows]


def footprint(sql, org_id: str) -> tuple:
    """Everything a request could have changed for the org."""
    return (
        sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", org_id),
        sql.val("SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger WHERE org_id = $1", org_id),
        sql.val("SELECT count(*) FROM outbox WHERE org_id = $1", org_id),
        sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = $1", org_id),
    )


def assert_error(response: httpx.Response, status: int, code: str, mentions: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in response.text
    if mentions is not None:
        assert mentions in response.text


# ----- the shared test clock (only tests marked time_travel may move it) -------------------


def clock_us(admin) -> int:
    response = admin.get("/v1/test-clock")
    assert response.status_code == 200, response.text
    return response.json()["now_us"]


def advance(admin, seconds: int) -> dict:
    response = admin.post("/v1/test-clock/advance", json={"seconds": seconds})
    assert response.status_code == 200, response.text
    return response.json()


# ----- streams of small ticks, and shard processes (crash and durability tests) ------------

# payg: 1 GiB × 10 s × 4,500 nanos = 45,000 nanos = 45 micro-USD per tick, no remainder.
TICK_MICROS = 45
TICKS_PER_REQUEST = 50
RETRY_LIMIT_S = 90


def tick_batch(org_ids: list[str], request_no: int) -> dict:
    return {"ticks": [
        {"tick_id": f"r{request_no}-t{n}", "org_id": org_ids[n % len(org_ids)], "lease_id": f"sbx{n % 3}",
         "started_at": now_rfc3339(), "duration_ms": 10_000, "memory_mb": 1024}
        for n in range(TICKS_PER_REQUEST)]}


def send_until_acknowledged(client: httpx.Client, body: dict) -> httpx.Response:
    deadline = time.monotonic() + RETRY_LIMIT_S
    while True:
        try:
            response = client.post("/v1/usage", json=body)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the shard did not come back in time"
        time.sleep(0.2)


def shard_pid(shard: int) -> int:
    handle = ray.get_actor(shard_name(shard), namespace=NAMESPACE)
    return ray.get(handle.ready.remote(), timeout=60)["pid"]


# ----- Stripe webhooks, org tokens, self-serve ---------------------------------------------


def svix_headers(body: bytes, at: int | None = None, secret: str = SVIX_SECRET, message_id: str | None = None) -> dict:
    """Svix's headers for `body`, signed with the svix library for `at` (epoch s, now by
    default: any instant, for tests of the tolerance)."""
    at = int(time.time()) if at is None else at
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(at, tz=timezone.utc),
                                     body.decode("utf-8", errors="surrogateescape"))
    return {"svix-id": message_id, "svix-timestamp": str(at), "svix-signature": signature}


def svix_signed(payload: dict, **kwargs) -> tuple[bytes, dict]:
    """A Svix webhook body and its headers (svix_headers' arguments)."""
    body = json.dumps(payload).encode()
    return body, {**svix_headers(body, **kwargs), "content-type": "application/json"}


def stripe_event(kind: str, obj: dict, created: int | None = None) -> dict:
    return {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
            "created": created or int(time.time()), "data": {"object": obj}}


def stripe_signed(evt: dict, secret: str = STRIPE_WEBHOOK_SECRET, at: int | None = None) -> tuple[bytes, dict]:
    payload = json.dumps(evt)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=at or int(time.time()))
    return payload.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


def stripe_deliver(client, evt: dict, **kwargs):
    body, headers = stripe_signed(evt, **kwargs)
    return client.post("/webhooks/stripe", content=body, headers=headers)


def org_client(service, token: str) -> httpx.Client:
    return httpx.Client(base_url=service.base_url, timeout=30, headers={"Authorization": f"Bearer {token}"})


def mint(admin, org_id: str, ttl_s: int = 3600) -> str:
    response = admin.post(f"/v1/orgs/{org_id}/tokens", json={"ttl_s": ttl_s})
    assert response.status_code == 201, response.text
    assert response.json()["org_id"] == org_id
    return response.json()["token"]


URLS = {"success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/cancel"}


def fake_sessions(service, org: str) -> list[dict]:
    sessions = httpx.get(f"{service.settings.stripe_api_base}/_fake/sessions", timeout=10).json()
    return [s for s in sessions if s.get("client_reference_id") == org or s.get("metadata", {}).get("org_id") == org]


def stripe_client(service) -> stripe.StripeClient:
    return stripe.StripeClient(STRIPE_SECRET_KEY, base_addresses={"api": service.settings.stripe_api_base},
                               max_network_retries=0)


# ----- the pure billing core (builders of the *_core tests) --------------------------------

CATALOG = load_catalog(DEFAULT_CATALOG)
PAYG = CATALOG.plan_version("payg", 1)
HOBBY = CATALOG.plan_version("hobby_weekly", 1)
FREE = CATALOG.plan_version("free", 1)

ORG_ID = "org_acme"
T0 = rfc3339_to_us("2026-03-02T09:00:00Z")  # a Monday, ISO week 2026-W10
DAY_US = 86_400 * US_PER_S


def rebuilt_from(start: bytes, journal: list[bytes], live: OrgBillingActor) -> OrgBillingActor:
    """The org rebuilt from its first snapshot (msgpack) and the journal rows after it, as a
    shard recovers it; asserts it equals the live one (a replay decides the same)."""
    import msgspec

    from actors.commands import JOURNAL_DECODER, replay
    from actors.org import OrgSnapshot

    org = OrgBillingActor.from_snapshot(msgspec.msgpack.decode(start, type=OrgSnapshot), CATALOG)
    for entry in journal:
        replay(org, JOURNAL_DECODER.decode(entry), CATALOG)
    assert org.to_snapshot() == live.to_snapshot()
    return org


def make_org(plan=PAYG, prepaid=True, signup_micros=CATALOG.signup_grant_micros,
             tier="base", now_us=T0, card=False, low_balance_micros=0,
             runway_alert_s=CATALOG.runway_alert_s) -> tuple[OrgBillingActor, Effects]:
    fx = Effects()
    org = OrgBillingActor.create(ORG_ID, "ops@acme.test", prepaid, plan, tier, CATALOG.tiers[tier],
                                 CATALOG.default_max_disk_mb, signup_micros, now_us, fx, low_balance_micros,
                                 runway_alert_s)
    if card:  # a card on file: running out says halted / quota_exceeded, not no_payment_method
        org.has_payment_method = True
    return org, fx


def usage_costing(micros: int, lease_id: str = "ls_bill") -> LeaseUsage:
    """Usage whose catalog cost is exactly `micros` µUSD.

    221,184 MB·ms of memory cost 995.328 nano-USD and 2 vCPU·ms cost 28 nano-USD: together
    exactly one micro-USD, with no remainder.
    """
    return LeaseUsage(lease_id, memory_mb_ms=221_184 * micros, cpu_ms=2 * micros, ticks=1)
