"""Stripe events → org commands. Pure: an event in, (org_id, command) pairs out.

Money effects carry an idempotency key named after the Stripe object that moved the money
(the payment intent, the refund). The ledger's unique key then applies each one once, in
the same transaction as its entry, however many events report it and in whatever order.
Tier changes carry the event's `created` time, so an older event never undoes a newer one.
Objects name their org in `metadata.org_id` (or a checkout session's `client_reference_id`),
which metergate sets on everything it creates in Stripe, or by their `customer`, whose org
is kept in stripe_customers.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.commands import (Command, Credit, InvoiceFailed, InvoicePaid, RefundPayment, ResetPeriod,
                             SetPaymentMethod, SettleRecharge, SetTier)
from actors.org import MAX_AMOUNT_MICROS, MICROS_PER_CENT
from actors.timeutil import MAX_PLAUSIBLE_S
from config.catalog import Catalog

PAID_TIERS = ("pro", "pro_plus", "pro_plus_plus")
ENDED_SUBSCRIPTION = ("canceled", "unpaid", "incomplete_expired")


@dataclass(frozen=True)
class DunningPolicy:
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan: str




def _integer(value, field: str, low: int, high: int) -> int:
    """An integer field of an event, within bounds the core can hold (else the event is refused).

    Stripe sends a JSON integer, or in metadata (always strings) ASCII digits. Nothing else is
    read as a number: int() would truncate 12.7 to 12, take `true` as 1 and "١٢" or " +12" as 12.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise EventError(f"{field} is not an integer")
    if not low <= number <= high:
        raise EventError(f"{field} is out of range")
    return number


def _micros(value, field: str) -> int:
    return _integer(value, field, 1, MAX_AMOUNT_MICROS)


