"""The auto-recharge charger: one off-session PaymentIntent per charge an org asked for.

It runs in the shard process, outside the commit loop: the org's commit has recorded the
charge as pending before anything is sent, and the outcome comes back as a SettleRecharge
command through the same loop. Every attempt at one charge carries the same Stripe
idempotency key (the org, its creation time and the charge number), so a retry after a
timeout or a shard restart can never charge twice; the payment method the first attempt used
is kept in Postgres under that key (storage/charge_methods.py), so every attempt, after a
restart too, sends the same parameters. Stripe's own `payment_intent.*` events build the same
SettleRecharge, so whichever arrives second changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import stripe

from actors import metrics
from actors.clock import now_us
from actors.commands import SettleRecharge
from actors.recharge import MICROS_PER_CENT, ChargeRequest
from config.settings import Settings, stripe_client
from storage import charge_methods, holds, stripe_customers

log = logging.getLogger("metergate.charger")

RETRY_DELAYS_S = (0.5, 2.0, 8.0)  # then the charge stays pending; the shard tries again later
# Stripe keeps an idempotency key for 24 hours. A charge still unsettled after this long is
# given up (settled as failed, auto-recharge paused) rather than sent again under a key Stripe
# may have forgotten; if Stripe did take the money, its payment_intent.succeeded credits it.
GIVE_UP_AFTER_US = 23 * 3_600 * 1_000_000
# A charge of an org with no Stripe customer yet waits this long for one (an import links it just
# after the commit that asked for the charge) before it fails as no_stripe_customer.
CUSTOMER_WAIT_US = 10 * 60 * 1_000_000


class StripeUnavailable(Exception):
    """Stripe did not answer (network, 5xx, 429): the charge stays pending and is retried."""


def _raise_if_outage(exc: stripe.StripeError) -> None:
    """Count a failed Stripe call; raise StripeUnavailable when it says nothing about the
    charge (network, 5xx, 429, or 409: an attempt still running), so it stays pending."""
    metrics.stripe_failed("auto_recharge", exc)
    status = exc.http_status
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError)) or status is None or status >= 500 \
            or status == 409:
        raise StripeUnavailable(str(exc)) from None


async def _under_the_key_it_was_sent_with(conn, request: ChargeRequest) -> ChargeRequest:
    """A charge asked for before keys carried the instant it was asked for (`...:ar_<k>`), and
    sent to Stripe then, keeps that key: sent again under the new one, Stripe would charge twice.
    Its first attempt recorded its payment method under the key it was sent with."""
    legacy = request.idempotency_key.rpartition(":")[0]
    if legacy.endswith(f":auto_recharge:{request.charge_id}") and \
            await charge_methods.chosen(conn, request.idempotency_key) is None and \
            await charge_methods.chosen(conn, legacy) is not None:
        return msgspec.structs.replace(request, idempotency_key=legacy)
    return request


class Charger:
    def __init__(self, settings: Settings, pool) -> None:
        self.pool = pool
        self.client: stripe.StripeClient | None = stripe_client(settings)

    async def charge(self, request: ChargeRequest) -> SettleRecharge | None:
        """The outcome to settle, or None when Stripe could not be reached (still pending)."""
        if self.client is None:
            return self._failed(request, None, "stripe_not_configured")
        if request.requested_us and now_us() - request.requested_us > GIVE_UP_AFTER_US:
            return self._failed(request, None, "unconfirmed_after_23h")
        async with self.pool.acquire() as conn:
            customer = await stripe_customers.customer_of(conn, request.org_id)
            request = await _under_the_key_it_was_sent_with(conn, request)
        if customer is None:
            if request.requested_us and now_us() - request.requested_us < CUSTOMER_WAIT_US:
                # Asked for in the same commit that made the org or its card (an import links
                # its Stripe customer right after the org's commit): stays pending, and the shard
                # asks again (shard_charges, every RECHARGE_RETRY_AFTER_S) once it may be there.
                log.info("auto-recharge %s/%s: no Stripe customer yet; pending", request.org_id, request.charge_id)
                return None
            return self._failed(request, None, "no_stripe_customer")
        for attempt, delay in enumerate((0.0,) + RETRY_DELAYS_S):
            await asyncio.sleep(delay)
            if await self._held(request):  # stays pending; the shard asks again after the hold is off
                return None
            try:
                method = await self._method_of(request, customer)
                if method is None:
                    return self._failed(request, None, "no_payment_method")
                return await asyncio.to_thread(self._charge_now, request, customer, method)
            except StripeUnavailable as exc:
                log.warning("auto-recharge %s/%s: Stripe unavailable (attempt %s): %s",
                            request.org_id, request.charge_id, attempt + 1, exc)
        return None

    async def _held(self, request: ChargeRequest) -> bool:
        """Whether a restore's hold keeps charges from Stripe now (read before every attempt)."""
        async with self.pool.acquire() as conn:
            held = await holds.held(conn, holds.CHARGES)
        if held is not None:
            log.warning("auto-recharge %s/%s held: %s", request.org_id, request.charge_id, held)
        return held is not None

    async def _method_of(self, request: ChargeRequest, customer: str) -> str | None:
        """The payment method of this charge: the one its first attempt chose, else the
        customer's now, recorded before anything is sent (the first recorded wins)."""
        async with self.pool.acquire() as conn:
            method = await charge_methods.chosen(conn, request.idempotency_key)
        if method is not None:
            return method
        method = await asyncio.to_thread(self._payment_method, customer)
        if method is None:
            return None
        async with self.pool.acquire() as conn:
            method = await charge_methods.choose(conn, request.idempotency_key, method)
            # A new charge is rare (auto-recharge, behind a cooldown): pruning here costs nothing.
            await charge_methods.prune(conn)
        return method

    def _charge_now(self, request: ChargeRequest, customer: str, method: str) -> SettleRecharge | None:
        client = self.client
        try:
            # Every attempt of one charge sends the same parameters, or Stripe refuses the key.
            intent = client.v1.payment_intents.create(params={
                "amount": request.amount_micros // MICROS_PER_CENT, "currency": "usd",
                "customer": customer, "payment_method": method, "off_session": True, "confirm": True,
                "metadata": {"org_id": request.org_id, "kind": "auto_recharge", "charge_id": request.charge_id,
                             "amount_micros": str(request.amount_micros)},
            }, options={"idempotency_key": request.idempotency_key})
        except stripe.CardError as exc:
            metrics.stripe_failed("auto_recharge", exc)
            intent = (exc.error.payment_intent if exc.error else None) or {}
            return self._failed(request, intent.get("id"), exc.code or "card_declined")
        except stripe.IdempotencyError as exc:
            metrics.stripe_failed("auto_recharge", exc)
            if exc.http_status == 409:  # an attempt under this key is still running at Stripe
                raise StripeUnavailable(str(exc)) from None
            # The key was sent before with other parameters: Stripe will never take this
            # request, so it is an answer, not an outage. Settled as failed (auto-recharge
            # pauses); if the first attempt did take the money, Stripe's
            # payment_intent.succeeded still credits it (SettleRecharge is keyed by the intent).
            return self._failed(request, None, "idempotency_conflict")
        except stripe.StripeError as exc:
            _raise_if_outage(exc)
            return self._failed(request, None, exc.code or "stripe_refused")
        if intent.status == "succeeded":
            return SettleRecharge.of_payment(request.charge_id, True, intent.amount * MICROS_PER_CENT, intent.id)
        if intent.status == "processing":
            # The outcome comes with payment_intent.succeeded / payment_failed; until then the
            # shard asks again every few minutes, same key, so Stripe answers with this intent.
            return None
        return self._failed(request, intent.id, intent.status)  # e.g. requires_action: off session, a failure

    def _payment_method(self, customer_id: str) -> str | None:
        """The customer's default payment method, else the one saved last, of any type: a SEPA
        debit or a bank account is charged off session as a card is. Stripe unreachable:
        StripeUnavailable (the charge stays pending)."""
        try:
            customer = self.client.v1.customers.retrieve(customer_id).to_dict()
            default = (customer.get("invoice_settings") or {}).get("default_payment_method")
            if default:
                return default if isinstance(default, str) else default["id"]
            # Stripe lists newest first; without `type`, every type the customer has.
            methods = self.client.v1.payment_methods.list(params={"customer": customer_id})
        except stripe.StripeError as exc:
            _raise_if_outage(exc)
            return None  # e.g. a customer deleted in Stripe: nothing to charge
        return methods.data[0].id if methods.data else None

    @staticmethod
    def _failed(request: ChargeRequest, payment_id: str | None, reason: str) -> SettleRecharge:
        log.info("auto-recharge %s/%s failed: %s", request.org_id, request.charge_id, reason)
        return SettleRecharge.of_payment(request.charge_id, False, request.amount_micros, payment_id, reason)
