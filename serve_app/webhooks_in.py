"""Webhooks in: POST /webhooks/svix (compute plane) and POST /webhooks/stripe (money).

Svix:
Body: {"type": ..., "data": ...}. `sandbox.started` carries the body of POST /v1/leases,
`sandbox.stopped` carries {"org_id", "lease_id"}, and `usage.batch` the body of POST
/v1/usage. Each message id (`svix-id`) is applied once. Its effects are themselves
idempotent (lease ids, tick ids), so a duplicate delivered concurrently changes nothing
either. Any other type is acknowledged and ignored.

Stripe: a verified event is answered 200 whatever became of it, and recorded with its
outcome (applied, ignored, dead_letter) and why; GET /v1/webhooks/inbound lists the ones not
applied. Only a bad delivery is a 4xx and only a transient failure a 5xx (see stripe_webhook).
Card and customer lifecycle events go through serve_app/stripe_cards.py, the rest through
the pure mapper serve_app/stripe_events.py.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Iterator, Mapping

import msgspec
import stripe
from svix.webhooks import Webhook, WebhookVerificationError

from actors import metrics
from actors.commands import fingerprint
from actors.refusals import Refusal
from serve_app import stripe_cards
from serve_app.bodies import MAX_JSON_DEPTH, Id, decode, nests_deeper_than, not_json
from actors.ticks import DECODE_ERRORS, WHOLE_ID_PATTERN
from serve_app.compute import record_usage, release_lease, take_lease
from serve_app.context import Context
from serve_app.errors import ApiError, api_error_of
from serve_app.stripe_gateway import StripeRefused
from serve_app.stripe_events import (HANDLED, IGNORED, DunningPolicy, EventError, Facts, PaymentCredit, Refused,
                                     Skipped, commands_for, customer_of, org_of, payments_named)
from storage import inbound_webhooks, ledger, stripe_customers

log = logging.getLogger("metergate.webhooks")

SOURCE = "svix"
STRIPE_ID = re.compile(WHOLE_ID_PATTERN)
STRIPE_TOLERANCE_S = 300
MAX_REASON_CHARS = 300


EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=WHOLE_ID_PATTERN)]


class Envelope(msgspec.Struct):
    type: EventType
    data: msgspec.Raw = msgspec.Raw(b"null")  # decoded by the body type of its event


class Stopped(msgspec.Struct, forbid_unknown_fields=True):
    org_id: Id
    lease_id: Id


ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
STOPPED_DECODER = msgspec.json.Decoder(Stopped)


def verify(secret: str, body: bytes, headers: Mapping[str, str]) -> str:
    """The message id, if the signature and timestamp (±5 minutes) check out; else 400."""
    wanted = {name: headers.get(name, "") for name in ("svix-id", "svix-timestamp", "svix-signature")}
    try:
        Webhook(secret).verify(body, wanted)
    except WebhookVerificationError as exc:
        raise ApiError(400, "invalid_signature", f"webhook rejected: {exc}") from None
    except ValueError:  # a signature header that is not "v1,<base64>" fails before any check
        raise ApiError(400, "invalid_signature", "webhook rejected: malformed svix-signature header") from None
    message_id = wanted["svix-id"]
    if len(message_id) > 255 or not message_id.isprintable():
        raise ApiError(400, "invalid_request", "svix-id must be at most 255 printable characters", field="svix-id")
    return message_id


@contextmanager
def _refusals_counted(source: str) -> Iterator[None]:
    """Count a webhook refused for its signature or its timestamp (a forged or replayed
    delivery, or a secret that differs from the sender's); other refusals are the body's."""
    try:
        yield
    except ApiError as exc:
        if exc.code == "invalid_signature":
            metrics.webhook_refused(source)
        raise


async def svix_webhook(ctx: Context, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict]:
    secret = ctx.settings.svix_webhook_secret
    if not secret:
        raise ApiError(503, "svix_not_configured", "METERGATE_SVIX_WEBHOOK_SECRET is not set on this server")
    with _refusals_counted(SOURCE):
        message_id = verify(secret, body, headers)
    seen = await seen_answer(ctx, SOURCE, message_id)
    if seen is not None:
        return seen
    envelope = decode(ENVELOPE_DECODER, body)
    data = bytes(envelope.data)
    if envelope.type == "sandbox.started":
        try:
            status, result = await take_lease(ctx, data)
        except ApiError as exc:
            if exc.code != Refusal.LEASE_ENDED:
                raise
            result = {"error": {"code": exc.code, "message": exc.message}}  # a late start of a stopped sandbox
        status = 200  # the sandbox runs already; a deny is news for the sender, not a retryable failure
    elif envelope.type == "sandbox.stopped":
        stopped = decode(STOPPED_DECODER, data)
        await release_lease(ctx, stopped.org_id, stopped.lease_id)
        status, result = 200, {"released": True, "org_id": stopped.org_id, "lease_id": stopped.lease_id}
    elif envelope.type == "usage.batch":
        status, result = 200, await record_usage(ctx, data)
    else:
        status, result = 200, {"ignored": True}
    ignored = result == {"ignored": True}
    result = {"type": envelope.type, "result": result}
    await _remember(ctx, SOURCE, message_id, envelope.type, status, result,
                    "ignored" if ignored else "applied", "unhandled_type" if ignored else None)
    return status, result


async def seen_answer(ctx: Context, source: str, event_id: str) -> tuple[int, dict] | None:
    """The first answer to a message already applied (a fast path: effects are idempotent anyway)."""
    async with (await ctx.db()).acquire() as conn:
        seen = await inbound_webhooks.first_answer(conn, source, event_id)
    return None if seen is None else (seen[0], {**seen[1], "duplicate": True})


async def _remember(ctx: Context, source: str, event_id: str, event_type: str, status: int, result: dict,
                    outcome: str = "applied", reason: str | None = None) -> None:
    async with (await ctx.db()).acquire() as conn:
        await inbound_webhooks.remember(conn, source, event_id, event_type, status, result, outcome, reason)


def verify_stripe(secret: str, body: bytes, header: str | None, now_s: int) -> dict:
    """The event, if Stripe-Signature checks out and its time is within 5 minutes either way."""
    if not header:
        raise ApiError(400, "invalid_signature", "missing Stripe-Signature header")
    if not header.isascii():  # stripe-python compares with hmac.compare_digest, which raises on other text
        raise ApiError(400, "invalid_signature", "Stripe-Signature is not ASCII")
    # stripe-python refuses old timestamps but accepts any future one: a signature minted
    # "later" (a skewed or hostile clock) must not outlive the tolerance either.
    stamps = [part[2:] for part in header.split(",") if part.startswith("t=")]
    # ASCII only: "²" (a Latin-1 header byte) is a digit to isdigit() and not to int().
    if not stamps or not (stamps[0].isascii() and stamps[0].isdigit()):
        raise ApiError(400, "invalid_signature", "Stripe-Signature has no timestamp")
    if int(stamps[0]) > now_s + STRIPE_TOLERANCE_S:
        raise ApiError(400, "invalid_signature", "Stripe-Signature timestamp is in the future")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise not_json() from None
    try:
        stripe.WebhookSignature.verify_header(text, header, secret, tolerance=STRIPE_TOLERANCE_S)
    except stripe.SignatureVerificationError as exc:
        raise ApiError(400, "invalid_signature", f"webhook rejected: {exc.user_message or exc}") from None
    try:
        event = msgspec.json.decode(body)
    except DECODE_ERRORS:
        raise not_json() from None
    if nests_deeper_than(event, MAX_JSON_DEPTH):
        raise not_json()
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        raise ApiError(400, "invalid_json", "webhook body is not a Stripe event")
    data = event.get("data")  # read as objects from here on
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("object") or {}, dict)):
        raise ApiError(400, "invalid_json", "webhook body is not a Stripe event: data.object is not an object")
    if not STRIPE_ID.match(event["id"]) or not STRIPE_ID.match(str(event.get("type", ""))):
        raise ApiError(422, "invalid_request", "the event's id or type is not a Stripe identifier", field="id")
    return event


async def _expand_refunds(ctx: Context, event: dict) -> None:
    """Newer API versions send `charge.refunded` without `refunds.data`: list them from Stripe."""
    charge = (event.get("data") or {}).get("object") or {}
    sent = charge.get("refunds") or {}
    if event.get("type") != "charge.refunded" or not isinstance(sent, dict) or sent.get("data") is not None:
        return  # listed already, or not a list of refunds at all (commands_for says what is wrong)
    if ctx.stripe.client is None or not isinstance(charge.get("id"), str):
        return  # commands_for then says what is missing
    try:
        refunds = await ctx.stripe.look_up("webhook_lookup", f"the refunds of charge {charge['id']}",
                                           ctx.stripe.client.v1.refunds.list,
                                           params={"charge": charge["id"], "limit": 100})
    except StripeRefused as exc:
        raise EventError(str(exc)) from None
    charge["refunds"] = {"data": [r.to_dict() for r in refunds.data] if refunds is not None else []}


async def _payment_credits(ctx: Context, payments: list[str]) -> dict[str, PaymentCredit]:
    """What each payment the event names bought, from its credit's ledger entry (billing-rules 3)."""
    if not payments:
        return {}
    async with (await ctx.db()).acquire() as conn:
        found = await ledger.credits_of_payments(conn, payments)
    return {payment: PaymentCredit(*credit) for payment, credit in found.items()}


async def _org_of_charge(ctx: Context, obj: dict) -> str | None:
    """The org of the customer of the charge a refund or a dispute names, from Stripe: for a
    payment metergate has not credited (yet), so that a refund waits for its credit and a
    dispute still pauses auto-recharge. Stripe out of reach: 503, Stripe retries."""
    charge_id = obj.get("charge")
    if isinstance(charge_id, dict):  # expanded
        charge_id = charge_id.get("id")
    if ctx.stripe.client is None or not isinstance(charge_id, str) or not charge_id:
        return None
    try:
        found = await ctx.stripe.look_up("webhook_lookup", f"charge {charge_id}",
                                         ctx.stripe.client.v1.charges.retrieve, charge_id)
    except StripeRefused as exc:  # this server's key may not read charges: the operator must act
        raise EventError(str(exc)) from None
    if found is None:
        return None
    charge = found.to_dict()
    metadata_org = (charge.get("metadata") or {}).get("org_id")
    customer = charge.get("customer")
    async with (await ctx.db()).acquire() as conn:
        if isinstance(customer, str):
            found = await stripe_customers.org_of(conn, customer)
            if found is not None:
                return found
    return metadata_org if isinstance(metadata_org, str) and metadata_org else None


class Outcome(str, Enum):
    """What became of a verified Stripe event. Each is answered 2xx: a 4xx makes Stripe retry
    for three days and then disable the endpoint, which stops every billing event."""

    APPLIED = "applied"
    IGNORED = "ignored"  # nothing to do, or not this deployment's (another mode, no org of ours)
    DEAD_LETTER = "dead_letter"  # it names something metergate cannot apply: an operator looks


def livemode_matches(event: dict, secret_key: str | None) -> bool:
    """Whether the event is of the key's mode (sk_live_ / rk_live_ keys are live, any other
    key or none is test mode). An event without `livemode` matches: Stripe always sends it,
    and hand-made events (tests, replays of old payloads) leave it out."""
    sent = event.get("livemode")
    if sent is None:
        return True
    live_key = bool(secret_key) and secret_key.startswith(("sk_live_", "rk_live_"))
    return sent is live_key  # "true" or 1 is not Stripe's boolean: no match


async def stripe_webhook(ctx: Context, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict]:
    """Only a bad delivery (signature, time, not JSON) is a 4xx, and only a transient failure
    (a shard, Postgres or Stripe unreachable) a 5xx, which Stripe retries; every verified event
    else is 200 and recorded with its outcome and why."""
    secret = ctx.settings.stripe_webhook_secret
    if not secret:
        raise ApiError(503, "stripe_not_configured", "METERGATE_STRIPE_WEBHOOK_SECRET is not set on this server")
    # Real time, not the service clock: the signature's timestamp is Stripe's transport time.
    with _refusals_counted("stripe"):
        event = verify_stripe(secret, body, headers.get("stripe-signature"), int(time.time()))
    seen = await seen_answer(ctx, "stripe", event["id"])
    if seen is not None:
        return seen
    return await stripe_event(ctx, event)


async def stripe_event(ctx: Context, event: dict) -> tuple[int, dict]:
    """A verified Stripe event not seen before (delivered, or read back from Stripe after a
    restore: serve_app/stripe_reconcile.py), applied and recorded with its outcome."""
    if not livemode_matches(event, ctx.settings.stripe_secret_key):
        return await _stripe_answer(ctx, event, [], Outcome.IGNORED, "livemode_mismatch")
    forget = None
    try:
        if stripe_cards.handles(event):
            lifecycle = await stripe_cards.lifecycle_commands(ctx, event)
            commands, forget, ignored = lifecycle.commands, lifecycle.forget_customer, lifecycle.ignored
        else:
            commands, ignored = await _commands_of(ctx, event)
    except Skipped as exc:  # by rule, nothing to do here (a one-off invoice, a payment of no org here)
        return await _stripe_answer(ctx, event, [], Outcome.IGNORED, str(exc))
    except Refused as exc:  # by rule (money in another currency, ...): the operator decides
        return await _stripe_answer(ctx, event, [], Outcome.DEAD_LETTER, f"refused: {exc}")
    except (EventError, stripe_cards.NotApplicable) as exc:
        return await _stripe_answer(ctx, event, [], Outcome.DEAD_LETTER, f"unprocessable_event: {exc}")
    if not commands:
        return await _stripe_answer(ctx, event, [], Outcome.IGNORED, ignored or "nothing_to_apply")
    applied, refused = await _apply(ctx, commands)
    if refused is not None:
        return await _stripe_answer(ctx, event, applied, Outcome.DEAD_LETTER, refused)
    if forget is not None:
        await stripe_cards.forget_customer(ctx, forget)
    return await _stripe_answer(ctx, event, applied, Outcome.APPLIED, None)


async def _commands_of(ctx: Context, event: dict) -> tuple[list, str | None]:
    """The event's commands (stripe_events.commands_for, with the facts it needs looked up),
    and why there are none if none."""
    if not isinstance(event.get("type"), str):  # a number passes the id pattern; no Stripe type is one
        return [], "unhandled_type"
    customer_org = None
    if customer_of(event):
        async with (await ctx.db()).acquire() as conn:
            customer_org = await stripe_customers.org_of(conn, customer_of(event))
    await _expand_refunds(ctx, event)
    named = payments_named(event)
    credits = await _payment_credits(ctx, named)
    if named and not credits and customer_org is None:
        customer_org = await _org_of_charge(ctx, (event.get("data") or {}).get("object") or {})
    settings = ctx.settings
    try:
        commands = commands_for(event, ctx.catalog, Facts(customer_org, credits), DunningPolicy(
            settings.dunning_suspend_after_s, settings.dunning_degrade_after_s,
            settings.dunning_downgrade_after_s, settings.dunning_free_plan, settings.dunning_one_off_invoices))
    except (KeyError, TypeError, AttributeError) as exc:  # a field the event type must carry is missing
        raise EventError(f"the event lacks a field its type needs ({exc})") from None
    if commands:
        return commands, None
    kind = str(event.get("type"))
    if kind not in HANDLED:
        return [], f"ignored_type: {IGNORED[kind]}" if kind in IGNORED else "unhandled_type"
    named = org_of((event.get("data") or {}).get("object") or {}) or customer_org or credits
    return [], "nothing_to_apply" if named else "no_org"


async def _apply(ctx: Context, commands: list) -> tuple[list[dict], str | None]:
    """Send each command to its org, in order, up to the first a shard refuses for good; the
    ones applied, and that refusal (`code: message`) if there was one. A transient refusal
    (503: the shard is away, the outcome unknown) is raised, so Stripe delivers again and the
    applied ones replay."""
    applied = []
    for org_id, command in commands:
        # Fingerprint the effect, not the event: two events about one payment must replay, not conflict.
        result = await ctx.router.command(org_id, command, fingerprint(command))
        if result.get("error") is not None:
            refusal = api_error_of(result["error"])
            if refusal.status >= 500:
                raise refusal
            return applied, f"{refusal.code}: {refusal.message}"
        applied.append({"org_id": org_id, "command": type(command).__name__,
                        "replayed": bool(result.get("replayed")), "stale": bool(result.get("stale"))})
    return applied, None


def _storable(reason: str) -> str:
    """A reason as Postgres text and one log line: it may quote what the event sent (an org id
    with a NUL in it), so control characters are escaped and the length bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason)
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


async def _stripe_answer(ctx: Context, event: dict, applied: list[dict], outcome: Outcome,
                         reason: str | None) -> tuple[int, dict]:
    reason = None if reason is None else _storable(reason)
    metrics.stripe_event_answered(outcome.value)
    if outcome is Outcome.DEAD_LETTER:
        log.warning("stripe event %s (%s) is a dead letter: %s", event["id"], event.get("type"), reason)
    result = {"event": event["id"], "type": event.get("type"), "outcome": outcome.value, "reason": reason,
              "applied": applied}
    await _remember(ctx, "stripe", event["id"], str(event.get("type")), 200, result, outcome.value, reason)
    return 200, result
