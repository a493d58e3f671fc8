"""GET /healthz (the process is up) and GET /readyz (Postgres answers, every shard is up)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.context import Context
from storage.db import ping

READY_TIMEOUT_S = 10


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = {}
        try:
            await ping(await ctx.db())
            checks["postgres"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in ctx.router.handles)),
                                   READY_TIMEOUT_S)
            checks["shards"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["shards"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    return router
