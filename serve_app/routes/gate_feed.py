"""The gate projection for gateways (service token): GET /v1/gate/views (a paged snapshot of
every org's gate view) and GET /v1/gate/feed (every change after a cursor, as NDJSON, with
heartbeats). Formats: metergate_client/projection.py and README "Gate views and feed"."""

from __future__ import annotations

import asyncio
import base64
import time

import msgspec
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from actors import metrics
from actors.routing import ShardUnavailable
from metergate_client.projection import Heartbeat, Resync, format_cursor, parse_cursor
from serve_app.auth import bearer
from serve_app.context import Context
from serve_app.errors import ApiError

ENCODER = msgspec.json.Encoder()
MAX_PAGE = 5_000
FEED_RETRY_S = (0.05, 1.0)
UNKNOWN_AGE_MS = 3_600_000  # a heartbeat's age for a shard not heard from on this stream yet


class PageToken(msgspec.Struct, array_like=True, frozen=True):
    cursor: str
    shard: int
    after: str | None


TOKEN_DECODER = msgspec.json.Decoder(PageToken)


def _token(token: PageToken) -> str:
    return base64.urlsafe_b64encode(ENCODER.encode(token)).decode().rstrip("=")


def _untoken(text: str, shards: int) -> PageToken:
    try:
        token = TOKEN_DECODER.decode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        parse_cursor(token.cursor)
    except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
        raise ApiError(400, "invalid_page", "`page` is not a page token this server gave") from None
    if not 0 <= token.shard < shards:
        raise ApiError(400, "invalid_page", "`page` is not a page token this server gave")
    return token


def _cursor_of(text: str | None) -> list[tuple[int, int]] | None:
    if text is None:
        return None
    try:
        positions = parse_cursor(text)
    except ValueError:
        raise ApiError(400, "invalid_cursor", "`after` must be a cursor (epoch:seq per shard, comma-separated)") \
            from None
    return positions


