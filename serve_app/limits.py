"""Before any handler reads a byte of a body: who is calling, how big the body is, how many
large bodies are read at once, and whether an org token is still good and not overused.

An unauthenticated upload is refused from its headers alone (401), so a crowd of slow
uploads holds no memory; a declared body over its path's limit is 413 at once. Webhooks
authenticate by a signature over the body: their signature headers must be there first.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec

from config.settings import Settings
from serve_app.auth import ORG_TOKEN_PREFIX, Caller, forbidden, presented_in
from serve_app.errors import ApiError, error_body

# Per replica: bodies over the default limit (or of no declared length) read at the same time,
# on the compute plane's paths and on the webhooks' (kept apart: a crowd of slow uploads with
# made-up signature headers must not starve usage), and how long one waits for its turn.
LARGE_BODIES_AT_ONCE = 16
LARGE_WEBHOOK_BODIES_AT_ONCE = 4
LARGE_BODY_WAIT_S = 10
RETRY_AFTER_S = 1
WEBHOOK_SIGNATURES = {"/webhooks/stripe": (b"stripe-signature",),
                      "/webhooks/svix": (b"svix-id", b"svix-timestamp", b"svix-signature")}
# Batches (ticks, gate checks) and Svix's events may be up to METERGATE_MAX_USAGE_BODY_BYTES;
# every other body up to METERGATE_MAX_BODY_BYTES.
LARGE_BODY_PATHS = ("/v1/usage", "/v1/gate/batch", "/webhooks/svix")


def body_limit_bytes(settings: Settings, path: str) -> int:
    """The most a request to `path` may send: the one place that says which limit holds where
    (this middleware and the gate's hot path both ask it)."""
    return settings.max_usage_body_bytes if path in LARGE_BODY_PATHS else settings.max_body_bytes


class OrgTokenBudget:
    """Requests an org token may make: a bucket of `burst`, refilled at `per_s`. A holder of
    one org's token loops the billing page; the replica's loop also serves every org's gate."""

    def __init__(self, burst: int, per_s: float) -> None:
        self.burst, self.per_s = burst, per_s
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, token: str, now_s: float) -> float:
        """0.0 if the request may go, else seconds until it may."""
        tokens, at = self.buckets.get(token, (float(self.burst), now_s))
        tokens = min(self.burst, tokens + (now_s - at) * self.per_s)
        if tokens < 1:
            self.buckets[token] = (tokens, now_s)
            return (1 - tokens) / self.per_s
        self.buckets[token] = (tokens - 1, now_s)
        if len(self.buckets) > 10_000:  # bounded: forget the idlest half
            for key, _ in sorted(self.buckets.items(), key=lambda item: item[1][1])[:5_000]:
                del self.buckets[key]
        return 0.0


class BodyLimit:
    """ASGI middleware: authentication from the headers, then the body (bounded, replayed)."""

    def __init__(self, app, ctx) -> None:
        self.app = app
        self.default_limit = ctx.settings.max_body_bytes
        self.limits = {path: body_limit_bytes(ctx.settings, path) for path in LARGE_BODY_PATHS}
        self.ctx = ctx
        self.large = asyncio.Semaphore(LARGE_BODIES_AT_ONCE)
        self.large_webhooks = asyncio.Semaphore(LARGE_WEBHOOK_BODIES_AT_ONCE)
        self.budget = OrgTokenBudget(ctx.settings.org_token_burst, ctx.settings.org_token_requests_per_minute / 60)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        try:
            has_body = await self._admit(scope, headers)
        except ApiError as exc:
            await _refuse(send, exc)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        small = declared is not None and declared.isdigit() and int(declared) <= self.default_limit
        if limit <= self.default_limit or small:
            await self._read(scope, receive, send, limit)
            return
        turns = self.large_webhooks if scope["path"] in WEBHOOK_SIGNATURES else self.large
        try:
            await asyncio.wait_for(turns.acquire(), LARGE_BODY_WAIT_S)
        except TimeoutError:
            await _refuse(send, ApiError(429, "too_many_large_bodies", "too many large bodies are being received; "
                                         "retry in a moment"), retry=True)
            return
        try:
            await self._read(scope, receive, send, limit)
        finally:
            turns.release()

    async def _admit(self, scope, headers: dict) -> bool:
        """Whether the request has a body to read; raises ApiError for a caller refused from
        its headers alone."""
        method, path = scope["method"], scope["path"]
        has_body = method in ("POST", "PUT", "PATCH", "DELETE") and (
            headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers)
        found = presented_in(scope, browser=path.startswith("/billing/"))
        token = found[0] if found is not None else None
        caller = self.ctx.identify(token) if token is not None and (
            has_body or token.startswith(ORG_TOKEN_PREFIX)) else None
        if caller is not None and caller.role == "org":
            await self._org_token_ok(token, caller)
            if has_body and path in self.limits and path not in WEBHOOK_SIGNATURES:
                raise forbidden("an org token cannot use the compute-plane API")  # before its large body
        if has_body:
            needed = WEBHOOK_SIGNATURES.get(path)
            if needed is not None:
                if not all(headers.get(name) for name in needed):
                    raise ApiError(400, "invalid_signature", f"missing {', '.join(n.decode() for n in needed)} header")
            elif caller is None:
                raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        return has_body

    async def _org_token_ok(self, token: str, caller: Caller) -> None:
        await self.ctx.require_unrevoked(caller)
        wait_s = self.budget.take(token, time.monotonic())
        if wait_s:
            raise ApiError(429, "rate_limited", "too many requests with this org token; slow down",
                           retry_after_s=math.ceil(wait_s))

    async def _read(self, scope, receive, send, limit: int) -> None:
        # Read the body up front (bounded), then replay it: a chunked body over the limit is
        # refused before the handler sees a byte of it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


async def _refuse(send, exc: ApiError, retry: bool = False) -> None:
    retry_after = exc.details.pop("retry_after_s", RETRY_AFTER_S if retry or exc.status == 503 else None)
    payload = msgspec.json.encode(error_body(exc.code, exc.message, **exc.details))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _too_large(send, limit: int) -> None:
    await _refuse(send, ApiError(413, "payload_too_large", f"request body is over {limit} bytes", limit_bytes=limit))


def _replay(messages: list[dict], then=None):
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
