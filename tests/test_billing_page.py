"""The billing page and its forms over plain HTTP (the browser scenarios are in
test_billing_page_browser.py), money shown to people, and the offline API docs."""

from __future__ import annotations

import asyncio
import re
from html import unescape

import httpx
import pytest
from fastapi import FastAPI

from config.catalog import load_catalog
from config.settings import Settings
from serve_app.auth import BILLING_COOKIE
from serve_app.context import Context
from serve_app.errors import install_error_handlers
from serve_app.routes import docs
from serve_app.views import format_usd, parse_usd, usd_input_value
from tests.helpers import SIGNUP_MICROS, fake_sessions, hour_tick, mint

HTML = {"Accept": "text/html,application/xhtml+xml"}


# ----- money for people ------------------------------------------------------------------


@pytest.mark.parametrize("micros, shown, exact", [
    (4_668_800, "$4.67", "$4.668800"),
    (4_665_000, "$4.67", "$4.665000"),  # half a cent rounds up
    (4_664_999, "$4.66", "$4.664999"),
    (-4_665_000, "-$4.67", "-$4.665000"),  # away from zero: a debit shows the digits of its credit
    (-165_600, "-$0.17", "-$0.165600"),
    (-45, "$0.00", "-$0.000045"),  # rounds to nothing: no sign; the tooltip has the exact amount
    (0, "$0.00", "$0.000000"),
    (1_234_567_890_000, "$1,234,567.89", "$1,234,567.890000"),
])
def test_money_is_shown_to_the_cent_with_the_exact_amount_beside(micros, shown, exact):
    assert format_usd(micros) == shown
    assert format_usd(micros, exact=True) == exact


def test_amounts_typed_in_a_form_are_read_exactly_or_refused():
    assert [parse_usd(t) for t in ("25", "25.5", "$25.50", " 0.000001 ", "10000")] == [
        25_000_000, 25_500_000, 25_500_000, 1, 10_000_000_000]
    for bad in ("", "-1", "1e3", "25.1234567", "25\n", "2,500", "٢٥", "25.", ".5", "$"):
        assert parse_usd(bad) is None, bad
    for micros in (5_000_000, 25_500_000, 1, 3_000_001):
        assert parse_usd(usd_input_value(micros)) == micros  # a form saved unchanged keeps the amount


# ----- the offline docs (no service needed) ------------------------------------------------


