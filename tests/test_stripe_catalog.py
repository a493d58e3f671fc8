"""The catalog published to Stripe (`metergate stripe ensure-products`) and Stripe Tax on
Checkout, against the Stripe-protocol server on loopback (localstripe, and tests/stripe_front.py
for the prices and meters localstripe lacks)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from actors.routing import ShardRouter
from config.catalog import load_catalog
from config.settings import DEFAULT_CATALOG, Settings
from serve_app.app import build_app
from serve_app.billing_page import BillingPage, tier_form, topup_forms
from serve_app.context import Context
from tests.helpers import ADMIN_TOKEN, CATALOG, URLS, fake_sessions, stripe_client

ROOT = Path(__file__).resolve().parent.parent
TIER_AMOUNTS = "[tier_monthly_micros]\npro = 20_000_000\npro_plus = 100_000_000\npro_plus_plus = 150_000_000\n"


def catalog_file(folder: Path, name: str, tiers: str = TIER_AMOUNTS, packs: str = "") -> Path:
    """The shipped catalog with its tiers priced by amount instead of hand-copied price ids."""
    text = Path(DEFAULT_CATALOG).read_text()
    text, replaced = re.subn(r"\[stripe_prices\]\n(?:\w+ = \"price_\w+\"\n)+", tiers, text)
    assert replaced == 1
    path = folder / name
    path.write_text(text + packs)
    return path


def ensure_products(service, catalog: Path, *args: str, key: str | None = None,
                    meter_prefix: str = "metergate") -> subprocess.CompletedProcess:
    env = {**os.environ, "METERGATE_STRIPE_SECRET_KEY": key or service.settings.stripe_secret_key,
           "METERGATE_STRIPE_API_BASE": service.settings.stripe_api_base, "METERGATE_CATALOG": str(catalog),
           "METERGATE_DATA_DIR": str(catalog.parent), "PYTHONPATH": str(ROOT),
           "METERGATE_STRIPE_METER_PREFIX": meter_prefix}
    return subprocess.run([sys.executable, "-m", "cli.main", "stripe", "ensure-products", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def changes(run: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    assert run.returncode == 0, run.stderr
    return [(c["action"], c["target"]) for c in json.loads(run.stdout)["changes"]]


def price_of(service, lookup_key: str) -> dict | None:
    found = stripe_client(service).v1.prices.list(params={"lookup_keys": [lookup_key]}).data
    return found[0].to_dict() if found else None


def request(service, catalog: Path, method: str, path: str, body: dict | None = None,
            **settings_changes) -> httpx.Response:
    """A request to a metergate app with the service's settings and database, and its catalog and
    settings changed as given."""
    settings = Settings(**{**service.settings.model_dump(), "catalog": catalog, **settings_changes})
    app = build_app(Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map)))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     timeout=60) as client:
            return await client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                        json=None if body is None else {**body, **URLS})

    return asyncio.run(run())


def checkout(service, catalog: Path, org: str, kind: str, body: dict, **settings_changes) -> httpx.Response:
    return request(service, catalog, "POST", f"/v1/orgs/{org}/checkout/{kind}", body, **settings_changes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("catalogs")


def test_a_tier_whose_price_is_not_published_yet_is_a_503_naming_the_command(service, new_org, folder):
    """First in this module: nothing is published yet."""
    catalog = catalog_file(folder, "unpublished.toml")
    answer = checkout(service, catalog, new_org(), "tier", {"tier": "pro"})
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "stripe_price_missing"
    assert "metergate stripe ensure-products" in answer.json()["error"]["message"]


@pytest.fixture(scope="module")
def published(service, folder) -> Path:
    """The catalog, published once: tiers, packs and the postpaid meter."""
    catalog = catalog_file(folder, "catalog.toml")
    made = changes(ensure_products(service, catalog, "--json"))
    assert ("create_meter", "metergate_usage_micros") in made
    assert [target for action, target in made if action == "create_price"] == [
        "metergate_tier_pro_monthly", "metergate_tier_pro_plus_monthly", "metergate_tier_pro_plus_plus_monthly",
        "metergate_pack_extras_50_30d", "metergate_pack_starter_10", "metergate_usage_micros"]
    return catalog


def test_ensure_products_twice_changes_nothing_the_second_time_and_a_tier_checkout_uses_the_published_price(
        service, new_org, published):
    assert changes(ensure_products(service, published, "--json")) == []
    assert changes(ensure_products(service, published, "--dry-run", "--json")) == []
    assert "nothing to change" in ensure_products(service, published).stdout
    pro = price_of(service, "metergate_tier_pro_monthly")
    assert (pro["unit_amount"], pro["recurring"]["interval"], pro["product"], pro["active"]) == (
        2000, "month", "metergate_tier_pro", True)
    assert price_of(service, "metergate_pack_starter_10")["unit_amount"] == 1000
    assert pro["tax_behavior"] == "exclusive"  # before tax, whatever the account's default (stripe.md 7)
    usage = price_of(service, "metergate_usage_micros")
    assert (str(usage["unit_amount_decimal"]), usage["recurring"]["usage_type"], usage["recurring"]["meter"]) == (
        "0.0001", "metered", "mtr_metergate_usage_micros")

    org = new_org()
    answer = checkout(service, published, org, "tier", {"tier": "pro"})
    assert answer.status_code == 200, answer.text
    (session,) = [s for s in fake_sessions(service, org) if s["mode"] == "subscription"]
    assert session["line_items"] == [{"price": pro["id"], "quantity": "1"}]
    completed = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{session['id']}/complete",
                           timeout=30).json()
    subscription = httpx.get(f"{service.settings.stripe_api_base}/v1/subscriptions/{completed['subscription']}",
                             headers={"Authorization": f"Bearer {service.settings.stripe_secret_key}"}, timeout=30).json()
    assert [(item["price"]["id"], item["price"]["unit_amount"]) for item in subscription["items"]["data"]] == [
        (pro["id"], 2000)]


def test_a_changed_amount_is_a_new_price_holding_the_key_and_the_old_one_archived(service, new_org, folder,
                                                                                    published):
    old = price_of(service, "metergate_tier_pro_plus_monthly")
    dearer = catalog_file(folder, "dearer.toml", TIER_AMOUNTS.replace("pro_plus = 100_000_000",
                                                                      "pro_plus = 120_000_000"))
    dry = ensure_products(service, dearer, "--dry-run")
    assert dry.returncode == 0 and "replace_price" in dry.stdout and "120.00 USD per month" in dry.stdout
    assert price_of(service, "metergate_tier_pro_plus_monthly")["id"] == old["id"]  # a dry run changes nothing

    assert changes(ensure_products(service, dearer, "--json")) == [
        ("replace_price", "metergate_tier_pro_plus_monthly")]
    new = price_of(service, "metergate_tier_pro_plus_monthly")
    assert new["id"] != old["id"] and new["unit_amount"] == 12000 and new["active"]
    archived = stripe_client(service).v1.prices.retrieve(old["id"])
    assert (archived.active, archived.lookup_key) == (False, None)
    assert changes(ensure_products(service, dearer, "--json")) == []

    org = new_org()
    assert checkout(service, dearer, org, "tier", {"tier": "pro_plus"}).status_code == 200
    assert fake_sessions(service, org)[0]["line_items"][0]["price"] == new["id"]
    # back to the catalog the other tests use
    assert changes(ensure_products(service, published, "--json")) == [
        ("replace_price", "metergate_tier_pro_plus_monthly")]


def test_a_key_that_cannot_write_stops_at_the_first_change_and_changes_nothing(service, folder, published):
    more = catalog_file(folder, "more.toml", packs='\n[[packs]]\nid = "late_20"\namount_micros = 20_000_000\n')
    refused = ensure_products(service, more, key="rk_test_readonly_ensure")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: create_product metergate_pack_late_20")
    assert "403" in refused.stderr and "0 changes made before it" in refused.stderr
    assert price_of(service, "metergate_pack_late_20") is None
    assert changes(ensure_products(service, more, "--dry-run", "--json")) == [
        ("create_product", "metergate_pack_late_20"), ("create_price", "metergate_pack_late_20")]


def test_a_catalog_stripe_refuses_stops_at_the_failing_object_and_says_what_was_done(service, folder, published):
    packs = "".join(f'\n[[packs]]\nid = "{pack_id}"\namount_micros = {amount}\n'
                    for pack_id, amount in (("m1_ok", 5_000_000), ("m2_huge", 2_000_000_000_000), ("m3_after", 7_000_000)))
    refused_catalog = catalog_file(folder, "refused.toml", packs=packs)
    refused = ensure_products(service, refused_catalog, "--json")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: create_price metergate_pack_m2_huge")
    report = json.loads(refused.stdout)
    assert [(c["action"], c["target"]) for c in report["done"]] == [
        ("create_product", "metergate_pack_m1_ok"), ("create_price", "metergate_pack_m1_ok"),
        ("create_product", "metergate_pack_m2_huge")]
    assert price_of(service, "metergate_pack_m1_ok")["unit_amount"] == 500
    assert price_of(service, "metergate_pack_m2_huge") is None
    assert price_of(service, "metergate_pack_m3_after") is None  # nothing after the failing object
    with pytest.raises(Exception, match="No such product|Not Found|404"):
        stripe_client(service).v1.products.retrieve("metergate_pack_m3_after")


def test_automatic_tax_is_on_every_charging_checkout_when_set_and_absent_when_not(service, admin, new_org,
                                                                                  published):
    taxed, untaxed = new_org(), new_org()
    for org, tax in ((taxed, True), (untaxed, False)):
        for path, body in (("topup", {"amount_micros": 10_000_000}), ("topup", {"pack_id": "starter_10"}),
                           ("tier", {"tier": "pro"}), ("setup", {})):
            answer = checkout(service, published, org, path, body, stripe_automatic_tax=tax)
            assert answer.status_code == 200, answer.text
    sessions = fake_sessions(service, taxed)
    assert sorted(s["mode"] for s in sessions) == ["payment", "payment", "setup", "subscription"]
    for session in sessions:
        if session["mode"] == "setup":
            assert not {"automatic_tax", "billing_address_collection", "customer_update"} & set(session)
        else:
            assert session["automatic_tax"] == {"enabled": "true"}
            assert session["billing_address_collection"] == "required"
            assert session["customer_update"] == {"address": "auto", "name": "auto"}
            assert session["customer"].startswith("cus_")
    for session in fake_sessions(service, untaxed):
        assert not [key for key in session if "tax" in key or key in ("customer_update", "billing_address_collection")]

    # The service runs without the setting: its billing page says nothing about tax.
    page = admin.get(f"/billing/{untaxed}")
    assert page.status_code == 200 and "Continue to checkout" in page.text, page.text[:300]
    assert "before tax" not in page.text


def test_the_billing_page_says_prices_are_before_tax_under_both_forms_when_tax_is_on():
    """The page's wiring is serve_app/routes/billing.py (before_tax=settings.stripe_automatic_tax);
    the service of this module runs with the setting off (the test above)."""
    fields = {field.name: None for field in dataclasses.fields(BillingPage)}
    page = BillingPage(**{**fields, "org": {"tier": "base", "max_concurrent": 5, "has_payment_method": False},
                          "path": "/billing/org_x", "csrf": "proof", "stripe_ready": True, "packs": [],
                          "tiers": [("pro", 100)], "before_tax": True})
    for form in (topup_forms, tier_form):
        assert "Prices are before tax" in form(page), form
        assert "before tax" not in form(dataclasses.replace(page, before_tax=False)), form


def test_the_start_up_setting_publishes_as_the_command_does_and_a_refusal_stops_the_start(service, folder,
                                                                                          published):
    """METERGATE_STRIPE_ENSURE_PRODUCTS: serve_app/launch.py runs this before anything starts."""
    from config.settings import SettingsError
    from serve_app.launch import ensure_products_at_start

    settings = Settings(**{**service.settings.model_dump(), "catalog": published, "stripe_ensure_products": True})
    ensure_products_at_start(settings, load_catalog(published))  # all there already: nothing to do, no error
    more = catalog_file(folder, "at_start.toml", packs='\n[[packs]]\nid = "at_start_30"\namount_micros = 30_000_000\n')
    read_only = Settings(**{**settings.model_dump(), "catalog": more, "stripe_secret_key": "rk_test_readonly_start"})
    with pytest.raises(SettingsError, match="METERGATE_STRIPE_ENSURE_PRODUCTS: create_product metergate_pack_at_start_30"):
        ensure_products_at_start(read_only, load_catalog(more))
    ensure_products_at_start(Settings(**{**settings.model_dump(), "catalog": more}), load_catalog(more))
    assert price_of(service, "metergate_pack_at_start_30")["unit_amount"] == 3000


# ----- the tier of a Stripe price, read alike by the webhook and by self-serve ----------------


def subscription_event(price, subscription_metadata=None) -> dict:
    items = {"data": [{"id": "si_1", "price": price}]}
    return {"id": "evt_1", "type": "customer.subscription.updated", "created": 1_800_000_000, "data": {"object": {
        "id": "sub_1", "object": "subscription", "status": "active", "customer": "cus_1", "items": items,
        "metadata": {"org_id": "org_a", **({"tier": subscription_metadata} if subscription_metadata else {})}}}}


def test_odd_price_metadata_in_a_subscription_event_is_no_metadata_not_a_refused_event():
    """A price's metadata that is not an object (a string, a list), or a price that is neither
    an object nor an id: the price says no tier, the subscription's own metadata does."""
    from serve_app.stripe_events import commands_for

    for price in ({"id": "price_x", "lookup_key": None, "metadata": "metergate_tier_pro_monthly"},
                  {"id": "price_x", "metadata": ["metergate_tier_pro_monthly"]}, {"id": "price_x", "metadata": 7},
                  ["price_x"], 7, None):
        ((org, command),) = commands_for(subscription_event(price, "pro_plus"), CATALOG)
        assert (org, command.tier) == ("org_a", "pro_plus"), price
        ((_, command),) = commands_for(subscription_event(price), CATALOG)
        assert command.tier is None, price
    published = {"id": "price_old", "lookup_key": None, "metadata": {"metergate": "metergate_tier_pro_monthly"}}
    ((_, command),) = commands_for(subscription_event(published, "pro_plus"), CATALOG)
    assert command.tier == "pro"


