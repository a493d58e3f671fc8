"""GET /healthz (the process is up), GET /readyz (Postgres answers, every shard is up), and
the operators' checks of memory against the journal (admin): parity per shard, replay of one
org."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from ray.exceptions import RayError

from actors.routing import ShardUnavailable
from serve_app import openapi
from serve_app.context import Context, json
from serve_app.errors import ApiError, raise_for_shard_error
from serve_app.params import OrgPath
from storage.db import ping

READY_TIMEOUT_S = 10  # each /readyz check waits at most this long (docs/operations/load-balancer-tls.md)


async def bounded_check(check: Awaitable) -> str:
    """A /readyz check's result: "ok", or "error: <exception type>" (TimeoutError past
    READY_TIMEOUT_S)."""
    try:
        await asyncio.wait_for(check, READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {type(exc).__name__}"
    return "ok"


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz", response_model=None, openapi_extra=openapi.answers({"200": ("The process is up", openapi.Health)}))
    async def healthz() -> dict:
        return {"ok": True}

    @router.get("/readyz", openapi_extra=openapi.answers({
        "200": ("Postgres answers and every shard is up", openapi.Ready),
        "503": ("Not ready: `checks` says which part failed", openapi.Ready)}))
    async def readyz() -> JSONResponse:
        # Both checks run at once, each bounded: a Postgres that takes connections and never
        # answers (a network dropping packets, a failover under way) would otherwise hold the
        # probe for asyncpg's own timeouts (60 s), past any prober's patience.
        postgres, shards = await asyncio.gather(bounded_check(postgres_answers()), bounded_check(shards_answer()))
        checks = {"postgres": postgres, "shards": shards}
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def postgres_answers() -> None:
        await ping(await ctx.db())

    async def shards_answer() -> None:
        await asyncio.gather(*(h.ready.remote() for h in ctx.router.handles),
                             *map(ctx.router.handle, range(len(ctx.router.handles))))  # (the version handshake)

    async def shard_call(shard: int, method: str, *args) -> dict:
        try:
            return await getattr(ctx.router.handles[shard], method).remote(*args)
        except RayError:
            raise ShardUnavailable(shard) from None

    @router.get("/v1/parity", openapi_extra=openapi.answers({"200": ("Each shard's orgs checked, and those that differ", openapi.Parity)},
                                                          openapi.ADMIN, ("422", "503")))
    async def parity(request: Request, shard: int | None = None) -> Response:
        """Each shard rebuilds the orgs it holds in memory from their snapshot and journal and
        compares them with memory (what the scheduler's parity job does). `shard` checks that
        shard only, so a caller can show progress; `drift` lists the orgs that differ."""
        ctx.admin(request)
        count = len(ctx.router.handles)
        if shard is not None and not 0 <= shard < count:
            raise ApiError(422, "invalid_request", f"shard must be between 0 and {count - 1}", field="shard")
        shards = list(range(count)) if shard is None else [shard]
        reports = await asyncio.gather(*(shard_call(k, "parity") for k in shards))
        return json({"shard_count": count, "checked": sum(r["checked"] for r in reports),
                     "drift": sorted(org_id for r in reports for org_id in r["drift"]),
                     "shards": [{"shard": r["shard"], "checked": r["checked"], "drift": r["drift"]}
                                for r in reports]})

    @router.get("/v1/orgs/{org_id}/replay", openapi_extra=openapi.answers(
        {"200": ("Whether memory and the journal agree", openapi.Replay)}, openapi.ADMIN, openapi.ORG))
    async def replay(org_id: OrgPath, request: Request) -> Response:
        """Rebuild the org from its snapshot and journal and compare it with what its shard
        holds in memory (loading it first if it is not there): `match` says whether they agree."""
        ctx.admin(request)
        return json(raise_for_shard_error(await shard_call(ctx.router.shard_of(org_id), "replay", org_id)))

    return router