def _published(ctx: Context) -> None:
    if not ctx.settings.gate_views:
        raise ApiError(409, "gate_views_disabled",
                       "this service runs with METERGATE_GATE_VIEWS=false: shards publish no gate views")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["gate projection"])
    feed_metrics = metrics.FeedMetrics()  # this replica's open streams and their lag

    async def positions_now() -> list[tuple[int, int]]:
        shards = len(ctx.router.handles)  # read per request: the app is built before (or without) a router
        replies = await asyncio.gather(*(ctx.router.changes(k, None, 0, 0) for k in range(shards)))
        return [(r["epoch"], r["seq"]) for r in replies]

    @router.get("/v1/gate/views")
    async def gate_views(request: Request, limit: int = Query(1000, ge=1, le=MAX_PAGE),
                         page: str | None = Query(None, max_length=4096)) -> Response:
        """A page of every org's gate view, in shard then org id order. Follow the feed from
        `cursor` (the same on every page of one snapshot) to keep them current."""
        ctx.service(request)
        _published(ctx)
        shards = len(ctx.router.handles)
        try:
            token = _untoken(page, shards) if page is not None else PageToken(
                format_cursor(await positions_now()), 0, None)
            lines: list[bytes] = []
            shard, after = token.shard, token.after
            while len(lines) < limit and shard < shards:
                part = await ctx.router.views_page(shard, after, limit - len(lines))
                lines += part["views"]
                if part["last"] is None:
                    shard, after = shard + 1, None
                else:
                    after = part["last"]
        except ShardUnavailable as exc:
            raise ApiError(503, "shard_unavailable", str(exc)) from None
        following = _token(PageToken(token.cursor, shard, after)) if shard < shards else None
        body = b'{"cursor":' + ENCODER.encode(token.cursor) + b',"next":' + ENCODER.encode(following) \
            + b',"views":[' + b",".join(lines) + b"]}"
        return Response(body, media_type="application/json")

    @router.get("/v1/gate/feed")
    async def gate_feed(request: Request, after: str | None = Query(None, max_length=4096),
                        heartbeat_s: float = Query(0.5, ge=0.05, le=30)) -> StreamingResponse:
        """Every view published after `after` (a cursor; none: from now), as NDJSON lines
        ({"type": "view" | "heartbeat" | "resync", ...}), for as long as the client reads."""
        ctx.service(request)
        _published(ctx)
        start = _cursor_of(after)
        # Each stream polls every shard up to 20 times a second: one token may hold only so many
        # at once on a replica (a leaked loop of reconnects must not starve the gate).
        token = bearer(request)
        if streams.get(token, 0) >= ctx.settings.max_feed_streams_per_token:
            raise ApiError(429, "too_many_streams", f"this token holds {streams[token]} gate feed streams on this "
                           "replica already (METERGATE_MAX_FEED_STREAMS_PER_TOKEN); close one or retry later")
        streams[token] = streams.get(token, 0) + 1
        return CountedStream(streams, token, _lines(start, heartbeat_s, len(ctx.router.handles)),
                             media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    streams: dict[str, int] = {}  # token → its open streams on this replica

    async def _lines(start: list[tuple[int, int]] | None, heartbeat_s: float, shards: int):
        if start is not None and len(start) != shards:
            yield ENCODER.encode(Resync("the cursor is for another number of shards")) + b"\n"
            return
        # Bounded: a client that stops reading stops the polls (the shards keep each org's
        # latest view, so what waits there is not lost, only later).
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * shards)
        wait_s = min(heartbeat_s, 1.0)

        async def follow(shard: int) -> None:
            epoch, seq = start[shard] if start is not None else (None, 0)
            retry = FEED_RETRY_S[0]
            while True:
                sent = time.monotonic()
                try:
                    reply = await ctx.router.changes(shard, epoch, seq, wait_s)
                except ShardUnavailable:
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, FEED_RETRY_S[1])
                    continue
                retry = FEED_RETRY_S[0]
                if reply["resync"]:
                    await queue.put((shard, None, None, None, None))
                    return
                epoch, seq = reply["epoch"], reply["seq"]
                chunk = b"\n".join(reply["views"]) + b"\n" if reply["views"] else b""
                # A capped answer proves nothing about what it left out: no new "heard" for it.
                heard_at = None if reply["more"] else sent + reply["waited_s"]
                await queue.put((shard, epoch, seq, chunk, heard_at, reply["now_us"]))

        # What has been written: a heartbeat never claims a record still in the queue.
        # A resumed stream is positioned at its cursor at once: heartbeats go on while a
        # shard that cannot be reached shows as old (UNKNOWN_AGE_MS), not stop for all.
        positions: list[tuple[int, int] | None] = list(start) if start is not None else [None] * shards
        heard: list[float | None] = [None] * shards
        server_now = [0, 0.0]  # the shards' clock, and when it was read
        tasks = [asyncio.ensure_future(follow(k)) for k in range(shards)]
        next_beat = time.monotonic()
        feed_metrics.opened()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, next_beat - time.monotonic()))
                except TimeoutError:
                    item = None
                if item is not None:
                    shard, epoch, seq, chunk = item[:4]
                    if epoch is None:
                        yield ENCODER.encode(Resync(f"shard {shard} restarted")) + b"\n"
                        return
                    positions[shard] = (epoch, seq)
                    if item[4] is not None:
                        heard[shard] = item[4]
                    server_now[:] = [item[5], time.monotonic()]
                    if chunk:
                        yield chunk
                now = time.monotonic()
                if now >= next_beat and all(p is not None for p in positions):
                    age_ms = [UNKNOWN_AGE_MS if h is None else int((now - h) * 1000) for h in heard]
                    yield ENCODER.encode(Heartbeat(
                        format_cursor(positions), server_now[0] + int((now - server_now[1]) * 1e6), age_ms)) + b"\n"
                    feed_metrics.heartbeat(age_ms)
                    next_beat = now + heartbeat_s
                elif now >= next_beat:
                    next_beat = now + 0.05  # not every shard has answered yet
        finally:
            feed_metrics.closed()
            for task in tasks:
                task.cancel()

    return router


class CountedStream(StreamingResponse):
    """A feed stream that gives its token's slot back however it ends: also when the client
    left before the first line, so that its body never started (a reconnect loop must not use
    up the token's streams for good)."""

    def __init__(self, streams: dict[str, int], token: str, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.streams, self.token = streams, token

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.streams[self.token] -= 1
            if not self.streams[self.token]:
                del self.streams[self.token]
            await self.body_iterator.aclose()