# ----- what Stripe holds is checked against the catalog, not taken on its name ----------------


def complete(service, session_id: str) -> dict:
    done = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{session_id}/complete", timeout=30)
    assert done.status_code == 200, done.text
    return done.json()


def test_a_tier_change_of_a_subscription_on_a_repriced_price_starts_from_the_tier_its_price_says(
        service, new_org, folder, published):
    """Opened on pro_plus, switched to pro in the portal (the price only: metadata.tier still
    says pro_plus), then pro repriced: the subscription keeps the old pro price, whose lookup key
    moved to the new one. Asking for pro_plus moves it from pro, rather than `updated: false`
    from the stale tag; the webhook reads the same price as pro (tier_of)."""
    from serve_app.stripe_events import tier_of

    client, org = stripe_client(service), new_org()
    assert checkout(service, published, org, "tier", {"tier": "pro_plus"}).status_code == 200
    (session,) = [s for s in fake_sessions(service, org) if s["mode"] == "subscription"]
    subscription_id = complete(service, session["id"])["subscription"]
    item = client.v1.subscriptions.retrieve(subscription_id).to_dict()["items"]["data"][0]
    old_pro = price_of(service, "metergate_tier_pro_monthly")
    client.v1.subscriptions.update(subscription_id, params={"items": [{"id": item["id"], "price": old_pro["id"]}]})
    dearer = catalog_file(folder, "dearer_pro.toml", TIER_AMOUNTS.replace("pro = 20_000_000", "pro = 25_000_000"))
    try:
        assert changes(ensure_products(service, dearer, "--json")) == [("replace_price", "metergate_tier_pro_monthly")]
        on_old = client.v1.subscriptions.retrieve(subscription_id).to_dict()
        assert on_old["items"]["data"][0]["price"]["lookup_key"] is None  # the key moved to the new price
        assert (on_old["metadata"]["tier"], tier_of(on_old, load_catalog(dearer))) == ("pro_plus", "pro")

        answer = checkout(service, dearer, org, "tier", {"tier": "pro_plus"})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["updated"], answer.json().get("previous_tier")) == (True, "pro")
        moved = client.v1.subscriptions.retrieve(subscription_id).to_dict()
        pro_plus = price_of(service, "metergate_tier_pro_plus_monthly")
        assert [i["price"]["id"] for i in moved["items"]["data"]] == [pro_plus["id"]]
        assert len([s for s in fake_sessions(service, org) if s["mode"] == "subscription"]) == 1  # no second Checkout
    finally:
        assert changes(ensure_products(service, published, "--json")) == [
            ("replace_price", "metergate_tier_pro_monthly")]


