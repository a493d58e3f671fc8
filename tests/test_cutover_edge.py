"""The shadow/cutover edge without the service (billing-rules 2.12): the CLI's choice of the
cutover hour, the capability token of a lease granted in shadow, and the meter row the edge
writes after a refused undo, a create and an import (against fakes of the router and storage)."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from actors.timeutil import us_to_rfc3339
from cli import client as cli_client
from cli.main import app

HOUR_US = 3_600 * 1_000_000
SERVICE_NOW_US = 1_900_000_000 * 1_000_000 + 1_234_567  # the service's (test) clock, far from this machine's
OLD_CUTOVER_US = (SERVICE_NOW_US // HOUR_US - 30) * HOUR_US  # an org cut over long ago


def _fake_service(puts: list[tuple[str, dict]], test_clock: bool = True):
    def handler(request: httpx.Request) -> httpx.Response:
        date = {"Date": "Mon, 07 Dec 2026 23:10:00 GMT"}
        if request.method == "GET" and request.url.path == "/v1/test-clock":
            if not test_clock:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such route"}},
                                      headers=date)
            return httpx.Response(200, json={"now": us_to_rfc3339(SERVICE_NOW_US), "now_us": SERVICE_NOW_US,
                                             "offset_s": 0}, headers=date)
        if request.method == "PUT" and request.url.path.endswith("/enforcement"):
            org = request.url.path.split("/")[3]
            body = json.loads(request.content)
            puts.append((org, body))
            if org == "org-old":  # enforced already: left as it is, its old cutover answered
                return httpx.Response(200, json={"enforcement": "enforce", "cutover_at": us_to_rfc3339(OLD_CUTOVER_US)},
                                      headers=date)
            at = body.get("at") or us_to_rfc3339((SERVICE_NOW_US // HOUR_US + 1) * HOUR_US)
            return httpx.Response(200, json={"enforcement": "shadow", "cutover_at": at}, headers=date)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}}, headers=date)
    return handler


@pytest.fixture
def fake_http(monkeypatch):
    puts: list[tuple[str, dict]] = []
    state = {"test_clock": True}
    real = httpx.Client

    def client(*args, **kwargs):
        return real(*args, transport=httpx.MockTransport(_fake_service(puts, state["test_clock"])), **kwargs)

    monkeypatch.setattr(cli_client.httpx, "Client", client)
    monkeypatch.setenv("METERGATE_URL", "http://metergate.test")
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", "t" * 40)
    return puts, state


def test_a_cutover_without_at_sends_every_org_the_next_hour_of_the_service_clock_never_an_old_cutover(fake_http):
    puts, _ = fake_http
    result = CliRunner().invoke(app, ["cutover", "org-old", "org-a", "org-b", "--json"])
    assert result.exit_code == 0, result.output
    next_hour = us_to_rfc3339((SERVICE_NOW_US // HOUR_US + 1) * HOUR_US)
    assert [org for org, _ in puts] == ["org-old", "org-a", "org-b"]
    assert all(body == {"mode": "enforce", "at": next_hour} for _, body in puts), puts
    assert json.loads(result.stdout)["summary"]["cutover_at"] == next_hour


def test_without_a_test_clock_the_hour_comes_from_the_services_date_header(fake_http):
    puts, state = fake_http
    state["test_clock"] = False
    result = CliRunner().invoke(app, ["cutover", "org-old", "org-a", "--json"])
    assert result.exit_code == 0, result.output
    assert [body.get("at") for _, body in puts] == ["2026-12-08T00:00:00Z"] * 2, puts


# --- 2. A lease granted or renewed in shadow: a token of at most GATE_TOKEN_TTL_S ---------------

def _claims(token: str) -> dict:
    from metergate_client.captoken import unb64
    return json.loads(unb64(token.split(".")[1]))


def _lease_tokens(monkeypatch, shadow: bool, cut_over: bool = False) -> list[dict]:
    """The claims of the tokens of a new lease (ttl 3,600 s), the same lease again and its
    renewal, through the shard's answers (actors/batch.py) and the edge's signer."""
    from types import SimpleNamespace

    from actors import batch
    from actors.commands import AcquireLease, RenewLease, SetEnforcement
    from actors.org import Resources
    from serve_app import compute
    from serve_app.captokens import CapabilitySigner
    from metergate_client.captoken import b64
    from tests.test_shadow_core import Org

    o = Org(shadow=shadow)
    ctx = SimpleNamespace(capabilities=CapabilitySigner(b64(bytes(range(32)))))
    claims = []
    for command in (AcquireLease("ls_1", Resources(memory_mb=1_024, cpu_count=1), 3_600),
                    AcquireLease("ls_1", Resources(memory_mb=1_024, cpu_count=1), 3_600), RenewLease("ls_1")):
        if cut_over and isinstance(command, RenewLease):
            o.run(SetEnforcement("enforce", o.now))  # cut over now: the renewal is an enforced org's
        outcome = o.run(command)
        reply = batch.answer(outcome, o.org, o.now)
        monkeypatch.setattr(compute, "now_us", lambda: o.now)
        token = compute.lease_token(ctx, "org_s", reply)["capability_token"]
        claims.append(_claims(token))
    return claims


def test_a_lease_granted_or_renewed_in_shadow_gets_a_token_of_a_gate_checks_ttl(monkeypatch):
    from serve_app.captokens import GATE_TOKEN_TTL_S
    for c in _lease_tokens(monkeypatch, shadow=True):
        assert c["exp"] - c["iat"] <= GATE_TOKEN_TTL_S, c
        assert c["lease_id"] == "ls_1"


def test_an_enforced_orgs_lease_token_lasts_as_the_lease_and_so_does_a_renewal_after_the_cutover(monkeypatch):
    for c in _lease_tokens(monkeypatch, shadow=False):
        assert c["exp"] - c["iat"] >= 3_500, c
    new, again, renewed = _lease_tokens(monkeypatch, shadow=True, cut_over=True)
    assert renewed["exp"] - renewed["iat"] >= 3_500, renewed


# --- 3 and 4. The meter's row the edge writes, against fakes of the shards and of Postgres -----

class FakeDb:
    """org_enforcement rows and meter events' statuses, with storage/enforcement.py's functions
    over them (as the real ones change them), and the orgs the `orgs` table has."""

    def __init__(self, rows=None, events=None, orgs=()) -> None:
        self.rows = dict(rows or {})
        self.events = dict(events or {})  # identifier -> (org_id, hour_us, status)
        self.orgs = set(orgs)

    def patch(self, monkeypatch):
        from storage import enforcement
        monkeypatch.setattr(enforcement, "get", self.get)
        monkeypatch.setattr(enforcement, "write", self.write)
        monkeypatch.setattr(enforcement, "begin_undo", self.begin_undo)
        monkeypatch.setattr(enforcement, "revert_undo", self.revert_undo)
        monkeypatch.setattr(enforcement, "shadow_new_orgs", self.shadow_new_orgs)
        monkeypatch.setattr(enforcement, "forget", self.forget)

    async def get(self, conn, org_id):
        return self.rows.get(org_id)

    async def write(self, conn, org_id, row):
        if row is None or (not row.shadow and row.cutover_us is None):
            self.rows.pop(org_id, None)
        else:
            self.rows[org_id] = row

    async def begin_undo(self, conn, org_id, cutover_us):
        from storage.enforcement import Row
        moved = [i for i, (o, h, s) in self.events.items() if o == org_id and h >= cutover_us and s == "pending"]
        for i in moved:
            self.events[i] = (org_id, self.events[i][1], "shadow")
        await self.write(conn, org_id, Row(True, None))
        return moved

    async def revert_undo(self, conn, org_id, before, moved):
        await self.write(conn, org_id, before)
        for i in moved:
            o, h, s = self.events[i]
            if s == "shadow":
                self.events[i] = (o, h, "pending")

    async def shadow_new_orgs(self, conn, org_ids):
        from storage.enforcement import Row
        made = [o for o in org_ids if o not in self.orgs and o not in self.rows]
        for o in made:
            self.rows[o] = Row(True, None)
        return made

    async def forget(self, conn, org_ids):
        for o in org_ids:
            self.rows.pop(o, None)


class FakeCtx:
    """A replica's context: `db()` a pool of no-op connections, `router` answering each org's
    command with `answers[org_id]` (a dict, or a callable of the command) and its state."""

    def __init__(self, db: FakeDb, states: dict, answers: dict, enforcement: str = "enforce") -> None:
        from types import SimpleNamespace
        self.fake = db
        self.states = states
        self.answers = answers
        self.settings = SimpleNamespace(enforcement=enforcement)
        self.router = SimpleNamespace(command=self._command, state=self._state)
        self.commands: list = []

    async def db(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def acquire():
            yield object()
        from types import SimpleNamespace
        return SimpleNamespace(acquire=acquire)

    async def _command(self, org_id, command, *rest):
        self.commands.append((org_id, command))
        answer = self.answers[org_id]
        return answer(command) if callable(answer) else answer

    async def _state(self, org_id):
        if org_id not in self.states:
            return {"error": {"code": "unknown_org", "message": f"no org {org_id}"}}
        return {"state": self.states[org_id]}


def _state(enforcement: str, cutover_us: int | None):
    from types import SimpleNamespace
    return SimpleNamespace(enforcement=enforcement, cutover_us=cutover_us)


CHARGED = {"error": {"code": "cutover_charged", "message": "a charge was asked since the cutover"}}
T = 1_800_000_000 * 1_000_000 // HOUR_US * HOUR_US


def _undo(monkeypatch, db: FakeDb):
    import asyncio

    from serve_app.bodies import EnforcementBody
    from serve_app.errors import ApiError
    from serve_app.routes import orgs as org_routes

    async def exists(org_id):
        return None
    db.patch(monkeypatch)
    monkeypatch.setattr(org_routes, "require_org", lambda ctx, org_id: exists(org_id))
    ctx = FakeCtx(db, {"org_c": _state("enforce", T)}, {"org_c": CHARGED})
    with pytest.raises(ApiError) as refused:
        asyncio.run(org_routes._set_enforcement(ctx, "org_c", EnforcementBody(mode="shadow", undo=True), None))
    assert refused.value.code == "cutover_charged"


def test_an_undo_refused_as_charged_puts_back_the_orgs_cutover_row_and_its_events(monkeypatch):
    from storage.enforcement import Row
    db = FakeDb({"org_c": Row(False, T)}, {"e1": ("org_c", T, "pending"), "e0": ("org_c", T - HOUR_US, "consumed")})
    _undo(monkeypatch, db)
    assert db.rows["org_c"] == Row(False, T)
    assert db.events == {"e1": ("org_c", T, "pending"), "e0": ("org_c", T - HOUR_US, "consumed")}


def test_a_retried_undo_refused_as_charged_writes_the_row_of_the_orgs_state_not_the_first_attempts_shadow_row(
        monkeypatch):
    """The first attempt wrote the shadow row and moved the pending events to 'shadow', then its
    outcome was unknown (5xx); the retry reads that shadow row as `before`. The org refuses:
    it is enforced, cut over at T, so its row is the cutover's (the meter job then releases
    the held events from T on), not shadow for ever."""
    from storage.enforcement import Row
    db = FakeDb({"org_c": Row(True, None)}, {"e1": ("org_c", T, "shadow")})
    _undo(monkeypatch, db)
    assert db.rows.get("org_c") == Row(False, T)


def _write_many(db: FakeDb):
    async def write_many(conn, rows):
        for org_id, row in rows.items():
            await db.write(conn, org_id, row)
    return write_many


def test_a_create_of_an_org_enforced_drops_a_shadow_row_an_earlier_create_left(monkeypatch):
    """A create in shadow wrote the row, then crashed (or was refused) before the org was made;
    the org created later enforced must not keep that row (its meter withheld for ever)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve_app.routes import orgs as org_routes
    from storage.enforcement import Row
    from tests.helpers import CATALOG

    db = FakeDb({"org_n": Row(True, None)})
    db.patch(monkeypatch)
    monkeypatch.setattr(org_routes, "org_view", lambda state: {"enforcement": state.enforcement})
    ctx = FakeCtx(db, {}, {"org_n": {"created": True, "state": _state("enforce", None)}})
    ctx.catalog = CATALOG
    ctx.admin = lambda request: None
    app = FastAPI()
    app.include_router(org_routes.routes(ctx))
    answer = TestClient(app).post("/v1/orgs", json={"org_id": "org_n", "email": "ops@acme.test"})
    assert answer.status_code == 201, answer.text
    assert "org_n" not in db.rows