@pytest.fixture(scope="module")
def bare_app(tmp_path_factory):
    """The docs routes alone, as build_app mounts them, with the API's error handlers."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs"), service_token="s" * 20, admin_token="a" * 20,
                        org_token_secret="o" * 32)
    app = FastAPI(docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(docs.routes(Context(settings, load_catalog(settings.catalog), router=None)))
    return app


def asgi_get(app, path: str) -> httpx.Response:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate") as client:
            return await client.get(path)

    return asyncio.run(call())


@pytest.mark.parametrize("page, assets", [
    ("/docs", ["/docs/assets/swagger-ui.css", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/favicon.png"]),
    ("/redoc", ["/docs/assets/redoc.standalone.js", "/docs/assets/favicon.png"]),
])
def test_the_docs_pages_load_their_assets_from_metergate_only(bare_app, page, assets):
    response = asgi_get(bare_app, page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    referenced = re.findall(r'(?:href|src)="([^"]+)"', response.text)
    assert sorted(referenced) == sorted(assets), referenced
    assert "http" not in " ".join(referenced) and "fonts.googleapis" not in response.text
    for asset in assets:
        served = asgi_get(bare_app, asset)
        assert served.status_code == 200 and len(served.content) > 1000, asset
        assert "max-age" in served.headers["cache-control"]


def test_only_the_docs_assets_are_served(bare_app):
    for path in ("/docs/assets/core.py", "/docs/assets/..%2F__init__.py", "/docs/assets/nothing.js"):
        response = asgi_get(bare_app, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path
    assert asgi_get(bare_app, "/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")


def test_the_service_serves_its_own_docs_and_the_document_lists_the_routes(service):
    for path in ("/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"):
        assert httpx.get(f"{service.base_url}{path}", timeout=30).status_code == 200, path
    document = httpx.get(f"{service.base_url}/openapi.json", timeout=30).json()
    assert "/v1/gate" in document["paths"] and "/billing/{org_id}" in document["paths"]
    assert not any(path.startswith(("/docs", "/redoc", "/billing/{org_id}/")) for path in document["paths"])


# ----- the page over HTTP ------------------------------------------------------------------


def page_client(service) -> httpx.Client:
    return httpx.Client(base_url=service.base_url, timeout=60, headers=HTML)


def open_by_link(client: httpx.Client, org: str, token: str) -> httpx.Response:
    """What a browser does with a `?token=` link: follow the redirect, keep the cookie."""
    link = client.get(f"/billing/{org}", params={"token": token})
    assert link.status_code == 303, link.text
    assert link.headers["location"] == f"/billing/{org}"
    cookie = link.headers["set-cookie"]
    assert f"{BILLING_COOKIE}=" in cookie and "HttpOnly" in cookie and f"Path=/billing/{org}" in cookie
    assert "samesite=lax" in cookie.lower()
    page = client.get(link.headers["location"])
    assert page.status_code == 200, page.text
    return page


def form_of(page: str, action: str, index: int = 0) -> dict[str, str]:
    """The hidden fields of the page's `index`-th form posting to `action`."""
    forms = re.findall(rf'<form method="post" action="[^"]*/{re.escape(action)}">(.*?)</form>', page, re.S)
    return {name: unescape(value) for name, value in
            re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', forms[index])}


def test_a_token_link_becomes_a_cookie_of_the_page_and_no_token_is_in_the_page(service, admin, new_org):
    org = new_org()
    token = mint(admin, org)
    with page_client(service) as client:
        page = open_by_link(client, org, token)
        assert token not in page.text and "token=" not in page.text
        assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)
        assert f'<script nonce="{nonce}">' in page.text and "<script src" not in page.text
        assert not re.search(r'(?:src|href)="https?://', page.text)  # no asset from the internet
        assert '$5.00' in page.text and 'title="$5.000000"' in page.text
        for action in ("topup", "setup", "portal", "tier", "auto-recharge"):
            assert f'action="/billing/{org}/{action}"' in page.text, action
        # Other query parameters survive the redirect; the token does not.
        again = client.get(f"/billing/{org}", params={"token": token, "notice": "checkout_cancelled"})
        assert again.headers["location"] == f"/billing/{org}?notice=checkout_cancelled"
    # Without the cookie or a header the page is refused: as HTML for a browser, JSON otherwise.
    with page_client(service) as stranger:
        refused = stranger.get(f"/billing/{org}")
        assert refused.status_code == 401 and "text/html" in refused.headers["content-type"]
    assert httpx.get(f"{service.base_url}/billing/{org}").json()["error"]["code"] == "unauthorized"


def test_a_form_is_one_request_per_key_like_the_json_endpoint(service, admin, new_org):
    org = new_org()
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org))
        fields = form_of(page.text, "topup")
        assert fields["idempotency_key"].startswith("form_") and fields["csrf"]
        first = client.post(f"/billing/{org}/topup", data={**fields, "amount_usd": "12.50"})
        double_click = client.post(f"/billing/{org}/topup", data={**fields, "amount_usd": "12.50"})
        assert first.status_code == double_click.status_code == 303, first.text
        assert first.headers["location"] == double_click.headers["location"]
        sessions = fake_sessions(service, org)
        assert len(sessions) == 1 and sessions[0]["url"] == first.headers["location"]
        assert sessions[0]["amount_total"] == 1250 and sessions[0]["metadata"]["credit_micros"] == "12500000"
        assert sessions[0]["success_url"].endswith(f"/billing/{org}?notice=topup_done")
        assert "mgo_" not in sessions[0]["success_url"] + sessions[0]["cancel_url"]  # no token handed to Stripe
        # The same key with another body: a conflict, decided before Stripe, shown as a page.
        other = client.post(f"/billing/{org}/topup", data={**fields, "amount_usd": "30"})
        assert other.status_code == 409 and "text/html" in other.headers["content-type"]
        assert "idempotency_conflict" in other.text
        # A pack, from its own form (its own key).
        pack = client.post(f"/billing/{org}/topup", data=form_of(page.text, "topup", index=1))
        assert pack.status_code == 303
        assert len(fake_sessions(service, org)) == 2


