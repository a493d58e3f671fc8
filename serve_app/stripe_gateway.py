"""Calls to Stripe: stripe-python, an idempotency key on every write, errors mapped once.

The API base and key come from the settings, so tests point it at a server on loopback.
stripe-python is synchronous; calls run in a thread so the replica's loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import stripe

from actors import metrics
from actors.stripe_products import tier_lookup_key, tier_price_mismatch
from config.catalog import Catalog
from config.settings import Settings, stripe_client
from serve_app.errors import ApiError

# Within this window, the same request (a double click) gets the same Checkout Session.
DOUBLE_CLICK_WINDOW_S = 600
# A tier's price found by its lookup key is kept this long: after `metergate stripe
# ensure-products` moves a key to a new price, new Checkouts take it within a minute (at once
# when Stripe refuses the old one: it is archived).
PRICE_CACHE_S = 60


class StripeRefused(Exception):
    """Stripe answered a read for good with a refusal (not 404, not 429, not 5xx)."""


class StripeGateway:
    def __init__(self, settings: Settings) -> None:
        self.client: stripe.StripeClient | None = stripe_client(settings, max_network_retries=2)
        self._prices: dict[str, tuple[str, float]] = {}  # lookup key -> (price id, monotonic time found)

    def require(self) -> stripe.StripeClient:
        if self.client is None:
            raise ApiError(503, "stripe_not_configured", "METERGATE_STRIPE_SECRET_KEY is not set on this server")
        return self.client

    async def create(self, method, params: dict, idempotency_key: str):
        """One Stripe write; the same key always names the same operation."""
        return await self.call(method, params, {"idempotency_key": idempotency_key})

    async def look_up(self, caller: str, what: str, method, *args, **kwargs):
        """A read a Stripe webhook needs: its answer, or None when Stripe says there is no such
        object. A permanent refusal (another 4xx: a key that may not read it) is StripeRefused,
        for the event to be a dead letter; Stripe out of reach (network, 5xx, 429) is a 503, so
        Stripe delivers the event again."""
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except stripe.StripeError as exc:
            metrics.stripe_failed(caller, exc)
            status = exc.http_status
            if status == 404:
                return None
            if status is not None and 400 <= status < 500 and status != 429:
                raise StripeRefused(f"Stripe refused to show {what}: {exc.user_message or exc}") from None
            raise ApiError(503, "stripe_unavailable",
                           f"Stripe could not show {what}: {exc.user_message or exc}") from None

    async def with_tier_price(self, catalog: Catalog, tier: str, write):
        """`await write(price_id)` with the Stripe price of a paid tier: the catalog's explicit
        id, else the active price holding the tier's lookup key (published by `metergate stripe
        ensure-products`). A price kept from an earlier look-up that Stripe refuses is looked up
        again: it may have been archived since (a repricing moves the key to a new price, and
        Stripe takes no archived price), and the write goes again once on the new one."""
        explicit = catalog.stripe_prices.get(tier)
        if explicit is not None:
            return await write(explicit)
        key = tier_lookup_key(tier)
        cached = self._prices.get(key)
        if cached is None or time.monotonic() - cached[1] >= PRICE_CACHE_S:
            return await write(await self._look_up_tier_price(catalog, tier))
        try:
            return await write(cached[0])
        except ApiError as exc:
            if exc.code != "stripe_error":
                raise
            self._prices.pop(key, None)
            price_id = await self._look_up_tier_price(catalog, tier)
            if price_id == cached[0]:
                raise  # still the price under the key: Stripe refused the write for another reason
            return await write(price_id)

    async def _look_up_tier_price(self, catalog: Catalog, tier: str) -> str:
        """The active price under the tier's lookup key, checked against the catalog (amount,
        USD, monthly, licensed, before tax) before it is kept: a price that differs would charge
        what the catalog does not say, so it is an error for the operator, not a sale."""
        key = tier_lookup_key(tier)
        client = self.require()
        page = await self.call(client.v1.prices.list, {"lookup_keys": [key], "active": True, "limit": 1})
        if not page.data:
            raise ApiError(503, "stripe_price_missing", f"Stripe has no active price with lookup key {key} for tier "
                           f"{tier}: run `metergate stripe ensure-products`", tier=tier)
        price = page.data[0].to_dict()
        mismatch = tier_price_mismatch(price, catalog, tier)
        if mismatch is not None:
            raise ApiError(503, "stripe_price_mismatch", f"Stripe's price {price['id']} under lookup key {key} "
                           f"{mismatch}: tier {tier} is not sold on it; run `metergate stripe ensure-products`",
                           tier=tier, price=price["id"])
        self._prices[key] = (price["id"], time.monotonic())
        return price["id"]

    async def call(self, method, params: dict, options: dict | None = None):
        try:
            return await asyncio.to_thread(method, params=params, options=options or {})
        except stripe.StripeError as exc:
            metrics.stripe_failed("self_serve", exc)
            raise ApiError(502, "stripe_error", f"Stripe refused the request: {exc.user_message or exc}") from None


def operation_key(org_id: str, operation: str, params: dict, caller_key: str | None, now_s: int) -> str:
    """An idempotency key from the operation: the caller's own key, or the content and a time window."""
    if caller_key:
        return f"metergate:{org_id}:{operation}:key:{caller_key}"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
    return f"metergate:{org_id}:{operation}:{digest}:{now_s // DOUBLE_CLICK_WINDOW_S}"