def _cents(value, field: str, low: int = 1) -> int:
    """Stripe's cents as micro-USD."""
    return _integer(value, field, low, MAX_AMOUNT_MICROS // MICROS_PER_CENT) * MICROS_PER_CENT


def _epoch_s(value, field: str) -> int:
    return _integer(value, field, 0, MAX_PLAUSIBLE_S)


class EventError(ValueError):
    """An event that names an org but cannot be applied as sent (a field missing or wrong)."""


def org_of(obj: dict) -> str | None:
    org_id = (obj.get("metadata") or {}).get("org_id") or obj.get("client_reference_id")
    return org_id if isinstance(org_id, str) and org_id else None


def customer_of(event: dict) -> str | None:
    customer = ((event.get("data") or {}).get("object") or {}).get("customer")
    return customer if isinstance(customer, str) else None


def commands_for(event: dict, catalog: Catalog, customer_org: str | None = None,
                 dunning: DunningPolicy | None = None) -> list[tuple[str, Command]]:
    """`customer_org`: the org whose Stripe customer the object names, for objects without our metadata."""
    obj = (event.get("data") or {}).get("object") or {}
    kind = event.get("type", "")
    org_id = org_of(obj) or customer_org
    if org_id is None:
        return []
    as_of_us = _epoch_s(event.get("created", 0), "created") * 1_000_000
    try:
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            return [(org_id, c) for c in _checkout(obj, catalog, as_of_us)]
        if kind in ("setup_intent.succeeded", "payment_method.attached"):
            return [(org_id, SetPaymentMethod(True))]
        if kind in ("customer.subscription.created", "customer.subscription.updated"):
            commands = _subscription(obj, catalog, as_of_us)
            period = _current_period(obj)
            if period is not None:
                commands.append(ResetPeriod(*period))
            return [(org_id, c) for c in commands]
        if kind == "invoice.payment_failed" and dunning is not None:
            free = catalog.current_plan(dunning.free_plan, as_of_us)
            if free is None:
                raise EventError(f"the dunning free plan {dunning.free_plan!r} is not in the catalog")
            return [(org_id, InvoiceFailed(as_of_us, dunning.suspend_after_s, dunning.degrade_after_s,
                                           dunning.downgrade_after_s, free.id, free.version, _str(obj.get("id"))))]
        if kind in ("invoice.paid", "invoice.payment_succeeded"):
            paid = obj.get("amount_paid")
            return [(org_id, InvoicePaid(as_of_us, _str(obj.get("id")), _cents(paid, "amount_paid", 0) // MICROS_PER_CENT if paid is not None else None))]
        if kind == "customer.subscription.deleted":
            return [(org_id, _base_tier(catalog, as_of_us))]
        if kind == "charge.refunded":
            return [(org_id, c) for c in _refunds(obj)]
        if kind in ("payment_intent.succeeded", "payment_intent.payment_failed"):
            return [(org_id, c) for c in _auto_recharge(obj, kind == "payment_intent.succeeded")]
    except (KeyError, TypeError, ValueError) as exc:
        raise EventError(f"{kind}: {exc!r}") from None
    return []


def _checkout(session: dict, catalog: Catalog, as_of_us: int) -> list[Command]:
    mode = session.get("mode")
    if mode == "setup":
        return [SetPaymentMethod(True)]
    if mode == "subscription":
        return _subscription({"status": "active", "metadata": session.get("metadata")}, catalog, as_of_us)
    if mode != "payment" or session.get("payment_status") != "paid":
        return []  # not paid yet: async methods report later with async_payment_succeeded
    metadata = session.get("metadata") or {}
    amount = _micros(metadata["credit_micros"], "metadata.credit_micros") if metadata.get("credit_micros") else \
        _cents(session["amount_total"], "amount_total")
    expires = metadata.get("credit_expires_at")
    intent = _str(session.get("payment_intent"))
    payment = intent or session["id"]
    return [Credit("topup", amount, _epoch_s(expires, "metadata.credit_expires_at") * 1_000_000 if expires else None,
                   f"Stripe checkout {session['id']}", f"stripe:payment:{payment}", intent)]


def _subscription(subscription: dict, catalog: Catalog, as_of_us: int) -> list[Command]:
    tier = (subscription.get("metadata") or {}).get("tier")
    status = subscription.get("status")
    if status in ENDED_SUBSCRIPTION:
        return [_base_tier(catalog, as_of_us)]
    if status in ("active", "trialing") and tier in PAID_TIERS:
        return [SetTier(tier, catalog.tiers[tier], as_of_us)]
    return []


def _str(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _current_period(subscription: dict) -> tuple[int, int | None] | None:
    """The subscription's current period in µs; newer API versions keep it on the items."""
    holder = subscription
    if not holder.get("current_period_start"):
        items = (subscription.get("items") or {}).get("data") or []
        holder = items[0] if items and isinstance(items[0], dict) else {}
    start, end = holder.get("current_period_start"), holder.get("current_period_end")
    if not start:
        return None
    return (_epoch_s(start, "current_period_start") * 1_000_000,
            _epoch_s(end, "current_period_end") * 1_000_000 if end else None)


def _base_tier(catalog: Catalog, as_of_us: int) -> SetTier:
    return SetTier(catalog.default_tier, catalog.tiers[catalog.default_tier], as_of_us)


def _auto_recharge(intent: dict, succeeded: bool) -> list[Command]:
    """Only our own off-session charges: a checkout's payment is credited by its session."""
    metadata = intent.get("metadata") or {}
    if metadata.get("kind") != "auto_recharge":
        return []
    error = intent.get("last_payment_error") or {}
    reason = error.get("code") or error.get("decline_code") or "payment_failed"
    return [SettleRecharge.of_payment(metadata["charge_id"], succeeded, _cents(intent["amount"], "amount"),
                                      intent["id"], reason)]


def _refunds(charge: dict) -> list[Command]:
    """Each refund claws back only what its payment bought (billing-rules 3): the payment is
    the charge's payment intent, which a credit paid through Stripe remembers."""
    refunds = (charge.get("refunds") or {}).get("data")
    if refunds is None:
        raise EventError("charge.refunded without refunds.data; expand `refunds` on the webhook")
    payment = _str(charge.get("payment_intent")) or _str(charge.get("id"))
    if payment is None:
        raise EventError("charge.refunded names no charge id")
    commands: list[Command] = []
    for refund in refunds:
        if refund.get("status", "succeeded") != "succeeded":
            continue
        refund_id = _str(refund.get("id"))
        if refund_id is None:
            raise EventError("a refund in refunds.data has no id")
        commands.append(RefundPayment(refund_id, payment, _cents(refund["amount"], "refunds.amount"),
                                      f"Stripe refund {refund_id} of {payment}", f"stripe:refund:{refund_id}"))
    return commands