def test_forms_refuse_what_the_json_endpoints_refuse_and_never_answer_500(service, admin, new_org):
    org, other_org = new_org(), new_org()
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org))
        fields = form_of(page.text, "topup")
        cases = [
            ("topup", {**fields, "amount_usd": "0.10"}, 422, "invalid_request"),  # under Stripe's 0.50
            ("topup", {**fields, "amount_usd": "twelve"}, 422, "invalid_amount"),
            ("topup", {**fields, "amount_usd": "12.505"}, 422, "invalid_amount"),  # not whole cents
            ("topup", {**fields, "pack_id": "no_such_pack"}, 422, "unknown_pack"),
            ("tier", {**form_of(page.text, "tier"), "tier": "base"}, 422, "invalid_request"),
            ("auto-recharge", {**form_of(page.text, "auto-recharge"), "enabled": "on", "threshold_usd": "",
                               "amount_usd": "20", "max_per_day": "3"}, 422, "invalid_amount"),
            ("auto-recharge", {**form_of(page.text, "auto-recharge"), "enabled": "on", "threshold_usd": "1",
                               "amount_usd": "20", "max_per_day": "1000"}, 422, "invalid_request"),
            ("topup", {"amount_usd": "12"}, 403, "forbidden"),  # no proof: not sent by the page
            ("topup", {**fields, "csrf": "é" * 32}, 403, "forbidden"),
            ("topup", "%ff%fe=%80", 403, "forbidden"),
            ("topup", b"\xff\xfe", 422, "invalid_request"),  # not UTF-8
        ]
        for action, body, status, code in cases:
            response = client.post(f"/billing/{org}/{action}", data=body if isinstance(body, dict) else None,
                                   content=None if isinstance(body, dict) else body)
            assert response.status_code == status, (action, body, response.text)
            assert code in response.text and "Traceback" not in response.text
        # The cookie belongs to the org's page: nothing of it goes with a form posted to another org.
        assert client.post(f"/billing/{other_org}/topup", data={**fields, "amount_usd": "12"}).status_code == 401
    assert fake_sessions(service, org) == []
    assert admin.get(f"/v1/orgs/{org}").json()["auto_recharge"] == {"enabled": False}


def test_a_subscribed_org_s_tier_form_changes_its_subscription_and_comes_back_to_the_page(service, admin, new_org):
    """No second Checkout and no "cancel the old one" for an org already on a paid tier: the
    form changes the subscription it has and the page says Stripe is confirming it."""
    org, newcomer = new_org(), new_org()
    first = admin.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro"})
    assert first.status_code == 200, first.text
    done = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{first.json()['session_id']}/complete",
                      json={}, timeout=30).json()
    # No webhooks in this module: the tier Stripe's customer.subscription.created would set.
    assert admin.put(f"/v1/orgs/{org}/tier", json={"tier": "pro"}).status_code == 200
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org))
        assert "Change tier" in page.text and "Continue to checkout" not in page.text
        assert "no second subscription" in page.text
        changed = client.post(f"/billing/{org}/tier", data={**form_of(page.text, "tier"), "tier": "pro_plus"})
        assert changed.status_code == 303, changed.text
        assert changed.headers["location"].endswith(f"/billing/{org}?notice=tier_done")  # not to Checkout
        shown = client.get(f"/billing/{org}?notice=tier_done").text
        assert "Stripe is confirming your subscription" in shown
    updates = httpx.get(f"{service.settings.stripe_api_base}/_fake/subscription_updates", timeout=10).json()
    assert [u["prices"] for u in updates if u["subscription"] == done["subscription"]] == [
        ["price_metergate_pro_plus_monthly"]]
    assert [s["mode"] for s in fake_sessions(service, org)] == ["subscription"]
    with page_client(service) as client:
        assert "Continue to checkout" in open_by_link(client, newcomer, mint(admin, newcomer)).text


def test_the_auto_recharge_form_saves_what_put_auto_recharge_saves(service, admin, new_org):
    org = new_org()
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org))
        fields = {**form_of(page.text, "auto-recharge"), "enabled": "on", "threshold_usd": "3",
                  "amount_usd": "20.00", "max_per_day": "2"}
        saved = client.post(f"/billing/{org}/auto-recharge", data=fields)
        assert saved.status_code == 303 and saved.headers["location"].endswith("notice=auto_recharge_saved#auto-recharge")
        assert client.post(f"/billing/{org}/auto-recharge", data=fields).status_code == 303  # the same submit again
        settings = admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]
        assert (settings["enabled"], settings["threshold_micros"], settings["amount_micros"],
                settings["max_per_day"]) == (True, 3_000_000, 20_000_000, 2)
        shown = client.get(f"/billing/{org}?notice=auto_recharge_saved").text
        assert "Auto-recharge settings saved." in shown and 'value="3.00"' in shown and 'value="20.00"' in shown
        off = client.post(f"/billing/{org}/auto-recharge", data=form_of(shown, "auto-recharge"))  # unchecked: off
        assert off.status_code == 303
    assert admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]["enabled"] is False


