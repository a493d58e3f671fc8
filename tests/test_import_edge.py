"""POST /v1/import's own logic and the CLI's handling of its answers, with stand-ins for the
shards, the database and the HTTP client (no service): one org failing does not fail the
others, whose customers are linked; a re-run lifts a pause for want of a customer; the CLI
shows each answer's why and sends a failed org again."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from actors import commands as cmd
from actors.refusals import Refusal
from cli import imports as cli_imports
from config.settings import Settings
from serve_app.errors import install_error_handlers
from serve_app.routes import imports as route
from tests.helpers import CATALOG


class StandInRouter:
    def __init__(self, answer) -> None:
        self.answer, self.sent = answer, []

    async def command(self, org_id: str, command) -> dict:
        self.sent.append((org_id, command))
        return self.answer(org_id, command)


def client(tmp_path, router: StandInRouter, monkeypatch, held: dict[str, str] | None = None) -> tuple[TestClient, list]:
    links: list = []
    held = dict(held or {})

    async def link(ctx, pairs, dry_run):
        links.append(list(pairs))
        for org, cus in pairs:
            held.setdefault(org, cus)
        return {org: (held[org], held[org] == cus) for org, cus in pairs}

    monkeypatch.setattr(route, "_link_customers", link)
    ctx = SimpleNamespace(admin=lambda request: None, catalog=CATALOG, settings=Settings(data_dir=tmp_path),
                          router=router)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(route.routes(ctx))
    return TestClient(app), links


def org(n: int, customer: bool = True) -> dict:
    line = {"org_id": f"org_{n}", "email": f"o{n}@example.com", "balance_micros": 1_000_000}
    if customer:
        line["stripe_customer_id"] = f"cus_{n}"
    return line


def imported(changed=(), waits=False) -> dict:
    return {"created": True, "changed": list(changed), "balance_micros": 1_000_000, "waits_for_customer": waits}


def test_one_org_in_error_is_failed_alone_and_the_others_are_answered_and_linked(tmp_path, monkeypatch):
    def answer(org_id, command):
        if org_id == "org_2":
            return {"error": {"code": Refusal.INTERNAL_ERROR, "message": "internal error; it has been logged"}}
        return imported(["import:%s:balance" % org_id])

    http, links = client(tmp_path, StandInRouter(answer), monkeypatch)
    response = http.post("/v1/import", json={"orgs": [org(1), org(2), org(3)]})
    assert response.status_code == 200, response.text
    orgs = response.json()["orgs"]
    assert [(o["org_id"], o["status"]) for o in orgs] == [("org_1", "created"), ("org_2", "failed"),
                                                          ("org_3", "created")]
    assert orgs[1]["why"].startswith("internal_error: ")
    assert orgs[0]["changed"] == ["import:org_1:balance", "stripe_customer"]
    assert links == [[("org_1", "cus_1"), ("org_3", "cus_3")]]


def test_a_request_whose_every_org_failed_is_a_503_as_before(tmp_path, monkeypatch):
    router = StandInRouter(lambda org_id, command: {"error": {"code": Refusal.SHARD_BUSY, "message": "busy"}})
    http, links = client(tmp_path, router, monkeypatch)
    assert http.post("/v1/import", json={"orgs": [org(1), org(2)]}).status_code == 503
    assert links == []


def test_a_re_run_links_the_customer_and_the_same_import_with_it_lifts_the_pause(tmp_path, monkeypatch):
    def answer(org_id, command):
        if command.customer_linked:  # the pause lifts: a charge is asked for
            return {**imported(["auto_recharge"]), "created": False, "waits_for_customer": False}
        return {**imported(), "created": False, "waits_for_customer": org_id == "org_1"}

    router = StandInRouter(answer)
    http, links = client(tmp_path, router, monkeypatch)
    response = http.post("/v1/import", json={"orgs": [org(1), org(2), org(3, customer=False)]})
    assert response.status_code == 200, response.text
    assert [(o["status"], o["changed"]) for o in response.json()["orgs"]] == [
        ("updated", ["auto_recharge", "stripe_customer"]), ("updated", ["stripe_customer"]), ("unchanged", [])]
    assert [(org_id, c.customer_linked) for org_id, c in router.sent] == [
        ("org_1", False), ("org_2", False), ("org_3", False), ("org_1", True)]
    assert isinstance(router.sent[-1][1], cmd.ImportOrg) and router.sent[-1][1].amounts == router.sent[0][1].amounts


class StandInApi:
    def __init__(self, answers) -> None:
        self.answers, self.bodies, self.last_status = list(answers), [], 200

    def post(self, path: str, body: dict) -> dict:
        self.bodies.append(json.loads(json.dumps(body)))
        return self.answers.pop(0)


def test_the_cli_keeps_the_why_of_an_org_imported(monkeypatch, capsys):
    why = "stripe_customer_id cus_2 not linked: the org has cus_9"
    api = StandInApi([{"dry_run": False, "orgs": [
        {"index": 0, "status": "created", "org_id": "org_1", "changed": [], "balance_micros": 1},
        {"index": 1, "status": "unchanged", "org_id": "org_2", "changed": [], "balance_micros": 1, "why": why}]}])
    tally = cli_imports.Tally()
    cli_imports.send(api, [(1, org(1)), (2, org(2))], False, tally)
    assert (tally.created, tally.unchanged, tally.bad) == (1, 1, [])
    assert tally.as_json(False)["notes"] == [{"line": 2, "org_id": "org_2", "status": "unchanged", "why": why}]


def test_the_cli_sends_a_failed_org_again_alone(monkeypatch):
    monkeypatch.setattr(cli_imports.time, "sleep", lambda s: None)
    api = StandInApi([
        {"dry_run": False, "orgs": [
            {"index": 0, "status": "created", "org_id": "org_1", "changed": [], "balance_micros": 1},
            {"index": 1, "status": "failed", "org_id": "org_2", "why": "internal_error: internal error"}]},
        {"dry_run": False, "orgs": [
            {"index": 0, "status": "created", "org_id": "org_2", "changed": [], "balance_micros": 1}]}])
    tally = cli_imports.Tally()
    cli_imports.send(api, [(1, org(1)), (2, org(2))], False, tally)
    assert [[o["org_id"] for o in body["orgs"]] for body in api.bodies] == [["org_1", "org_2"], ["org_2"]]
    assert (tally.created, tally.bad) == (2, [])


def test_the_cli_reports_an_org_that_failed_every_time_as_a_bad_line(monkeypatch):
    monkeypatch.setattr(cli_imports.time, "sleep", lambda s: None)
    failed = {"dry_run": False, "orgs": [{"index": 0, "status": "failed", "org_id": "org_1", "why": "shard_busy: x"}]}
    api = StandInApi([failed] * (cli_imports.RETRIES + 1))
    tally = cli_imports.Tally()
    cli_imports.send(api, [(7, org(1))], False, tally)
    assert tally.bad == [{"line": 7, "org_id": "org_1", "why": "shard_busy: x"}]
    assert len(api.bodies) == cli_imports.RETRIES + 1
