"""Idempotency-Key on every mutating route, admin and self-serve alike: the same key and body
get the first response again; the same key with another body is 409 idempotency_conflict,
decided before anything reaches a shard or Stripe.

The key is claimed before the request runs, so two requests racing with one key cannot both
run: the second sees the claim (409 for another body, 409 idempotency_in_progress for the
same body while the first still runs). A request answered with an error gives the key back:
a failure must not burn the key the caller will retry with. A claim whose request never
answered (its process died) is taken over by the same request after ABANDONED_AFTER_S.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Awaitable, Callable

from fastapi import Request, Response

from actors.refusals import Refusal
from serve_app.auth import Caller
from serve_app.context import Context
from serve_app.errors import ApiError
from storage import http_idempotency as records
from storage.db import is_outage

log = logging.getLogger("metergate.http")

MAX_KEY_CHARS = 255
# A claim with no answer after this long is taken as abandoned (its process died mid-request)
# and the same request may run again; a request never takes this long.
ABANDONED_AFTER_S = 120


async def request_hash(request: Request) -> str:
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    digest.update(await request.body())
    return digest.hexdigest()


def checked_key(key: str | None) -> str | None:
    if key is not None and (not 1 <= len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable()):
        raise ApiError(400, "invalid_idempotency_key",
                       f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters")
    return key


def caller_key(request: Request) -> str | None:
    return checked_key(request.headers.get("idempotency-key"))


def scope_of(caller: Caller) -> str:
    """Keys are scoped per caller: admin, or each org's token (the org's billing page included)."""
    return "admin" if caller.role == "admin" else f"{caller.role}:{caller.org_id or ''}"


async def idempotent(ctx: Context, request: Request, run: Callable[[], Awaitable[Response]]) -> Response:
    """Run the request once per (caller, Idempotency-Key); without the header, just run it."""
    key = caller_key(request)
    if key is None:
        return await run()
    return await once(ctx, scope_of(ctx.caller(request)), key, await request_hash(request), run)


async def once(ctx: Context, scope: str, key: str, fingerprint: str,
               run: Callable[[], Awaitable[Response]]) -> Response:
    """The rules above for one claimed key: `fingerprint` is the request's (request_hash)."""
    pool = await ctx.db()
    async with pool.acquire() as conn:
        seen = await records.claim(conn, scope, key, fingerprint, ABANDONED_AFTER_S)
    if seen is not None:
        if seen.request_hash != fingerprint:
            raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request")
        if seen.status == records.IN_PROGRESS:
            raise ApiError(409, "idempotency_in_progress",
                           "a request with this Idempotency-Key is still running; retry shortly")
        return Response(seen.body, status_code=seen.status, media_type="application/json")
    try:
        response = await run()
    except ApiError as exc:
        # Refused or failed with an answer (nothing of the request was acknowledged): the key
        # is given back, as before it was claimed, so the retry runs. Not when the database
        # went away during the COMMIT and could not be asked since: the request may have
        # committed, and the claim is taken over as abandoned after ABANDONED_AFTER_S, when
        # the ledger's own key answers the rerun with what committed.
        if exc.code != Refusal.OUTCOME_UNKNOWN:
            await _release(pool, scope, key)
        raise
    # Anything else (the client went away, a bug) leaves the claim in place: the work may have
    # committed, and the claim is taken over as abandoned after ABANDONED_AFTER_S.
    if response.status_code >= 500:
        await _release(pool, scope, key)
        return response
    try:
        async with pool.acquire() as conn:
            await records.complete(conn, scope, key, response.status_code, bytes(response.body))
    except Exception as exc:
        if not is_outage(exc):
            raise
        # The request is done (committed); only its answer could not be kept for the key.
        # Telling the caller it failed would be the lie: it gets the answer. The key stays
        # claimed, and a rerun after ABANDONED_AFTER_S finds the ledger's own key.
        log.warning("Idempotency-Key %r: the answer of a finished request was not kept: %r", key, exc)
    return response


async def _release(pool, scope: str, key: str) -> None:
    async with pool.acquire() as conn:
        await records.release(conn, scope, key)