def test_the_page_shows_usage_by_day_sandbox_meter_and_month_and_pages_the_ledger(service, admin, compute, new_org):
    org = new_org()
    ticks = [hour_tick(org, f"t{n}", lease_id=f"sbx_{n % 2}") for n in range(3)]
    assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == 3
    for n in range(22):
        assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 10_000,
                                                          "note": f"grant {n}"}).status_code == 201
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org))
        text = page.text
        balance = SIGNUP_MICROS + 22 * 10_000 - 3 * 165_600
        assert f'data-micros="{balance}"' in text and format_usd(balance) in text
        assert text.count('<rect class="day"') == 30 and "sbx_0" in text and "sbx_1" in text
        assert "12.00 GiB·h" in text and "6.00 vCPU·h" in text  # 3 lease-hours of 4 GiB and 2 vCPU
        assert "Free credit applied" in text and format_usd(3 * 165_600) in text
        assert text.count("<details>") == 20  # a ledger page; the rest is behind "Older entries"
        older = re.search(r'<a rel="next" href="([^"]+)"', text).group(1)
        second = client.get(unescape(older).split("#")[0])
        assert second.status_code == 200 and second.text.count("<details>") >= 3
        assert "Signup credit" in second.text and ">Newest<" in second.text
        assert "exact amount -$0.496800 (-496,800 micro-USD)" in second.text  # the detail of the usage minute
        assert client.get(f"/billing/{org}?cursor=bogus").status_code == 400



def test_loads_of_a_page_at_once_share_one_months_computation_until_the_orgs_money_moves(service, admin, new_org):
    """What the billing page shows of the months (serve_app/calls.py recent_months_of), with
    the ingress's own Context on the service's Postgres: 8 loads at once get one answer (one
    object: one computation); a later load with the same money gets it again, one with other
    money (a new ledger entry) or past MONTHS_FRESH_S computes again. The browser test shows a
    reload right after usage shows that usage."""
    from actors.routing import ShardRouter
    from config.catalog import load_catalog
    from serve_app import calls

    org = new_org()
    ctx = Context(service.settings, load_catalog(service.settings.catalog), ShardRouter(service.slot_map))

    async def run() -> None:
        try:
            money = ("any", 1)
            shared = await asyncio.gather(*(calls.recent_months_of(ctx, org, money) for _ in range(8)))
            assert all(answer is shared[0] for answer in shared) and shared[0]
            assert await calls.recent_months_of(ctx, org, money) is shared[0]
            moved = await calls.recent_months_of(ctx, org, ("any", 2))
            assert moved is not shared[0] and moved == shared[0]  # computed again (nothing changed in fact)
            at, fingerprint, done = ctx.recent_months[org]
            ctx.recent_months[org] = (at - calls.MONTHS_FRESH_S - 1, fingerprint, done)  # as if seconds had passed
            assert await calls.recent_months_of(ctx, org, ("any", 2)) is not moved
            calls.forget_months(ctx, org)
            assert org not in ctx.recent_months
        finally:
            if ctx._clock_task is not None:
                ctx._clock_task.cancel()
            if ctx.pool is not None:
                await ctx.pool.close()

    asyncio.run(run())


def test_the_page_says_how_long_the_credit_lasts_at_what_runs_now(service, admin, compute, new_org):
    """Billing-rules 2.10 on the page: nothing while nothing runs; with a 4 GiB, 2 vCPU sandbox
    (165,600 µUSD an hour) the signup's 5 USD last 108,695 s (1 day 6 hours), and under the org's
    runway alert the card is marked."""
    org = new_org()
    with page_client(service) as client:
        page = open_by_link(client, org, mint(admin, org)).text
        assert 'id="runway"' not in page
        assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_page", "ttl_s": 600, "resources": {
            "memory_mb": 4096, "cpu_count": 2}}).status_code == 201
        page = client.get(f"/billing/{org}").text
        card = re.search(r'<div class="card" id="runway">(.*?)</div>', page, re.S).group(1)
        assert 'data-seconds="108695"' in card and "1 day 6 hours" in card and "$0.17" in card
        assert "runs out" in card
        admin.put(f"/v1/orgs/{org}/alerts", json={"runway_alert_s": 2 * 86_400})
        assert '<div class="card warn" id="runway">' in client.get(f"/billing/{org}").text
