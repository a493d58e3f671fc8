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
