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
