"""POST /webhooks/svix: compute-plane lifecycle events, signed with the Svix scheme.

Body: {"type": ..., "data": ...}. `sandbox.started` carries the body of POST /v1/leases,
`sandbox.stopped` carries {"org_id", "lease_id"}, and `usage.batch` the body of POST
/v1/usage. Each message id (`svix-id`) is applied once. Its effects are themselves
idempotent (lease ids, tick ids), so a duplicate delivered concurrently changes nothing
either. Any other type is acknowledged and ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

import msgspec
from svix.webhooks import Webhook, WebhookVerificationError

from serve_app.bodies import Id, decode
from serve_app.compute import record_usage, release_lease, take_lease
from serve_app.context import Context
from serve_app.errors import ApiError

SOURCE = "svix"


class Envelope(msgspec.Struct):
    type: str
    data: Any = None


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
    return wanted["svix-id"]


async def svix_webhook(ctx: Context, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict]:
    secret = ctx.settings.svix_webhook_secret
    if not secret:
        raise ApiError(503, "svix_not_configured", "METERGATE_SVIX_WEBHOOK_SECRET is not set on this server")
    message_id = verify(secret, body, headers)
    async with (await ctx.db()).acquire() as conn:
        seen = await conn.fetchrow(
            "SELECT status, response FROM inbound_webhooks WHERE source = $1 AND event_id = $2", SOURCE, message_id)
    if seen is not None:
        return seen["status"], {**msgspec.json.decode(seen["response"]), "duplicate": True}
    envelope = decode(ENVELOPE_DECODER, body)
    data = msgspec.json.encode(envelope.data)
    if envelope.type == "sandbox.started":
        status, result = await take_lease(ctx, data)
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
    async with (await ctx.db()).acquire() as conn:
        await conn.execute(
            "INSERT INTO inbound_webhooks (source, event_id, event_type, status, response)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            SOURCE, message_id, envelope.type, status, msgspec.json.encode(result))
    return status, result
