"""The compute plane's hot path (service token): POST /v1/gate and /v1/gate/batch, leases,
POST /v1/usage."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from actors import commands as cmd
from actors.clock import now_us
from serve_app import openapi
from serve_app.bodies import (GATE_DECODER, GateBody, checks_max_age, decode, decode_gate_checks, max_age_of,
                              resources_of)
from serve_app.compute import current_view, lease_token, record_usage, release_lease, take_lease
from serve_app.context import Context, json
from serve_app.errors import ApiError, api_error_of, item_error, raise_for_shard_error
from serve_app.params import LeasePath, OrgPath
from serve_app.views import decision_view, lease_view

to_builtins = msgspec.to_builtins


async def gate_answer(ctx: Context, raw_body: bytes) -> dict:
    """POST /v1/gate's answer; raises the ApiError of a refusal."""
    body = decode(GATE_DECODER, raw_body)
    result, age_s = await ctx.router.gate(body.org_id, body.action, resources_of(body), max_age_of(body))
    if isinstance(result, dict):
        raise_for_shard_error(result)
    return with_token(ctx, body, decision_view(to_builtins(result), age_s))


def with_token(ctx: Context, body: GateBody, decision: dict) -> dict:
    """An allowed decision whose check asked for one (`"token": true`) carries a capability
    token for its org, action and resources, valid for GATE_TOKEN_TTL_S or until the view it
    was decided from ends, whichever is sooner."""
    if not (body.token and decision["allowed"]) or ctx.capabilities is None:
        return decision
    now = now_us()
    token = ctx.capabilities.gate_token(body.org_id, body.action, resources_of(body), now,
                                        ctx.router.view_until_us(body.org_id, now))
    return {**decision, "capability_token": token}


async def gate_batch_answer(ctx: Context, raw_body: bytes) -> dict:
    """POST /v1/gate/batch's answer: up to 1,000 checks, each decision exactly what POST
    /v1/gate answers for its body, and a bad item gets its own error in its place."""
    checks = decode_gate_checks(raw_body)
    decisions: list[dict | None] = [item_error(c) if isinstance(c, ApiError) else None for c in checks]
    valid = [(index, (c.org_id, c.action, resources_of(c))) for index, c in enumerate(checks)
             if not isinstance(c, ApiError)]
    answers = await ctx.router.gate_many([check for _, check in valid], checks_max_age(checks)) if valid else []
    for (index, _), (answer, age_s) in zip(valid, answers):
        decisions[index] = (item_error(api_error_of(answer["error"])) if isinstance(answer, dict)
                            else with_token(ctx, checks[index], decision_view(to_builtins(answer), age_s)))
    return {"decisions": decisions}


def routes(ctx: Context) -> APIRouter:
    router = APIRouter()

    # serve_app/hot_path.py answers these two before the framework does when it can.
    @router.post("/v1/gate", tags=["gate"], openapi_extra=openapi.GATE)
    async def gate(request: Request) -> Response:
        ctx.service(request)
        return json(await gate_answer(ctx, await request.body()))

    @router.post("/v1/gate/batch", tags=["gate"], openapi_extra=openapi.GATE_BATCH)
    async def gate_batch(request: Request) -> Response:
        """Up to 1,000 checks in one request; each decision is exactly what POST /v1/gate
        answers for its body, and a bad item gets its own error in its place."""
        ctx.service(request)
        return json(await gate_batch_answer(ctx, await request.body()))

    @router.post("/v1/leases", tags=["gate"], openapi_extra=openapi.LEASE)
    async def take_lease_route(request: Request) -> Response:
        ctx.service(request)
        status, body = await take_lease(ctx, await request.body())
        return json(body, status)

    @router.post("/v1/leases/{org_id}/{lease_id}/renew", tags=["gate"], openapi_extra=openapi.answers(
        {"200": ("The lease, renewed for its ttl_s", openapi.LeaseResult)}, openapi.SERVICE, openapi.ORG, openapi.ANY_BODY))
    async def renew_lease(org_id: OrgPath, lease_id: LeasePath, request: Request) -> Response:
        ctx.service(request)
        result = raise_for_shard_error(await ctx.router.command(org_id, cmd.RenewLease(lease_id)))
        return json({"org_id": org_id, **lease_view(result["lease"]), **lease_token(ctx, org_id, result),
                     **current_view(ctx, org_id)})  # a token with the renewed expiry

    @router.delete("/v1/leases/{org_id}/{lease_id}", tags=["gate"], status_code=204, openapi_extra=openapi.answers(
        {"204": ("Released, or already gone", None),
         "200": ("Released (with `Prefer: return=representation`)", openapi.LeaseReleased)},
        openapi.SERVICE, openapi.ORG, openapi.ANY_BODY))
    async def release_lease_route(org_id: OrgPath, lease_id: LeasePath, request: Request) -> Response:
        """204, also when the lease is already gone. With `Prefer: return=representation`, 200
        and the org's view after the release (`gate_view`), as the other lease answers carry."""
        ctx.service(request)
        await release_lease(ctx, org_id, lease_id)
        if "return=representation" in request.headers.get("prefer", ""):
            return json({"org_id": org_id, "lease_id": lease_id, "released": True, **current_view(ctx, org_id)})
        return Response(status_code=204)

    @router.post("/v1/usage", tags=["usage"], openapi_extra=openapi.USAGE)
    async def post_usage(request: Request) -> Response:
        ctx.service(request)
        return json(await record_usage(ctx, await request.body()))

    return router
