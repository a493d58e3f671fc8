"""Cards and customers coming and leaving: a card saved (`payment_method.attached`,
`setup_intent.succeeded`, a setup-mode Checkout), `payment_method.detached` and
`customer.deleted`.

These do not name their org the way money events do: a detached payment method has `customer:
null` (the old customer is in `data.previous_attributes`), and a deleted customer is the
object itself. Whether an org still has a payment method is Stripe's fact, not the event's:
a customer with two cards that loses one still has one, and events come out of order. So the
edge asks Stripe what the customer has now and sends the org SetPaymentMethod like any other
command (a card saved, delivered after the detach that followed it, must not put it back).
A deleted customer's mapping is dropped after its org is told (a retry of the event
still finds the org), so that Checkout and the portal make a new customer next time.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.commands import Command, SetPaymentMethod
from serve_app.context import Context
from serve_app.stripe_gateway import StripeRefused
from storage import stripe_customers

EVENT_TYPES = ("payment_method.attached", "payment_method.detached", "customer.deleted", "setup_intent.succeeded")
# Events that say a card was saved: whether the customer has one is asked of Stripe, so that one
# delivered after the detach that followed it never puts the card back.
SAVED = ("payment_method.attached", "setup_intent.succeeded", "checkout.session.completed",
         "checkout.session.async_payment_succeeded")


def handles(event: dict) -> bool:
    """Whether the event is one of cards and customers (a setup-mode Checkout is: it saves a card)."""
    kind = event.get("type")
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return ((event.get("data") or {}).get("object") or {}).get("mode") == "setup"
    return kind in EVENT_TYPES
METHODS_LISTED = 3  # enough to see one besides the detached one, should Stripe still list it


class NotApplicable(Exception):
    """A lifecycle event metergate cannot apply (answered 2xx, recorded as a dead letter)."""


@dataclass(frozen=True)
class Lifecycle:
    commands: list[tuple[str, Command]]
    forget_customer: str | None = None  # after the commands: the customer Stripe deleted
    ignored: str | None = None  # why there is nothing to do, when there is nothing


async def lifecycle_commands(ctx: Context, event: dict) -> Lifecycle:
    """What a card or customer lifecycle event means for its org. Stripe unreachable: 503."""
    obj = (event.get("data") or {}).get("object") or {}
    if event.get("type") == "customer.deleted":
        customer = obj.get("id")
    elif event.get("type") in SAVED:
        customer = obj.get("customer")
    else:
        previous = (event.get("data") or {}).get("previous_attributes") or {}
        customer = previous.get("customer") if isinstance(previous, dict) else None
    if not isinstance(customer, str) or not customer:
        return Lifecycle([], ignored="no_customer")
    async with (await ctx.db()).acquire() as conn:
        org_id = await stripe_customers.org_of(conn, customer)
    if org_id is None:
        return Lifecycle([], ignored="unknown_customer")
    if event.get("type") == "customer.deleted":
        return Lifecycle([(org_id, SetPaymentMethod(False))], forget_customer=customer)
    if event.get("type") in SAVED:
        return Lifecycle([(org_id, SetPaymentMethod(await _has_other_method(ctx, customer, None)))])
    detached = obj.get("id") if isinstance(obj.get("id"), str) else None
    return Lifecycle([(org_id, SetPaymentMethod(await _has_other_method(ctx, customer, detached)))])


async def forget_customer(ctx: Context, customer: str) -> None:
    async with (await ctx.db()).acquire() as conn:
        await stripe_customers.forget(conn, customer)


async def _has_other_method(ctx: Context, customer: str, detached: str | None) -> bool:
    """Whether the customer has a payment method of any type other than the detached one."""
    client = ctx.stripe.client
    if client is None:
        raise NotApplicable("stripe_not_configured: METERGATE_STRIPE_SECRET_KEY is not set, so the customer's "
                            "payment methods cannot be listed")
    try:
        methods = await ctx.stripe.look_up("card_lifecycle", f"the payment methods of {customer}",
                                           client.v1.payment_methods.list,
                                           params={"customer": customer, "limit": METHODS_LISTED})
    except StripeRefused as exc:
        raise NotApplicable(str(exc)) from None
    if methods is None:  # the customer is gone too: nothing left to charge
        return False
    return any(method.id != detached for method in methods.data)