def test_a_tier_price_that_is_not_what_the_catalog_sells_is_a_503_naming_both_not_a_wrong_charge(
        service, new_org, folder, published):
    """The catalog's pro_plus went to 130 USD and ensure-products was not run: Stripe's price under
    the key still bills 100 USD. No Checkout is opened on it."""
    unpublished = catalog_file(folder, "unpublished_dearer.toml",
                               TIER_AMOUNTS.replace("pro_plus = 100_000_000", "pro_plus = 130_000_000"))
    org = new_org()
    answer = checkout(service, unpublished, org, "tier", {"tier": "pro_plus"})
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "stripe_price_mismatch" and error["tier"] == "pro_plus"
    assert "100.00 USD" in error["message"] and "130.00 USD" in error["message"]
    assert "metergate stripe ensure-products" in error["message"]
    assert fake_sessions(service, org) == []


def test_a_cached_tier_price_that_stripe_archived_is_looked_up_again_not_offered(service, new_org, published):
    """One service (its price cache) throughout: the pro price it found is archived in the
    dashboard. A Checkout on it is refused by Stripe, so the service looks the key up again: no
    active price is the 503 naming the command (not a minute of 502s); once ensure-products has
    published a new one, the next Checkout gets it."""
    settings = Settings(**{**service.settings.model_dump(), "catalog": published})
    app = build_app(Context(settings, load_catalog(published), ShardRouter(service.slot_map)))
    first = price_of(service, "metergate_tier_pro_monthly")
    orgs = [new_org() for _ in range(3)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metergate",
                                     timeout=60) as client:
            async def tier(org: str) -> httpx.Response:
                return await client.post(f"/v1/orgs/{org}/checkout/tier", json={"tier": "pro", **URLS},
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

            answers = [await tier(orgs[0])]
            await asyncio.to_thread(stripe_client(service).v1.prices.update, first["id"], params={"active": False})
            answers.append(await tier(orgs[1]))
            made = await asyncio.to_thread(ensure_products, service, published, "--json")
            assert changes(made) == [("replace_price", "metergate_tier_pro_monthly")]
            answers.append(await tier(orgs[2]))
            return answers

    cached, archived, republished = asyncio.run(run())
    assert cached.status_code == 200, cached.text
    assert archived.status_code == 503 and archived.json()["error"]["code"] == "stripe_price_missing", archived.text
    assert republished.status_code == 200, republished.text
    session = next(s for s in httpx.get(f"{service.settings.stripe_api_base}/_fake/sessions", timeout=10).json()
                   if s["id"] == republished.json()["session_id"])
    assert session["line_items"][0]["price"] == price_of(service, "metergate_tier_pro_monthly")["id"] != first["id"]


def test_a_meter_of_metergate_s_event_name_with_another_shape_is_reported_not_reused(service, published):
    """Someone's meter on `other_usage_micros` counts events: metergate sends µUSD to be summed.
    Prices on it would bill a count of hours; the run stops before any change, saying why."""
    stripe_client(service).v1.billing.meters.create(params={
        "display_name": "someone else's", "event_name": "other_usage_micros",
        "default_aggregation": {"formula": "count"},
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"}})
    for args in (("--json",), ("--dry-run", "--json")):
        refused = ensure_products(service, published, *args, meter_prefix="other")
        assert refused.returncode == 1, refused.stdout
        assert "mtr_other_usage_micros" in refused.stderr and "'count'" in refused.stderr, refused.stderr
        assert "METERGATE_STRIPE_METER_PREFIX" in refused.stderr
    assert price_of(service, "metergate_usage_micros")["recurring"]["meter"] == "mtr_metergate_usage_micros"


def test_an_archiving_stripe_refused_is_done_by_the_next_run(service, folder, published):
    """The new price took the lookup key, the old one's archiving was refused: it stays on sale
    until a later run finds it (active, metergate's, not holding the key) and archives it."""
    api, key = service.settings.stripe_api_base, "metergate_tier_pro_plus_plus_monthly"
    old = price_of(service, key)
    dearer = catalog_file(folder, "dearer_ppp.toml",
                          TIER_AMOUNTS.replace("pro_plus_plus = 150_000_000", "pro_plus_plus = 160_000_000"))
    assert httpx.post(f"{api}/_fake/prices", json={"refuse_archive_next": 1}, timeout=10).status_code == 200
    failed = ensure_products(service, dearer, "--json")
    assert failed.returncode == 1 and f"refused to archive {old['id']}" in failed.stderr, failed.stderr
    assert price_of(service, key)["unit_amount"] == 16000
    assert stripe_client(service).v1.prices.retrieve(old["id"]).active  # still on sale

    assert changes(ensure_products(service, dearer, "--dry-run", "--json")) == [("archive_price", key)]
    assert changes(ensure_products(service, dearer, "--json")) == [("archive_price", key)]
    assert not stripe_client(service).v1.prices.retrieve(old["id"]).active
    assert changes(ensure_products(service, dearer, "--json")) == []
    assert changes(ensure_products(service, published, "--json")) == [("replace_price", key)]


def test_a_price_or_meter_that_differs_from_the_catalog_in_any_part_is_named_not_taken():
    """The pure checks behind the runtime look-up and ensure-products: each part of a price or
    meter that differs is said, in words an operator reads."""
    from actors.stripe_products import (USAGE_LOOKUP_KEY, changes_to_make, meter_mismatch, meter_params,
                                        tier_price_mismatch, wanted)

    catalog = dataclasses.replace(CATALOG, stripe_prices={}, tier_monthly_micros={"pro": 20_000_000})
    pro = {"id": "price_pro", "active": True, "currency": "usd", "product": "metergate_tier_pro",
           "tax_behavior": "exclusive", "unit_amount": 2000, "recurring": {"interval": "month", "interval_count": 1,
                                                                            "usage_type": "licensed"}}
    assert tier_price_mismatch(pro, catalog, "pro") is None
    for change, words in (({"active": False}, "is archived"), ({"currency": "eur"}, "'eur'"),
                          ({"unit_amount": 2500}, "bills 25.00 USD (the catalog: 20.00 USD)"),
                          ({"recurring": {"interval": "year"}}, "every 1 year"),
                          ({"recurring": {"interval": "month", "interval_count": 3}}, "every 3 month"),
                          ({"recurring": None}, "is one-off"),
                          ({"recurring": {"interval": "month", "usage_type": "metered"}}, "is metered"),
                          ({"tax_behavior": "inclusive"}, "'inclusive'"),
                          ({"product": "prod_other"}, "'prod_other'"), ({"unit_amount": "2000"}, "'2000' cents")):
        assert words in (tier_price_mismatch({**pro, **change}, catalog, "pro") or ""), change

    ours = {"id": "mtr_1", **meter_params("metergate_usage_micros")}
    assert meter_mismatch(ours) is None
    assert "'count'" in meter_mismatch({**ours, "default_aggregation": {"formula": "count"}})
    other_key = {"type": "by_id", "event_payload_key": "customer"}
    assert "'customer'" in meter_mismatch({**ours, "customer_mapping": other_key})
    assert "None" in meter_mismatch({**ours, "value_settings": "value"})

    # An earlier price of a key, still active beside the one holding it, is archived; others are left.
    wants = [want for want in wanted(catalog) if want.lookup_key in ("metergate_tier_pro_monthly", USAGE_LOOKUP_KEY)]
    usage = {"id": "price_usage", "active": True, "currency": "usd", "product": "metergate_usage",
             "tax_behavior": "exclusive", "unit_amount_decimal": "0.0001",
             "recurring": {"interval": "month", "usage_type": "metered", "meter": "mtr_1"}}
    products = {want.product_id: {"name": want.product_name, "active": True} for want in wants}
    prices = {"metergate_tier_pro_monthly": {**pro, "lookup_key": "metergate_tier_pro_monthly"},
              USAGE_LOOKUP_KEY: {**usage, "lookup_key": USAGE_LOOKUP_KEY}}
    earlier = {**pro, "id": "price_pro_earlier", "lookup_key": None,
               "metadata": {"metergate": "metergate_tier_pro_monthly"}}
    hand_made = {**pro, "id": "price_by_hand", "lookup_key": None, "metadata": {}}
    active = {"metergate_tier_pro": [prices["metergate_tier_pro_monthly"], earlier, hand_made]}
    assert changes_to_make(wants, "metergate_usage_micros", "mtr_1", products, prices) == []
    (archive,) = changes_to_make(wants, "metergate_usage_micros", "mtr_1", products, prices, active)
    assert (archive.action, archive.target, archive.old_price_id, archive.params) == (
        "archive_price", "metergate_tier_pro_monthly", "price_pro_earlier", {"active": False})
