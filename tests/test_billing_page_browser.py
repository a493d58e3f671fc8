"""The billing page and the API docs as a person sees them: headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright's Python package; never `playwright install`).

Every page runs with the network off: a request that does not go to 127.0.0.1 is aborted and
recorded, and each test checks that none was made. Stripe's Checkout and portal pages (the
loopback Stripe hands out URLs on hosts that do not exist) are answered by the route with a
stand-in page, so the browser lands on the very URL Stripe gave. Screenshots are written to
tests/artifacts/browser/ (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("Playwright's Python package is not installed (pip install playwright)", allow_module_level=True)

from tests.helpers import fake_sessions, hour_tick, mint

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
STRIPE_PAGES = ("checkout.invalid", "portal.invalid")  # the loopback Stripe's hosted pages
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except PlaywrightError as exc:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()
    print(f"\nscreenshots of the billing page and the docs: {ARTIFACTS}")


class Offline:
    """A browser context with the network off: only 127.0.0.1 is reached."""

    def __init__(self, browser, **options) -> None:
        self.blocked: list[str] = []
        self.context = browser.new_context(viewport={"width": 1100, "height": 900}, **options)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()

    def _route(self, route) -> None:
        host = urlsplit(route.request.url).hostname
        if host == "127.0.0.1":
            route.continue_()
        elif host in STRIPE_PAGES:
            route.fulfill(status=200, content_type="text/html",
                          body=f"<!doctype html><title>Stripe on loopback</title><h1>{host}</h1>")
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def shot(self, name: str) -> None:
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")

    def close(self) -> None:
        self.context.close()
        assert self.blocked == [], f"the page reached for the internet: {self.blocked}"


@pytest.fixture
def offline(browser):
    opened: list[Offline] = []

    def make(**options) -> Offline:
        opened.append(Offline(browser, **options))
        return opened[-1]

    yield make
    for context in opened:
        context.close()


def sign_in(service, admin, tab: Offline, org: str) -> None:
    """Open the page from a `?token=` link, as a customer would from an e-mail."""
    tab.page.goto(f"{service.base_url}/billing/{org}?token={mint(admin, org)}")
    assert tab.page.url == f"{service.base_url}/billing/{org}"  # the token left the address bar


def balance(tab: Offline) -> str:
    return tab.page.locator("#balance b").inner_text()


def test_the_page_opens_with_an_org_token_and_the_balance_follows_usage(service, admin, compute, offline, new_org):
    org = new_org()
    tab = offline()
    sign_in(service, admin, tab, org)
    assert balance(tab) == "$5.00"
    expect(tab.page.locator("#spend-empty")).to_be_visible()
    ticks = [hour_tick(org, "t1", lease_id="sbx_a"), hour_tick(org, "t2", lease_id="sbx_b")]
    assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == 2
    tab.page.reload()
    assert balance(tab) == "$4.67"  # 5.00 − 2 × 0.1656 = 4.6688
    assert tab.page.locator("#balance b span").get_attribute("title") == "$4.668800"
    expect(tab.page.locator("svg.chart rect.day[height]:not([height='0'])")).to_have_count(1)
    expect(tab.page.locator("#sandboxes")).to_contain_text("sbx_a")
    expect(tab.page.locator("#sandboxes")).to_contain_text("sbx_b")
    expect(tab.page.locator("#months")).to_contain_text("$0.33")  # the month's spend, all of it free credit
    tab.page.locator("#ledger details summary").first.click()
    expect(tab.page.locator("#ledger details").first).to_contain_text("-$0.331200")
    tab.shot("billing-page-after-usage")


def test_a_top_up_from_the_page_lands_on_the_loopback_stripe_checkout(service, admin, offline, new_org):
    org = new_org()
    tab = offline()
    sign_in(service, admin, tab, org)
    tab.page.fill("input[name=amount_usd]", "12.50")
    tab.shot("billing-page-top-up")
    tab.page.get_by_role("button", name="Top up").click()
    tab.page.wait_for_url("http://checkout.invalid/**")
    sessions = fake_sessions(service, org)
    assert len(sessions) == 1 and tab.page.url == sessions[0]["url"]
    assert (sessions[0]["mode"], sessions[0]["amount_total"]) == ("payment", 1250)
    assert sessions[0]["success_url"] == f"{service.base_url}/billing/{org}?notice=topup_done"
    tab.page.go_back()
    tab.page.locator("#topup form").nth(1).get_by_role("button").click()  # the first pack
    tab.page.wait_for_url("http://checkout.invalid/**")
    assert len(fake_sessions(service, org)) == 2


def test_the_auto_recharge_form_saves_into_the_org(service, admin, offline, new_org):
    org = new_org()
    tab = offline()
    sign_in(service, admin, tab, org)
    form = tab.page.locator("#auto-recharge form")
    form.locator("input[name=enabled]").check()
    form.locator("input[name=threshold_usd]").fill("3")
    form.locator("input[name=amount_usd]").fill("20")
    form.locator("input[name=max_per_day]").fill("2")
    form.get_by_role("button", name="Save").click()
    tab.page.wait_for_url("**notice=auto_recharge_saved*")
    expect(tab.page.get_by_role("status")).to_contain_text("Auto-recharge settings saved.")
    expect(tab.page.locator("#auto-recharge-status")).to_contain_text("under $3.00")
    settings = admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]
    assert (settings["enabled"], settings["threshold_micros"], settings["amount_micros"],
            settings["max_per_day"]) == (True, 3_000_000, 20_000_000, 2)
    tab.shot("billing-page-auto-recharge-saved")


def test_once_free_credit_is_gone_and_no_card_is_on_file_a_dialog_blocks_the_page(
        service, admin, compute, offline, new_org):
    org = new_org()
    big = {**hour_tick(org, "big", lease_id="sbx_big"), "memory_mb": 4096 * 96}  # 6.32 USD in one hour
    assert compute.post("/v1/usage", json={"ticks": [big]}).json()["accepted"] == 1
    assert admin.get(f"/v1/orgs/{org}").json()["is_halted"] is True
    tab = offline()
    sign_in(service, admin, tab, org)
    dialog = tab.page.locator("dialog#credits-used")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Free credits used")
    assert tab.page.evaluate("document.getElementById('credits-used').matches(':modal')")
    assert dialog.get_by_role("button").all_inner_texts() == ["Add payment method"]
    expect(tab.page.locator(".banner.alert")).to_contain_text("New sandboxes are paused")
    tab.page.keyboard.press("Escape")
    expect(dialog).to_be_visible()  # Escape does not dismiss it
    with pytest.raises(PlaywrightTimeout):  # the page behind it takes no click
        tab.page.locator("#topup button.primary").click(timeout=1_500)
    tab.shot("billing-page-free-credits-used")
    dialog.get_by_role("button", name="Add payment method").click()
    tab.page.wait_for_url("http://checkout.invalid/**")
    [session] = fake_sessions(service, org)
    assert session["mode"] == "setup" and tab.page.url == session["url"]


def test_the_docs_render_with_the_network_off(service, offline):
    tab = offline()
    tab.page.goto(f"{service.base_url}/docs")
    expect(tab.page.locator(".opblock-summary-path", has_text="/v1/gate").first).to_be_visible()
    expect(tab.page.locator(".opblock-summary-path[data-path='/v1/usage']")).to_be_visible()
    tab.shot("docs-swagger-ui")
    tab.page.goto(f"{service.base_url}/redoc")
    expect(tab.page.get_by_role("heading", name="metergate (1)", level=1)).to_be_visible()
    expect(tab.page.get_by_role("button", name="post /v1/gate", exact=True)).to_be_attached()
    tab.shot("docs-redoc")


def test_without_javascript_the_page_shows_the_balance_and_its_forms_work(service, admin, compute, offline, new_org):
    org = new_org()
    tab = offline(java_script_enabled=False)
    sign_in(service, admin, tab, org)
    assert balance(tab) == "$5.00"
    for section in ("topup", "card", "tier", "auto-recharge"):
        expect(tab.page.locator(f"#{section} form button").first).to_be_visible()
    tab.shot("billing-page-without-javascript")
    form = tab.page.locator("#auto-recharge form")
    form.locator("input[name=enabled]").check()
    form.locator("input[name=threshold_usd]").fill("1.25")
    form.get_by_role("button", name="Save").click()
    tab.page.wait_for_url("**notice=auto_recharge_saved*")
    assert admin.get(f"/v1/orgs/{org}").json()["auto_recharge"]["threshold_micros"] == 1_250_000
    tab.page.fill("input[name=amount_usd]", "7")
    tab.page.get_by_role("button", name="Top up").click()
    tab.page.wait_for_url("http://checkout.invalid/**")
    assert fake_sessions(service, org)[0]["amount_total"] == 700
    # Out of free credit with no card: without JavaScript the dialog still covers the page.
    big = {**hour_tick(org, "big", lease_id="sbx_big"), "memory_mb": 4096 * 96}
    assert compute.post("/v1/usage", json={"ticks": [big]}).json()["accepted"] == 1
    tab.page.goto(f"{service.base_url}/billing/{org}")
    expect(tab.page.locator("dialog#credits-used")).to_be_visible()
    with pytest.raises(PlaywrightTimeout):
        tab.page.locator("#topup button.primary").click(timeout=1_500)
    tab.shot("billing-page-free-credits-used-without-javascript")
