"""POST /v1/gate and /v1/gate/batch straight off ASGI, before the framework.

The gate is answered from the router's views in microseconds; FastAPI's routing, dependency
and middleware layers would cost more than the decision. This wrapper answers the plain case
itself (the service or admin token, a body within the limit) with the same functions the
FastAPI routes use, a refusal with the same error_response as the app's handler, and hands
every other request to the app unchanged, its body replayed (auth failures, bodies over the
limit, bugs): each keeps one implementation. Every answer, its own and the app's, is counted
and timed by route family (serve_app/request_metrics.py).
"""

from __future__ import annotations

import hmac
import time

import msgspec

from serve_app.context import Context
from serve_app.errors import ApiError, error_response
from serve_app.limits import body_limit_bytes
from serve_app.request_metrics import RequestMetrics
from serve_app.routes.gate import gate_answer, gate_batch_answer

ENCODE = msgspec.json.Encoder().encode
JSON_HEADERS = [(b"content-type", b"application/json")]


class HotPath:
    def __init__(self, app, ctx: Context) -> None:
        self.metrics = RequestMetrics(app.routes)
        self.app = self.metrics.timed(app)
        self.ctx = ctx
        self.answers = {"/v1/gate": gate_answer, "/v1/gate/batch": gate_batch_answer}
        self.limits = {path: body_limit_bytes(ctx.settings, path) for path in self.answers}
        self.tokens = [f"Bearer {t}".encode() for t in (ctx.settings.service_token, ctx.settings.admin_token) if t]

    async def __call__(self, scope, receive, send) -> None:
        answer = self.answers.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if answer is None or not self._authorized(scope):
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        limit = self.limits[scope["path"]]
        declared = dict(scope["headers"]).get(b"content-length")
        # Before a byte is read: reading first held a declared 100 MB until HAProxy's client
        # timeout (30 s, then its HTML 400; issue 18). Not refused in HAProxy itself: the app
        # answers 401 or 403 from the headers before it looks at a size (limits.py).
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self.app(scope, receive, send)  # the app's body limit answers 413 at once, unread
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(chunks, message, receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:  # the app's body limit answers 413
                await self.app(scope, _replay(chunks, None, receive, more), send)
                return
        try:
            body = ENCODE(await answer(self.ctx, b"".join(chunks)))
        except ApiError as exc:  # refused: the answer the app's handler gives, without deciding again
            self.metrics.answered(scope["path"], "POST", exc.status, started_s)
            await error_response(exc.status, exc.code, exc.message, **exc.details)(scope, receive, send)
            return
        except Exception:  # noqa: BLE001 - a bug: the app answers it (and logs it), as any request
            await self.app(scope, _replay(chunks, None, receive), send)
            return
        self.metrics.answered(scope["path"], "POST", 200, started_s)  # the path is its route's template
        await send({"type": "http.response.start", "status": 200,
                    "headers": JSON_HEADERS + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return any(hmac.compare_digest(value, token) for token in self.tokens)
        return False


def _replay(chunks: list[bytes], last: dict | None, receive, more: bool = False):
    """A receive() that gives back what was read (then `last`, then the rest of the stream)."""
    queue = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
    if last is not None:
        queue.append(last)

    async def replayed() -> dict:
        return queue.pop(0) if queue else await receive()

    return replayed