def test_an_import_of_an_org_enforced_drops_a_shadow_row_an_earlier_run_left(monkeypatch):
    from serve_app.routes import imports as import_routes
    from storage import enforcement
    from storage.enforcement import Row

    db = FakeDb({"org_i": Row(True, None), "org_s": Row(True, None), "org_r": Row(True, None),
                 "org_u": Row(True, None)})
    db.patch(monkeypatch)
    monkeypatch.setattr(enforcement, "write_many", _write_many(db), raising=False)
    ctx = FakeCtx(db, {}, {})
    work = [(0, "org_i", None, None), (1, "org_s", None, None), (2, "org_r", None, None), (3, "org_u", None, None)]
    results = [{"created": True, "changed": [], "enforcement": "enforce", "cutover_us": None},
               {"created": True, "changed": [], "enforcement": "shadow", "cutover_us": None},
               {"error": {"code": "invalid_command", "message": "refused"}},
               {"error": {"code": "outcome_unknown", "message": "maybe"}}]
    import asyncio
    # made by this run: org_s, org_r, org_u; org_i's row is an earlier run's (it crashed after it)
    asyncio.run(import_routes._settle_enforcement_rows(ctx, work, results, {"org_s", "org_r", "org_u"}))
    assert db.rows == {"org_s": Row(True, None), "org_u": Row(True, None)}


