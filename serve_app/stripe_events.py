"""Stripe events → org commands. Pure: an event in, (org_id, command) pairs out.

Money effects carry an idempotency key named after the Stripe object that moved the money
(the payment intent, the refund). The ledger's unique key then applies each one once, in
the same transaction as its entry, however many events report it and in whatever order.
Subscription changes carry the event's `created` time and the subscription's id, so an older
event of a subscription never undoes a newer one. Objects name their org in
`metadata.org_id` (or a checkout session's `client_reference_id`), which metergate sets on
everything it creates in Stripe, or by their `customer`, whose org is kept in
stripe_customers; refunds and disputes name only their payment, whose credit names the org.
Every type metergate acts on is in HANDLED, every type it deliberately leaves in IGNORED
(docs/stripe.md is drawn from both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from actors.commands import (Command, Credit, DisputeFunds, InvoiceFailed, InvoicePaid, RefundPayment,
                             ReverseRefund, SettleRecharge, SubscriptionChanged)
from actors.org import MAX_AMOUNT_MICROS, MICROS_PER_CENT
from actors.stripe_products import tier_of_price
from actors.timeutil import MAX_PLAUSIBLE_S
from config.catalog import Catalog

PAID_TIERS = ("pro", "pro_plus", "pro_plus_plus")


@dataclass(frozen=True)
class DunningPolicy:
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan: str
    one_off_invoices: bool = False  # whether a failed one-off invoice starts dunning too




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
    """The org an object names: its metadata (an invoice: its subscription's), or a Checkout
    session's client_reference_id."""
    parent = obj.get("parent")
    details = (parent.get("subscription_details") or {}) if isinstance(parent, dict) else {}
    subscription_metadata = (details.get("metadata") or {}) if isinstance(details, dict) else {}
    org_id = ((obj.get("metadata") or {}).get("org_id") or obj.get("client_reference_id")
              or (subscription_metadata.get("org_id") if isinstance(subscription_metadata, dict) else None))
    return org_id if isinstance(org_id, str) and org_id else None


def customer_of(event: dict) -> str | None:
    customer = ((event.get("data") or {}).get("object") or {}).get("customer")
    return customer if isinstance(customer, str) else None


@dataclass(frozen=True)
class PaymentCredit:
    """What one Stripe payment bought, from the ledger entry its credit made."""

    org_id: str
    grant_id: str | None
    credited_micros: int
    lapsed_micros: int = 0  # what of that credit expired unused
    paid_micros: int | None = None  # what the payment was, tax included (None: not kept, before 0017)


@dataclass(frozen=True)
class Facts:
    """What the edge looked up for an event: the org of the object's customer, and the credit
    of each payment the event names (a refund or a dispute names only its payment)."""

    customer_org: str | None = None
    payments: Mapping[str, PaymentCredit] = field(default_factory=dict)


class Skipped(Exception):
    """An event that by rule asks nothing of metergate (a one-off invoice, a payment of no org
    here): answered, recorded as ignored with why."""


class Refused(EventError):
    """An event metergate will not apply by rule (money in another currency, a one-off
    invoice, a payment it never credited): recorded with why, for the operator."""


REFUND_EVENTS = ("refund.created", "refund.updated", "refund.failed", "charge.refund.updated")
SUBSCRIPTION_EVENTS = ("customer.subscription.created", "customer.subscription.updated",
                       "customer.subscription.deleted", "customer.subscription.paused",
                       "customer.subscription.resumed")
INVOICE_SETTLED = {"invoice.paid": "paid", "invoice.payment_succeeded": "paid", "invoice.voided": "voided",
                   "invoice.marked_uncollectible": "uncollectible"}

# Every event type metergate acts on, and what it does (docs/stripe.md lists these).
HANDLED = {
    "checkout.session.completed": "paid top-up: credit (USD only); paid subscription: its tier; setup: card on "
                                  "file while Stripe lists one (asked)",
    "checkout.session.async_payment_succeeded": "as checkout.session.completed, once the payment cleared",
    "customer.subscription.created": "the subscription's status, tier (by price, else metadata) and period",
    "customer.subscription.updated": "the subscription's status, tier (by price, else metadata) and period",
    "customer.subscription.deleted": "the subscription ends; the tier is the highest one still paid for",
    "customer.subscription.paused": "a paused subscription pays for no tier",
    "customer.subscription.resumed": "the subscription's tier again",
    "invoice.payment_failed": "a subscription invoice failed: the dunning clock starts",
    "invoice.paid": "the invoice is settled; dunning ends when no failed invoice is open",
    "invoice.payment_succeeded": "the invoice is settled; dunning ends when no failed invoice is open",
    "invoice.voided": "the invoice is settled without payment",
    "invoice.marked_uncollectible": "the invoice is settled without payment",
    "charge.refunded": "each refund (pending or succeeded) claws back from its payment's credit; a failed one gives back",
    "refund.created": "the refund claws back from its payment's credit",
    "refund.updated": "pending/succeeded: claws back; failed/canceled: gives back what it took; requires_action: nothing yet",
    "refund.failed": "gives back what the refund took",
    "charge.refund.updated": "as refund.updated",
    "charge.dispute.funds_withdrawn": "takes back what the disputed payment bought, spent or not",
    "charge.dispute.funds_reinstated": "gives back what the dispute's withdrawal took",
    "payment_intent.succeeded": "an auto-recharge charge: settled and credited",
    "payment_intent.payment_failed": "an auto-recharge charge: settled as failed, auto-recharge paused",
    "setup_intent.succeeded": "card on file while Stripe lists one for the customer (asked)",
    "payment_method.attached": "card on file while Stripe lists one for the customer (asked, so a late attach after a detach changes nothing)",
    "payment_method.detached": "card on file only while the customer still has a payment method",
    "customer.deleted": "the customer is forgotten; no card on file",
}
# Types metergate may be sent but deliberately does nothing with, and why.
IGNORED = {
    "checkout.session.async_payment_failed": "nothing was granted before the payment cleared",
    "checkout.session.expired": "nothing was granted",
    "customer.subscription.trial_will_end": "a reminder; a status change comes as customer.subscription.updated",
    "invoice.created": "only payment outcomes move dunning",
    "invoice.finalized": "only payment outcomes move dunning",
    "invoice.upcoming": "only payment outcomes move dunning",
    "credit_note.created": "a credit note that settles an invoice in full is followed by invoice.paid (amount_paid 0)",
    "charge.dispute.created": "money moves with charge.dispute.funds_withdrawn",
    "charge.dispute.closed": "money moves with charge.dispute.funds_withdrawn / funds_reinstated",
    "payment_intent.processing": "the outcome comes as payment_intent.succeeded or payment_failed",
    "payment_intent.canceled": "an auto-recharge that never confirmed is settled by the charger",
    "customer.created": "metergate creates its customers itself",
    "customer.updated": "nothing metergate keeps changed",
    "invoice_payment.paid": "invoices are settled by invoice.paid",
    "charge.succeeded": "payments are credited by their Checkout session or payment intent",
    "charge.failed": "payments are credited by their Checkout session or payment intent",
}


def payments_named(event: dict) -> list[str]:
    """The payments (payment intent, else charge) whose credit the event's effect needs."""
    obj = (event.get("data") or {}).get("object") or {}
    kind = event.get("type", "")
    if kind.startswith("charge.dispute.") or kind in REFUND_EVENTS:
        named = [_str(obj.get("payment_intent")) or _str(obj.get("charge"))]
    elif kind == "charge.refunded":
        named = [_str(obj.get("payment_intent")) or _str(obj.get("id"))]
    else:
        return []
    return [p for p in named if p]


def commands_for(event: dict, catalog: Catalog, facts: Facts | None = None,
                 dunning: DunningPolicy | None = None) -> list[tuple[str, Command]]:
    """The org commands a verified event means ([]: nothing to do). Skipped: nothing to do by
    rule, and why; Refused or EventError: not applied, and why."""
    facts = facts or Facts()
    obj = (event.get("data") or {}).get("object") or {}
    kind = event.get("type", "")
    as_of_us = _epoch_s(event.get("created", 0), "created") * 1_000_000
    try:
        if kind.startswith("charge.dispute.funds_"):
            return _dispute(obj, kind == "charge.dispute.funds_withdrawn", facts)
        if kind in REFUND_EVENTS:
            return _refund_object(obj, facts)
        org_id = org_of(obj) or facts.customer_org
        if kind == "charge.refunded":
            return _refunds(obj, facts, org_id)
        if org_id is None:
            return []
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            return [(org_id, c) for c in _checkout(obj, catalog)]
        if kind in SUBSCRIPTION_EVENTS:
            return [(org_id, _subscription(obj, catalog, as_of_us, ended=kind.endswith(".deleted")))]
        if kind == "invoice.payment_failed" and dunning is not None:
            if not (dunning.one_off_invoices or _subscription_invoice(obj)):
                raise Skipped("one_off_invoice: it starts no dunning (METERGATE_DUNNING_ONE_OFF_INVOICES)")
            free = catalog.current_plan(dunning.free_plan, as_of_us)
            if free is None:
                raise EventError(f"the dunning free plan {dunning.free_plan!r} is not in the catalog")
            return [(org_id, InvoiceFailed(as_of_us, dunning.suspend_after_s, dunning.degrade_after_s,
                                           dunning.downgrade_after_s, free.id, free.version, _str(obj.get("id")),
                                           _invoice_subscription(obj)))]
        if kind in INVOICE_SETTLED:
            paid = obj.get("amount_paid")  # only whether it is 0 matters: any size is read
            cents = _integer(paid, "amount_paid", 0, 2**62) if paid is not None else None
            return [(org_id, InvoicePaid(as_of_us, _str(obj.get("id")), cents, INVOICE_SETTLED[kind]))]
        if kind in ("payment_intent.succeeded", "payment_intent.payment_failed"):
            return [(org_id, c) for c in _auto_recharge(obj, kind == "payment_intent.succeeded")]
    except EventError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise EventError(f"{kind}: {exc!r}") from None
    return []


def _invoice_subscription(invoice: dict) -> str | None:
    """The subscription an invoice bills (the shapes of newer and older API versions)."""
    parent = invoice.get("parent")
    details = (parent.get("subscription_details") or {}) if isinstance(parent, dict) else {}
    return _str(details.get("subscription") if isinstance(details, dict) else None) or _str(invoice.get("subscription"))


def _subscription_invoice(invoice: dict) -> bool:
    return bool(_invoice_subscription(invoice) or str(invoice.get("billing_reason") or "").startswith("subscription"))


def _usd(obj: dict, what: str) -> None:
    currency = obj.get("currency")
    if currency is not None and currency != "usd":
        raise Refused(f"{what} is in {str(currency)[:8]!r}: metergate takes USD only, and credited nothing")


def _checkout(session: dict, catalog: Catalog) -> list[Command]:
    mode = session.get("mode")  # (a setup-mode session saves a card: serve_app/stripe_cards.py)
    paid = session.get("payment_status") in ("paid", "no_payment_required")
    if mode == "subscription":
        subscription = _str(session.get("subscription"))
        if not paid or subscription is None:
            return []  # its customer.subscription.* events say when it pays for a tier
        # The weakest news (as of 0): the subscription's own events, whenever they come, win.
        return [_subscription({"id": subscription, "status": "active", "metadata": session.get("metadata")},
                              catalog, 0, ended=False, with_period=False)]
    if mode != "payment" or session.get("payment_status") != "paid":
        return []  # not paid yet: async methods report later with async_payment_succeeded
    _usd(session, "the payment")
    metadata = session.get("metadata") or {}
    # Without metergate's own credit_micros (a payment link), the credit is what was paid less
    # any tax: tax is never credit. The credit keeps what was paid: its refunds take their share
    # of it (billing-rules 3.0); a session paid nothing (a 100 % coupon) keeps nothing.
    if metadata.get("credit_micros"):  # metergate's own Checkout: the credit is named; what was paid, if readable
        try:
            paid = _cents(session.get("amount_total"), "amount_total", low=0) or None
        except EventError:
            paid = None  # a refund of it then takes what it names (billing-rules 3.0)
    elif session.get("amount_total") is None:  # (null on a session Stripe has not totalled)
        raise EventError("a Checkout session without metergate's credit_micros and without amount_total: "
                         "what it credits cannot be told; nothing was credited (replay it once Stripe lists its total)")
    else:
        paid = _cents(session["amount_total"], "amount_total", low=0) or None
    if metadata.get("credit_micros"):
        amount = _micros(metadata["credit_micros"], "metadata.credit_micros")
    else:
        details = session.get("total_details")
        tax = details.get("amount_tax") if isinstance(details, dict) else None
        amount = (paid or 0) - (0 if tax is None else _cents(tax, "total_details.amount_tax", low=0))
        if amount <= 0:
            raise EventError("amount_total is not more than its tax")
    expires = metadata.get("credit_expires_at")
    intent = _str(session.get("payment_intent"))
    payment = intent or session["id"]
    return [Credit("topup", amount, _epoch_s(expires, "metadata.credit_expires_at") * 1_000_000 if expires else None,
                   f"Stripe checkout {session['id']}", f"stripe:payment:{payment}", intent, paid)]


def tier_of(subscription: dict, catalog: Catalog) -> str | None:
    """The paid tier a subscription is for: by its items' prices (a portal switch changes
    only the price; `tier_of_price`, which self-serve reads alike); else by the metadata
    metergate set when it opened it. Parts of another shape than Stripe's count as absent."""
    items = subscription.get("items")
    items = items.get("data") if isinstance(items, dict) else None
    tiers = []
    for item in items if isinstance(items, list) else ():
        tier = tier_of_price(item.get("price"), catalog) if isinstance(item, dict) else None
        if tier is not None:
            tiers.append(tier)
    if tiers:
        return max(tiers, key=lambda t: catalog.tiers[t])
    metadata = subscription.get("metadata")
    tier = metadata.get("tier") if isinstance(metadata, dict) else None
    return tier if tier in PAID_TIERS and tier in catalog.tiers else None


def _subscription(subscription: dict, catalog: Catalog, as_of_us: int, ended: bool,
                  with_period: bool = True) -> SubscriptionChanged:
    subscription_id = _str(subscription.get("id"))
    if subscription_id is None:
        raise EventError("the subscription has no id")
    status = "canceled" if ended else str(subscription.get("status") or "")[:32]
    tier = tier_of(subscription, catalog)
    anchor, end = (_current_period(subscription) if with_period else None) or (None, None)
    base = catalog.default_tier
    return SubscriptionChanged(subscription_id, status, tier, catalog.tiers[tier] if tier else 0, as_of_us,
                               base, catalog.tiers[base], anchor, end)


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


def _auto_recharge(intent: dict, succeeded: bool) -> list[Command]:
    """Only our own off-session charges: a checkout's payment is credited by its session."""
    metadata = intent.get("metadata") or {}
    if metadata.get("kind") != "auto_recharge":
        return []
    error = intent.get("last_payment_error") or {}
    reason = error.get("code") or error.get("decline_code") or "payment_failed"
    return [SettleRecharge.of_payment(metadata["charge_id"], succeeded, _cents(intent["amount"], "amount"),
                                      intent["id"], reason)]


def _payment_credit(payment: str | None, facts: Facts, what: str) -> PaymentCredit:
    """The payment's credit; else, for the org of the charge's customer, a credit of nothing
    (a refund then waits for it, rule 3.3; a dispute takes nothing, rule 3.6)."""
    credit = facts.payments.get(payment) if payment else None
    if credit is not None:
        return credit
    if facts.customer_org is not None:
        return PaymentCredit(facts.customer_org, None, 0)
    raise Skipped(f"no_org: {what} names payment {payment}, which is no org's here")


def _refund_command(refund: dict, payment: str, credit: PaymentCredit) -> Command | None:
    """None: a refund waiting for the customer (`requires_action`): no money moved yet."""
    refund_id = _str(refund.get("id"))
    if refund_id is None:
        raise EventError("a refund has no id")
    _usd(refund, f"refund {refund_id}")
    status = refund.get("status", "succeeded")
    if status in ("failed", "canceled"):
        return ReverseRefund(refund_id, payment, f"stripe:refund:{refund_id}:reversed")
    if status == "requires_action":
        return None
    if status not in ("pending", "succeeded"):
        raise EventError(f"refund {refund_id} has status {str(status)[:32]!r}")
    return RefundPayment(refund_id, payment, _cents(refund["amount"], "refunds.amount"),
                         f"Stripe refund {refund_id} of {payment}", f"stripe:refund:{refund_id}", credit.grant_id,
                         credit.credited_micros, credit.paid_micros)


def _refund_object(refund: dict, facts: Facts) -> list[tuple[str, Command]]:
    """refund.* events: the refund alone, which names its payment, never the org."""
    payment = _str(refund.get("payment_intent")) or _str(refund.get("charge"))
    credit = _payment_credit(payment, facts, f"refund {refund.get('id')}")
    command = _refund_command(refund, payment, credit)
    return [] if command is None else [(credit.org_id, command)]


def _refunds(charge: dict, facts: Facts, org_id: str | None) -> list[tuple[str, Command]]:
    """Each refund of a charge claws back only what its payment bought (billing-rules 3): the
    payment is the charge's payment intent, which a credit paid through Stripe remembers.
    A pending refund counts (Stripe took the money back already); a failed one gives back."""
    refunds = (charge.get("refunds") or {}).get("data")
    if refunds is None:
        raise EventError("charge.refunded without refunds.data; expand `refunds` on the webhook")
    payment = _str(charge.get("payment_intent")) or _str(charge.get("id"))
    if payment is None:
        raise EventError("charge.refunded names no charge id")
    credit = facts.payments.get(payment)
    if credit is None:
        if org_id is None:
            return []
        credit = PaymentCredit(org_id, None, 0)  # a refund before its credit waits for it (rule 3.3)
    commands = [_refund_command(refund, payment, credit) for refund in refunds]
    return [(credit.org_id, command) for command in commands if command is not None]


def _dispute(dispute: dict, withdrawn: bool, facts: Facts) -> list[tuple[str, Command]]:
    """A dispute names its charge and payment intent, not the org: the payment's credit does."""
    dispute_id = _str(dispute.get("id"))
    if dispute_id is None:
        raise EventError("the dispute has no id")
    payment = _str(dispute.get("payment_intent")) or _str(dispute.get("charge"))
    credit = _payment_credit(payment, facts, f"dispute {dispute_id}")
    _usd(dispute, f"dispute {dispute_id}")
    half = "withdrawn" if withdrawn else "reinstated"
    return [(credit.org_id, DisputeFunds(
        dispute_id, payment, _cents(dispute["amount"], "amount"), withdrawn, credit.credited_micros,
        credit.grant_id, f"Stripe dispute {dispute_id} of {payment}: funds {half}",
        f"stripe:dispute:{dispute_id}:{half}", credit.lapsed_micros, credit.paid_micros))]
