"""Webhooks in: POST /webhooks/svix (compute plane) and POST /webhooks/stripe (money).

Svix:
Body: {"type": ..., "data": ...}. `sandbox.started` carries the body of POST /v1/leases,
`sandbox.stopped` carries {"org_id", "lease_id"}, and `usage.batch` the body of POST
/v1/usage. Each message id (`svix-id`) is applied once. Its effects are themselves
idempotent (lease ids, tick ids), so a duplicate delivered concurrently changes nothing
either. Any other type is acknowledged and ignored.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Annotated, Iterator, Mapping

import msgspec
import stripe
from svix.webhooks import Webhook, WebhookVerificationError

from actors import metrics
from actors.commands import RefundPayment, fingerprint
from actors.refusals import Refusal
from serve_app.bodies import MAX_JSON_DEPTH, Id, decode, nests_deeper_than, not_json
from actors.ticks import DECODE_ERRORS, WHOLE_ID_PATTERN
from serve_app.compute import record_usage, release_lease, take_lease
from serve_app.context import Context
from serve_app.errors import ApiError, raise_for_shard_error
from serve_app.stripe_events import DunningPolicy, EventError, commands_for, customer_of
from storage import inbound_webhooks, ledger, stripe_customers

SOURCE = "svix"
STRIPE_ID = re.compile(WHOLE_ID_PATTERN)
STRIPE_TOLERANCE_S = 300


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
    seen = await _seen(ctx, SOURCE, message_id)
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
    result = {"type": envelope.type, "result": result}
    await _remember(ctx, SOURCE, message_id, envelope.type, status, result)
    return status, result


async def _seen(ctx: Context, source: str, event_id: str) -> tuple[int, dict] | None:
    """The first answer to a message already applied (a fast path: effects are idempotent anyway)."""
    async with (await ctx.db()).acquire() as conn:
        seen = await inbound_webhooks.first_answer(conn, source, event_id)
    return None if seen is None else (seen[0], {**seen[1], "duplicate": True})


async def _remember(ctx: Context, source: str, event_id: str, event_type: str, status: int, result: dict) -> None:
    async with (await ctx.db()).acquire() as conn:
        await inbound_webhooks.remember(conn, source, event_id, event_type, status, result)


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
    refunds = await ctx.stripe.call(ctx.stripe.client.v1.refunds.list, {"charge": charge["id"], "limit": 100})
    charge["refunds"] = {"data": [r.to_dict() for r in refunds.data]}


async def _with_paid_grants(ctx: Context, commands: list) -> list:
    """Each refund with the grant its payment's ledger entry made: a credit booked before grants
    recorded their payment is found by it (billing-rules 3.1)."""
    refunds = [(org_id, c) for org_id, c in commands if isinstance(c, RefundPayment)]
    if not refunds:
        return commands
    async with (await ctx.db()).acquire() as conn:
        grants = {(org_id, c.payment_id): await ledger.grant_of_key(conn, org_id, f"stripe:payment:{c.payment_id}")
                  for org_id, c in refunds}
    return [(org_id, msgspec.structs.replace(c, grant_id=grants[(org_id, c.payment_id)])
             if isinstance(c, RefundPayment) else c) for org_id, c in commands]


async def stripe_webhook(ctx: Context, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict]:
    secret = ctx.settings.stripe_webhook_secret
    if not secret:
        raise ApiError(503, "stripe_not_configured", "METERGATE_STRIPE_WEBHOOK_SECRET is not set on this server")
    # Real time, not the service clock: the signature's timestamp is Stripe's transport time.
    with _refusals_counted("stripe"):
        event = verify_stripe(secret, body, headers.get("stripe-signature"), int(time.time()))
    seen = await _seen(ctx, "stripe", event["id"])
    if seen is not None:
        return seen
    customer_org = None
    if customer_of(event):
        async with (await ctx.db()).acquire() as conn:
            customer_org = await stripe_customers.org_of(conn, customer_of(event))
    await _expand_refunds(ctx, event)
    try:
        settings = ctx.settings
        commands = commands_for(event, ctx.catalog, customer_org, DunningPolicy(
            settings.dunning_suspend_after_s, settings.dunning_degrade_after_s,
            settings.dunning_downgrade_after_s, settings.dunning_free_plan))
    except EventError as exc:
        raise ApiError(422, "unprocessable_event", str(exc)) from None
    except (KeyError, TypeError, AttributeError) as exc:  # a field the event type must carry is missing
        raise ApiError(422, "unprocessable_event", f"the event lacks a field its type needs ({exc})") from None
    applied = []
    for org_id, command in await _with_paid_grants(ctx, commands):
        # Fingerprint the effect, not the event: two events about one payment must replay, not conflict.
        result = await ctx.router.command(org_id, command, fingerprint(command))
        if result.get("error", {}).get("code") == Refusal.UNKNOWN_ORG:
            raise ApiError(422, "unprocessable_event", f"event names org {org_id}, which does not exist")
        result = raise_for_shard_error(result)
        applied.append({"org_id": org_id, "command": type(command).__name__,
                        "replayed": bool(result.get("replayed")), "stale": bool(result.get("stale"))})
    result = {"event": event["id"], "type": event.get("type"), "applied": applied}
    await _remember(ctx, "stripe", event["id"], str(event.get("type")), 200, result)
    return 200, result