def test_post_import_of_an_org_enforced_drops_a_shadow_row_though_the_run_made_none(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from config.settings import Settings
    from serve_app.errors import install_error_handlers
    from serve_app.routes import imports as import_routes
    from storage import enforcement
    from storage.enforcement import Row
    from tests.helpers import CATALOG

    db = FakeDb({"org_i": Row(True, None)})  # an earlier import in shadow made it, then crashed
    db.patch(monkeypatch)
    monkeypatch.setattr(enforcement, "write_many", _write_many(db), raising=False)

    async def link(ctx, pairs, dry_run):
        return {}
    monkeypatch.setattr(import_routes, "_link_customers", link)
    fake = FakeCtx(db, {}, {"org_i": {"created": True, "changed": [], "balance_micros": 0,
                                       "waits_for_customer": False, "enforcement": "enforce", "cutover_us": None}})
    ctx = SimpleNamespace(admin=lambda request: None, catalog=CATALOG, settings=Settings(data_dir=tmp_path),
                          router=fake.router, db=fake.db)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(import_routes.routes(ctx))
    answer = TestClient(app).post("/v1/import", json={"orgs": [
        {"org_id": "org_i", "email": "o@example.com", "balance_micros": 0, "enforcement": "enforce"}]})
    assert answer.status_code == 200 and answer.json()["orgs"][0]["status"] == "created", answer.text
    assert db.rows == {}


def test_the_shards_import_answer_carries_the_orgs_enforcement_for_the_meters_row():
    from actors import batch
    from actors.commands import Imported, SetEnforcement
    from tests.test_shadow_core import Org

    o = Org(shadow=True)
    assert batch.answer(Imported(o.org, True, []), o.org, o.now)["enforcement"] == "shadow"
    o.run(SetEnforcement("enforce", T))
    reply = batch.answer(Imported(o.org, False, []), o.org, o.now)
    assert (reply["enforcement"], reply["cutover_us"]) == ("shadow", T)
    enforced = Org(shadow=False)
    reply = batch.answer(Imported(enforced.org, True, []), enforced.org, enforced.now)
    assert (reply["enforcement"], reply["cutover_us"]) == ("enforce", None)


# --- 5. The billing portal of an org in shadow: 409 org_in_shadow, nothing sent to Stripe -------

def test_the_portal_of_an_org_in_shadow_is_refused_before_stripe(monkeypatch):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve_app.errors import install_error_handlers
    from serve_app.routes import self_serve

    opened = []

    async def open_portal(ctx, org_id, back, key):
        opened.append(org_id)
        return {"url": "https://billing.stripe.test/session"}

    async def org_state(ctx, org_id):
        return _state("shadow" if org_id == "org_shadow" else "enforce", None)
    monkeypatch.setattr(self_serve, "open_portal", open_portal)
    monkeypatch.setattr(self_serve, "org_state", org_state)
    monkeypatch.setattr(self_serve, "return_url", lambda ctx, url, field, org_id: url or "https://app.test/")
    ctx = SimpleNamespace(org_or_admin=lambda request, org_id: None, stripe=SimpleNamespace(require=lambda: None))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(self_serve.routes(ctx))
    client = TestClient(app)
    refused = client.post("/v1/orgs/org_shadow/portal", json={})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "org_in_shadow", refused.text
    assert opened == []
    assert client.post("/v1/orgs/org_live/portal", json={}).status_code == 200
    assert opened == ["org_live"]
