"""Publishing the catalog to Stripe (`metergate stripe ensure-products`): a product and a price
for each paid tier (monthly), each credit pack (one-off) and the postpaid meter (metered, on
the billing meter of `<prefix>_usage_micros`).

Every object has a name of metergate's own, so a run finds what an earlier one made and a
second run changes nothing: products by their id (`metergate_tier_pro`), prices by their
`lookup_key` (`metergate_tier_pro_monthly`), the meter by its event name. A Stripe price is
immutable: a new amount is a new price that takes the lookup key over (`transfer_lookup_key`),
and the old one is archived, so subscriptions on it keep running and new ones get the new one.

What Stripe holds under those names is checked, not taken on its name: a price whose amount,
currency, recurrence, product or tax behaviour differs from the catalog's is replaced (and the
service sells none: `tier_price_mismatch`); an earlier price of metergate's still on sale
(an archiving Stripe refused) is archived by the next run; a meter of the event name that
aggregates or maps customers otherwise than metergate sends is reported, never reused.

`wanted` and `changes_to_make` are pure (catalog and what Stripe holds → the changes, in
order); `ensure` reads Stripe, and makes the changes one by one, stopping at the first that
Stripe refuses: nothing after it is changed, and the error says what was done before it.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import stripe

from config.catalog import MICROS_PER_CENT, PAID_TIERS, Catalog

LOOKUP_KEYS_PER_LIST = 10  # Stripe's limit on lookup_keys in one price list
METERS_PAGES_MAX = 10
# Active prices read per product to find earlier ones still on sale; more (never made by
# metergate, which leaves one or two) wait for the next run.
PRODUCT_PRICES_MAX = 100
# The postpaid meter counts µUSD; one unit costs 0.0001 cent.
USAGE_CENTS_PER_MICRO = "0.0001"
USAGE_LOOKUP_KEY = "metergate_usage_micros"
USAGE_PRODUCT_ID = "metergate_usage"


def tier_lookup_key(tier: str) -> str:
    return f"metergate_tier_{tier}_monthly"


def pack_lookup_key(pack_id: str) -> str:
    return f"metergate_pack_{pack_id}"


TIER_OF_LOOKUP_KEY = {tier_lookup_key(tier): tier for tier in PAID_TIERS}


def tier_of_price(price: object, catalog: Catalog) -> str | None:
    """The paid tier a Stripe price is for (a subscription item's `price`: the object, or its
    id): the catalog's explicit id; else a price ensure-products published, by its lookup key
    or by the `metadata.metergate` it set, which stays on the old price when a repricing moves
    the key (subscriptions keep their price). The webhook and self-serve both read it here, so
    they never disagree on a subscription's tier. A price or metadata of another shape (an odd
    event) names no tier."""
    price_id = price.get("id") if isinstance(price, dict) else price
    explicit = next((tier for tier, known in catalog.stripe_prices.items()
                     if tier in PAID_TIERS and isinstance(price_id, str) and known == price_id), None)
    if explicit is not None or not isinstance(price, dict):
        return explicit
    metadata = price.get("metadata")
    for key in (price.get("lookup_key"), metadata.get("metergate") if isinstance(metadata, dict) else None):
        tier = TIER_OF_LOOKUP_KEY.get(key) if isinstance(key, str) else None
        if tier is not None and tier in catalog.tiers:
            return tier
    return None


class WantedPrice(NamedTuple):
    """One product and its one active price, as the catalog wants them in Stripe."""

    lookup_key: str
    product_id: str
    product_name: str
    unit_amount: int | None  # cents; None for the metered price (unit_amount_decimal)
    recurring: dict | None  # None: one-off
    metered: bool = False

    def price_params(self, meter_id: str | None) -> dict:
        # Prices are before tax (docs/integrate/stripe.md 7): Stripe Tax adds it on top, whatever
        # the account's default.
        params: dict = {"product": self.product_id, "currency": "usd", "lookup_key": self.lookup_key,
                        "metadata": {"metergate": self.lookup_key}, "tax_behavior": "exclusive"}
        if self.metered:
            assert meter_id is not None, "a metered price needs its meter"
            params["unit_amount_decimal"] = USAGE_CENTS_PER_MICRO
            params["recurring"] = {**(self.recurring or {}), "meter": meter_id}
        else:
            params["unit_amount"] = self.unit_amount
            if self.recurring is not None:
                params["recurring"] = self.recurring
        return params


class Change(NamedTuple):
    """One write to Stripe: what it does, to what, and its parameters."""

    action: str  # create_meter, create_product, update_product, create_price, replace_price, archive_price
    target: str  # the meter's event name, the product id or the lookup key
    detail: str
    params: dict
    old_price_id: str | None = None  # replace_price, archive_price: the price it archives


class EnsureFailed(Exception):
    """Stripe refused a change; `done` lists the changes made before it."""

    def __init__(self, message: str, done: list[Change]) -> None:
        super().__init__(message)
        self.done = done


def tier_wanted(catalog: Catalog, tier: str) -> WantedPrice | None:
    """The tier's monthly price as the catalog sells it; None: not on sale, or its price is the
    operator's own (an explicit id)."""
    amount = catalog.tier_monthly_micros.get(tier)
    if amount is None or tier in catalog.stripe_prices:
        return None
    return WantedPrice(tier_lookup_key(tier), f"metergate_tier_{tier}", f"metergate tier {tier}",
                       amount // MICROS_PER_CENT, {"interval": "month"})


def wanted(catalog: Catalog) -> list[WantedPrice]:
    """The products and prices the catalog wants, in the order they are made."""
    found = [want for tier in PAID_TIERS if (want := tier_wanted(catalog, tier)) is not None]
    for pack in sorted(catalog.packs.values(), key=lambda pack: pack.id):
        if pack.amount_micros % MICROS_PER_CENT:
            raise EnsureFailed(f"pack {pack.id}: amount_micros {pack.amount_micros} is not a whole number of cents", [])
        found.append(WantedPrice(pack_lookup_key(pack.id), f"metergate_pack_{pack.id}", f"metergate pack {pack.id}",
                                 pack.amount_micros // MICROS_PER_CENT, None))
    found.append(WantedPrice(USAGE_LOOKUP_KEY, USAGE_PRODUCT_ID, "metergate postpaid usage (µUSD)", None,
                             {"interval": "month", "usage_type": "metered"}, metered=True))
    return found


def meter_params(event_name: str) -> dict:
    """The billing meter postpaid usage is reported to (docs/integrate/stripe.md, section 6)."""
    return {"display_name": "metergate postpaid usage (µUSD)", "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"}}


def meter_mismatch(meter: dict) -> str | None:
    """How a meter of metergate's event name differs from what metergate sends (meter_params:
    µUSD in `value`, summed, by `stripe_customer_id`); None: it is that meter. Stripe changes
    none of these on a meter and holds one active meter per event name, so another shape is
    the operator's to settle: prices on it would bill something else."""
    want = meter_params(str(meter.get("event_name")))
    problems = []
    for part, field in (("default_aggregation", "formula"), ("customer_mapping", "type"),
                        ("customer_mapping", "event_payload_key"), ("value_settings", "event_payload_key")):
        held = meter.get(part)
        held = held.get(field) if isinstance(held, dict) else None
        if held != want[part][field]:
            problems.append(f"{part}.{field} is {held!r} (metergate's: {want[part][field]!r})")
    return "; ".join(problems) or None


def _usd(cents: object) -> str:
    if not isinstance(cents, int) or isinstance(cents, bool):
        return f"{cents!r} cents"
    return f"{cents // 100}.{cents % 100:02d} USD"


def price_mismatch(price: dict, want: WantedPrice, meter_id: str | None) -> str | None:
    """How a price Stripe holds differs from the one the catalog wants, as words that follow
    "the price …"; None: it is that price. ensure-products replaces such a price, and the
    service sells none (tier_price_mismatch): the catalog's amount, or no charge."""
    recurring = price.get("recurring") if isinstance(price.get("recurring"), dict) else None
    if not price.get("active"):
        return "is archived"
    if price.get("currency") != "usd":
        return f"is in {price.get('currency')!r} (the catalog: usd)"
    if price.get("product") != want.product_id:
        return f"is of product {price.get('product')!r} (the catalog: {want.product_id})"
    if price.get("tax_behavior") != "exclusive":
        return f"has tax_behavior {price.get('tax_behavior')!r} (the catalog: exclusive, before tax)"
    if want.metered:
        if str(price.get("unit_amount_decimal")) not in (USAGE_CENTS_PER_MICRO, "0.0001000000"):
            return f"bills {price.get('unit_amount_decimal')!r} cent per unit (the catalog: {USAGE_CENTS_PER_MICRO})"
        if recurring is None or recurring.get("usage_type") != "metered" or recurring.get("interval") != "month":
            return "is not metered monthly (the catalog: metered monthly)"
        if recurring.get("meter") != meter_id:
            return f"is on meter {recurring.get('meter')!r} (the catalog: {meter_id})"
        return None
    if price.get("unit_amount") != want.unit_amount:
        return f"bills {_usd(price.get('unit_amount'))} (the catalog: {_usd(want.unit_amount)})"
    if want.recurring is None:
        return None if recurring is None else "recurs (the catalog: one-off)"
    if recurring is None:
        return "is one-off (the catalog: monthly)"
    if recurring.get("interval") != want.recurring["interval"] or recurring.get("interval_count", 1) != 1:
        return (f"recurs every {recurring.get('interval_count', 1)} {recurring.get('interval')} "
                f"(the catalog: every {want.recurring['interval']})")
    if recurring.get("usage_type", "licensed") != "licensed":
        return "is metered (the catalog: licensed, one per month)"
    return None


def tier_price_mismatch(price: dict, catalog: Catalog, tier: str) -> str | None:
    """How the price found under a tier's lookup key differs from what the catalog sells the
    tier at (price_mismatch); None: it may be sold."""
    want = tier_wanted(catalog, tier)
    assert want is not None, f"tier {tier} has an explicit price or none: no lookup key to check"
    return price_mismatch(price, want, None)


def _describe(want: WantedPrice) -> str:
    if want.metered:
        return f"{USAGE_CENTS_PER_MICRO} cent per µUSD, metered monthly"
    return f"{_usd(want.unit_amount)} per month" if want.recurring else f"{_usd(want.unit_amount)} once"


def changes_to_make(wants: list[WantedPrice], event_name: str, meter_id: str | None,
                    products: dict[str, dict], prices: dict[str, dict],
                    active_prices: dict[str, list[dict]] | None = None) -> list[Change]:
    """What to write so that Stripe holds `wants`: products by id, prices by lookup key (what
    Stripe holds: `products`, `prices`); the meter first, when there is none of `event_name`.
    `active_prices` (by product): an earlier price of a lookup key, still active though the key
    moved on (the archiving of a replacement that Stripe refused), is archived."""
    active_prices = active_prices or {}
    changes = []
    if meter_id is None:
        changes.append(Change("create_meter", event_name, f"billing meter {event_name} (sum of value)",
                              meter_params(event_name)))
    for want in wants:
        product = products.get(want.product_id)
        if product is None:
            changes.append(Change("create_product", want.product_id, want.product_name,
                                  {"id": want.product_id, "name": want.product_name,
                                   "metadata": {"metergate": want.lookup_key}}))
        elif product.get("name") != want.product_name or not product.get("active", True):
            changes.append(Change("update_product", want.product_id, f"{want.product_name} (active)",
                                  {"name": want.product_name, "active": True}))
        price = prices.get(want.lookup_key)
        if price is None:
            changes.append(Change("create_price", want.lookup_key, _describe(want), want.price_params(meter_id)
                                  if meter_id or not want.metered else {}))
        elif (mismatch := price_mismatch(price, want, meter_id)) is not None:
            params = {**(want.price_params(meter_id) if meter_id or not want.metered else {}),
                      "transfer_lookup_key": True}
            changes.append(Change("replace_price", want.lookup_key,
                                  f"{_describe(want)} (was {price['id']}, which {mismatch}; archived)", params,
                                  price["id"]))
        holder = price["id"] if price is not None else None
        for earlier in active_prices.get(want.product_id, []):
            metadata = earlier.get("metadata") if isinstance(earlier.get("metadata"), dict) else {}
            if earlier["id"] != holder and earlier.get("active") and metadata.get("metergate") == want.lookup_key \
                    and earlier.get("lookup_key") != want.lookup_key:
                changes.append(Change("archive_price", want.lookup_key, f"{earlier['id']}, an earlier price still on "
                                      "sale (its archiving failed)", {"active": False}, earlier["id"]))
    return changes


def _key(change: Change) -> str:
    """The Stripe idempotency key of a change: a retried run after a crash repeats, not doubles, it."""
    digest = hashlib.sha256(json.dumps([change.action, change.target, change.params, change.old_price_id],
                                       sort_keys=True).encode()).hexdigest()[:32]
    return f"metergate:ensure-products:{change.action}:{change.target}:{digest}"


def _stripe_message(exc: stripe.StripeError) -> str:
    return f"{exc.http_status or 'no answer'} {exc.user_message or exc}".replace("\n", " ")


def _read(client: stripe.StripeClient, event_name: str, wants: list[WantedPrice]):
    """What Stripe holds: the meter of event_name, the products, the prices by lookup key and
    the active prices of each product."""
    meter = None
    params: dict = {"limit": 100}
    for _ in range(METERS_PAGES_MAX):
        page = client.v1.billing.meters.list(params=params)
        meter = next((m.to_dict() for m in page.data if m.event_name == event_name and m.status == "active"), None)
        if meter is not None or not page.has_more or not page.data:
            break
        params = {**params, "starting_after": page.data[-1].id}
    products = {}
    for want in wants:
        try:
            products[want.product_id] = client.v1.products.retrieve(want.product_id).to_dict()
        except stripe.InvalidRequestError as exc:
            if exc.http_status != 404:
                raise
    prices = {}
    keys = [want.lookup_key for want in wants]
    for start in range(0, len(keys), LOOKUP_KEYS_PER_LIST):
        page = client.v1.prices.list(params={"lookup_keys": keys[start:start + LOOKUP_KEYS_PER_LIST], "limit": 100})
        prices.update({price.lookup_key: price.to_dict() for price in page.data})
    active_prices = {}
    for product_id in products:
        page = client.v1.prices.list(params={"product": product_id, "active": True, "limit": PRODUCT_PRICES_MAX})
        active_prices[product_id] = [price.to_dict() for price in page.data]
    return meter, products, prices, active_prices


def _read_or_fail(client: stripe.StripeClient, event_name: str, wants: list[WantedPrice]):
    """What Stripe holds (_read), the meter as its id; a meter of another shape stops the run."""
    try:
        meter, products, prices, active_prices = _read(client, event_name, wants)
    except stripe.StripeError as exc:
        raise EnsureFailed(f"Stripe refused to show its products and prices: {_stripe_message(exc)}", []) from None
    mismatch = None if meter is None else meter_mismatch(meter)
    if mismatch is not None:
        raise EnsureFailed(f"billing meter {meter.get('id')} of event name {event_name}: {mismatch}. Stripe changes "
                           "none of these on a meter: deactivate it in Stripe, or set METERGATE_STRIPE_METER_PREFIX "
                           "to a prefix of its own", [])
    return (None if meter is None else meter["id"]), products, prices, active_prices


def plan(client: stripe.StripeClient, catalog: Catalog, event_name: str) -> list[Change]:
    """The changes a run would make, read from Stripe and changing nothing (--dry-run)."""
    wants = wanted(catalog)
    return changes_to_make(wants, event_name, *_read_or_fail(client, event_name, wants))


def ensure(client: stripe.StripeClient, catalog: Catalog, event_name: str) -> list[Change]:
    """Make Stripe hold what the catalog wants; the changes made (none: it already did)."""
    wants = wanted(catalog)
    meter_id, products, prices, active_prices = _read_or_fail(client, event_name, wants)
    by_key = {want.lookup_key: want for want in wants}
    done: list[Change] = []
    for change in changes_to_make(wants, event_name, meter_id, products, prices, active_prices):
        options = {"idempotency_key": _key(change)}
        try:
            if change.action == "create_meter":
                meter_id = client.v1.billing.meters.create(params=change.params, options=options).id
            elif change.action == "create_product":
                client.v1.products.create(params=change.params, options=options)
            elif change.action == "update_product":
                client.v1.products.update(change.target, params=change.params, options=options)
            elif change.action == "create_price":
                client.v1.prices.create(params=by_key[change.target].price_params(meter_id), options=options)
            elif change.action == "archive_price":
                client.v1.prices.update(change.old_price_id, params=change.params, options=options)
            else:
                assert change.action == "replace_price" and change.old_price_id is not None, change
                params = {**by_key[change.target].price_params(meter_id), "transfer_lookup_key": True}
                new_price = client.v1.prices.create(params=params, options=options)
                try:
                    client.v1.prices.update(change.old_price_id, params={"active": False},
                                            options={"idempotency_key": _key(change) + ":archive"})
                except stripe.StripeError as exc:
                    raise EnsureFailed(f"replace_price {change.target}: {new_price.id} holds the lookup key now, but "
                                       f"Stripe refused to archive {change.old_price_id}: {_stripe_message(exc)}",
                                       done) from None
        except stripe.StripeError as exc:
            raise EnsureFailed(f"{change.action} {change.target}: Stripe refused: {_stripe_message(exc)}",
                               done) from None
        done.append(change)
    return done
