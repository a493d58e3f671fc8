"""GET /.well-known/metergate-keys: the public keys capability tokens are signed with (no
token needed; serve_app/captokens.py). Cells fetch it at start and again after a rotation;
Cache-Control and an ETag let them and any cache between ask cheaply."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from serve_app import openapi
from serve_app.captokens import KEYS_MAX_AGE_S
from serve_app.context import Context

KEYS_PATH = "/.well-known/metergate-keys"


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get(KEYS_PATH, openapi_extra=openapi.answers({
        "200": ("The key set: every key a token in force may be signed with", openapi.KeySet),
        "304": ("Unchanged since the ETag in If-None-Match", None)}))
    async def capability_keys(request: Request) -> Response:
        signer = ctx.capabilities
        if signer is None:  # no METERGATE_CAPABILITY_KEY on this replica (a cluster node): nothing signs
            return Response(b'{"keys":[]}', media_type="application/json", headers={"Cache-Control": "no-cache"})
        headers = {"Cache-Control": f"public, max-age={KEYS_MAX_AGE_S}", "ETag": signer.etag}
        if signer.etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        return Response(signer.key_set_body, media_type="application/json", headers=headers)

    return router
