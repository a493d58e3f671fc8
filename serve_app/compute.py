"""Compute-plane operations (leases, usage), shared by the HTTP API and the Svix webhook."""

from __future__ import annotations

import msgspec

from actors import commands as cmd
from actors import metrics
from actors.clock import now_us
from actors.ticks import DECODE_ERRORS, BadBody, TooManyTicks, decode_usage, max_tick_age_us
from serve_app.bodies import LEASE_DECODER, decode, invalid_field, is_json, not_json, resources_of
from serve_app.context import Context
from serve_app.errors import ApiError, error_body, raise_for_shard_error
from serve_app.views import decision_view, lease_view


async def take_lease(ctx: Context, raw_body: bytes) -> tuple[int, dict]:
    """(status, body): 201 a new lease, 200 the same lease again, or the deny's status and gate body."""
    body = decode(LEASE_DECODER, raw_body)
    result = raise_for_shard_error(await ctx.router.command(
        body.org_id, cmd.AcquireLease(body.lease_id, resources_of(body), body.ttl_s)))
    view = current_view(ctx, body.org_id)
    if "denied" in result:
        denied = decision_view(result["denied"])
        return denied["status"], {**error_body(denied["reason"], f"denied: {denied['reason']}"), **denied, **view}
    return (201 if result["created"] else 200), {"org_id": body.org_id, **lease_view(result["lease"]),
                                                 **lease_token(ctx, body.org_id, result), **shadowed(result),
                                                 **view}


def shadowed(result: dict) -> dict:
    """A shadow org's new lease (billing-rules 2.12): {"would_allow", "would_reason"}, what the
    gate would have answered an enforced org (docs/gate-protocol.md 6), counted when it would
    have denied; {} for an enforced org's lease or the same lease again."""
    decision = result.get("shadowed")
    if not decision or decision.get("would_allow") is None:
        return {}
    if not decision["would_allow"]:
        metrics.shadow_would_deny(decision["would_reason"], "lease")
    return {"would_allow": decision["would_allow"], "would_reason": decision["would_reason"]}


def lease_token(ctx: Context, org_id: str, result: dict) -> dict:
    """{"capability_token": the token of the shard's lease reply}, or {} on a replica without a
    capability key (cells then refuse, closed) or when the org may not run now. An org in
    shadow (billing-rules 2.12) gets a token of at most GATE_TOKEN_TTL_S, as a gate check's:
    one until the lease's expiry would outlive a cutover (its renewals get short ones too)."""
    signer = ctx.capabilities
    if signer is None or not result.get("token_ok"):  # a renewal while halted, suspended or broke: none
        return {}
    shadow = bool(result.get("shadow") or result.get("shadowed"))  # `shadowed`: a shard without `shadow`
    return {"capability_token": signer.lease_token(org_id, result["lease"], now_us(), result.get("tier"),
                                                   result.get("plan"), short=shadow)}


def current_view(ctx: Context, org_id: str) -> dict:
    """{"gate_view": the org's latest view record} for a lease answer (a GateClient applies it
    at once), or {} when the router has none."""
    record = ctx.router.projection.get(org_id)
    return {"gate_view": msgspec.to_builtins(record)} if record is not None else {}


async def release_lease(ctx: Context, org_id: str, lease_id: str) -> None:
    raise_for_shard_error(await ctx.router.command(org_id, cmd.ReleaseLease(lease_id)))


async def record_usage(ctx: Context, raw_body: bytes) -> dict:
    """Bill a usage body; returns {accepted, duplicates, rejected} once it is durable."""
    limit = ctx.settings.max_ticks_per_request
    try:
        valid, bad = decode_usage(raw_body, now_us(), limit, max_tick_age_us(ctx.settings.tick_id_retention_s))
    except TooManyTicks:
        raise ApiError(413, "too_many_ticks", f"at most {limit} ticks per request") from None
    except BadBody:
        raise not_json() from None
    except msgspec.ValidationError as exc:  # not {"ticks": [...]}, or not JSON further on
        raise (invalid_field(str(exc)) if is_json(raw_body) else not_json()) from None
    rejected = [{"index": index, "tick_id": _tick_id_of(raw), "error": error} for index, raw, error in bad]
    accepted = duplicates = 0
    for part in await ctx.router.usage(valid) if valid else []:
        part = raise_for_shard_error(part)
        accepted += part["accepted"]
        duplicates += part["duplicates"]
        rejected.extend(part["rejected"])
    rejected.sort(key=lambda r: r["index"])
    return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}


def _tick_id_of(raw: msgspec.Raw) -> str | None:
    try:
        value = msgspec.json.decode(raw)
    except DECODE_ERRORS:
        return None
    tick_id = value.get("tick_id") if isinstance(value, dict) else None
    return tick_id if isinstance(tick_id, str) else None
