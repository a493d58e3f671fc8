"""The gate projection for gateways (service token): GET /v1/gate/views (a paged snapshot of
every org's gate view, or one shard's) and GET /v1/gate/feed (every change after a cursor, as
NDJSON, with heartbeats). Formats: metergate_client/projection.py; the protocol:
docs/gate-protocol.md."""

from __future__ import annotations

import asyncio
import base64
import time

import msgspec
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from actors import metrics
from actors.routing import ShardUnavailable
from metergate_client.projection import Heartbeat, Resync, ViewPage, format_cursor, parse_cursor
from serve_app import openapi
from serve_app.auth import bearer
from serve_app.context import Context
from serve_app.errors import ApiError

ENCODER = msgspec.json.Encoder()
MAX_PAGE = 5_000
FEED_RETRY_S = (0.05, 1.0)
PREFIX_PATTERN = r"^[A-Za-z0-9_.:-]*$"  # a beginning of an org id (ids: actors/ticks.py ID_PATTERN)
UNKNOWN_AGE_MS = 3_600_000  # the metrics' age of a shard not heard from on a stream yet


# The feed is NDJSON: one ViewRecord, Heartbeat or Resync (metergate_client/projection.py) a line.
FEED_ANSWERS = openapi.answers({}, openapi.SERVICE, ("400", "409", "422", "429"))
FEED_ANSWERS["responses"]["200"] = {
    "description": "NDJSON, for as long as the client reads: lines of {\"type\": \"view\" | \"heartbeat\" | \"resync\"}",
    "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}


class PageToken(msgspec.Struct, array_like=True, frozen=True):
    cursor: str
    shard: int
    after: str | None
    only: bool = False  # one shard's snapshot (GET /v1/gate/views?shard=)


TOKEN_DECODER = msgspec.json.Decoder(PageToken)


def _token(token: PageToken) -> str:
    return base64.urlsafe_b64encode(ENCODER.encode(token)).decode().rstrip("=")


def _untoken(text: str, shards: int) -> PageToken:
    try:
        token = TOKEN_DECODER.decode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        positions = parse_cursor(token.cursor)
    except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
        raise ApiError(400, "invalid_page", "`page` is not a page token this server gave") from None
    if not 0 <= token.shard < shards or len(positions) != (1 if token.only else shards) or None in positions:
        raise ApiError(400, "invalid_page", "`page` is not a page token this server gave")
    return token


def _cursor_of(text: str | None) -> list[tuple[int, int] | None] | None:
    if text is None:
        return None
    try:
        positions = parse_cursor(text)
    except ValueError:
        raise ApiError(400, "invalid_cursor", "`after` must be a cursor (epoch:seq or - per shard, comma-separated)") \
            from None
    return positions


def _published(ctx: Context) -> None:
    if not ctx.settings.gate_views:
        raise ApiError(409, "gate_views_disabled",
                       "this service runs with METERGATE_GATE_VIEWS=false: shards publish no gate views")


def routes(ctx: Context, serves_feed: bool = True) -> APIRouter:
    """serves_feed False: GET /v1/gate/feed answers 404, on an ingress whose feed runs on
    replicas of its own (METERGATE_FEED_REPLICAS > 0). HAProxy routes by the raw path, so a
    percent-encoded spelling of it would reach the ingress, where a stream would neither be
    counted against its token's cap on the feed replicas nor stay off the ingress's loop."""
    router = APIRouter(tags=["gate projection"])
    feed_metrics = metrics.FeedMetrics()  # this replica's open streams and their lag

    async def position_of(shard: int) -> tuple[int, int]:
        reply = await ctx.router.changes(shard, None, 0, 0)
        return reply["epoch"], reply["seq"]

    @router.get("/v1/gate/views", openapi_extra=openapi.answers(
        {"200": ("A page of the snapshot", ViewPage)}, openapi.SERVICE, ("400", "409", "422", "503")))
    async def gate_views(request: Request, limit: int = Query(1000, ge=1, le=MAX_PAGE),
                         page: str | None = Query(None, max_length=4096),
                         shard: int | None = Query(None, ge=0, le=4095),
                         prefix: str = Query("", max_length=128, pattern=PREFIX_PATTERN)) -> Response:
        """A page of every org's gate view (or of one shard's orgs, `shard`; of the orgs whose
        id begins with `prefix`), in shard then org id order. Follow the feed from `cursor`
        (the same on every page of one snapshot; one shard's "epoch:seq" with `shard`) with the
        same `prefix` to keep them current."""
        ctx.service(request)
        _published(ctx)
        shards = len(ctx.router.handles)
        if shard is not None and shard >= shards:
            raise ApiError(400, "invalid_shard", f"there are {shards} shards, numbered from 0")
        try:
            if page is not None:
                token = _untoken(page, shards)
                if token.only != (shard is not None) or (shard is not None and token.shard != shard):
                    raise ApiError(400, "invalid_page", "`page` is not a page token of this snapshot")
            elif shard is not None:
                token = PageToken(format_cursor([await position_of(shard)]), shard, None, True)
            else:
                positions = await asyncio.gather(*(position_of(k) for k in range(shards)))
                token = PageToken(format_cursor(list(positions)), 0, None)
            lines: list[bytes] = []
            # Each shard's position in this snapshot: records read from Postgres carry it.
            cursor_positions = parse_cursor(token.cursor)
            positions_of = {token.shard: cursor_positions[0]} if token.only else dict(enumerate(cursor_positions))
            at, after = token.shard, token.after
            last = token.shard + 1 if token.only else shards
            while len(lines) < limit and at < last:
                part = await ctx.router.views_page(at, after, limit - len(lines), prefix, positions_of[at])
                lines += part["views"]
                if part["last"] is None:
                    at, after = at + 1, None
                else:
                    after = part["last"]
        except ShardUnavailable as exc:
            raise ApiError(503, "shard_unavailable", str(exc)) from None
        following = _token(PageToken(token.cursor, at, after, token.only)) if at < last else None
        body = b'{"cursor":' + ENCODER.encode(token.cursor) + b',"next":' + ENCODER.encode(following) \
            + (b',"shard":' + ENCODER.encode(shard) if shard is not None else b"") \
            + b',"views":[' + b",".join(lines) + b"]}"
        return Response(body, media_type="application/json")

    @router.get("/v1/gate/clock", openapi_extra=openapi.answers(
        {"200": ("Each shard's clock, null for a shard that did not answer", openapi.GateClock)}, openapi.SERVICE))
    async def gate_clock(request: Request) -> Response:
        """Each shard's time now ({"now_us": [...]}, null for a shard that did not answer): a
        reader that times this request bounds each shard's clock from above (the shard read
        its clock after the request was sent), which one-way feed lines cannot."""
        ctx.service(request)

        async def now_of(shard: int) -> int | None:
            try:
                return (await ctx.router.changes(shard, None, 0, 0))["now_us"]
            except ShardUnavailable:
                return None

        return Response(ENCODER.encode({"now_us": await asyncio.gather(*(now_of(k) for k in range(
            len(ctx.router.handles))))}), media_type="application/json", headers={"Cache-Control": "no-store"})

    @router.get("/v1/gate/feed", response_class=StreamingResponse, openapi_extra=FEED_ANSWERS)
    async def gate_feed(request: Request, after: str | None = Query(None, max_length=4096),
                        heartbeat_s: float = Query(0.5, ge=0.05, le=30),
                        prefix: str = Query("", max_length=128, pattern=PREFIX_PATTERN)) -> StreamingResponse:
        """Every view published after `after` (a cursor; none: from now, every shard to be
        loaded), of the orgs whose id begins with `prefix`, as NDJSON lines ({"type": "view"
        | "heartbeat" | "resync", ...}), for as long as the client reads."""
        ctx.service(request)
        if not serves_feed:
            raise ApiError(404, "not_found", "Not Found")
        _published(ctx)
        start = _cursor_of(after)
        # Each stream polls every shard up to 20 times a second: one token may hold only so many
        # at once on a replica (a leaked loop of reconnects must not starve the gate).
        token = bearer(request)
        if streams.get(token, 0) >= ctx.settings.max_feed_streams_per_token:
            raise ApiError(429, "too_many_streams", f"this token holds {streams[token]} gate feed streams on this "
                           "replica already (METERGATE_MAX_FEED_STREAMS_PER_TOKEN); close one or retry later")
        streams[token] = streams.get(token, 0) + 1
        return CountedStream(streams, token, _lines(start, heartbeat_s, len(ctx.router.handles), prefix),
                             media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    streams: dict[str, int] = {}  # token → its open streams on this replica

    async def _lines(start: list[tuple[int, int] | None] | None, heartbeat_s: float, shards: int, prefix: str):
        if start is not None and len(start) != shards:
            yield ENCODER.encode(Resync("the cursor is for another number of shards")) + b"\n"
            return
        # Bounded: a client that stops reading stops the polls (the shards keep each org's
        # latest view, so what waits there is not lost, only later).
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * shards)
        wait_s = min(heartbeat_s, 1.0)

        async def follow(shard: int) -> None:
            """One shard's records, and what its replies state: its clock, and as of when
            its feed is complete. A shard that restarted, or that the reader has no position
            in, is announced by a resync of that shard alone; the stream goes on with it."""
            epoch, seq = start[shard] if start is not None and start[shard] is not None else (None, 0)
            retry = FEED_RETRY_S[0]
            while True:
                try:
                    reply = await ctx.router.changes(shard, epoch, seq, wait_s, prefix)
                except ShardUnavailable:
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, FEED_RETRY_S[1])
                    continue
                received = time.monotonic()
                retry = FEED_RETRY_S[0]
                if epoch is None or reply["resync"]:
                    reason = ("no position in this shard" if epoch is None else "shard restarted"
                              if reply["epoch"] != epoch else "behind the records the shard's view log dropped")
                    epoch, seq = reply["epoch"], reply["seq"]
                    await queue.put((shard, epoch, seq, None, None, reply["now_us"], received, reason))
                    continue
                epoch, seq = reply["epoch"], reply["seq"]
                chunk = b"\n".join(reply["views"]) + b"\n" if reply["views"] else b""
                # A capped answer proves nothing about what it left out: no new "as of" for it.
                as_of = None if reply["more"] else reply["now_us"]
                await queue.put((shard, epoch, seq, chunk, as_of, reply["now_us"], received, None))

        # What has been written: a heartbeat never claims a record still in the queue. Each
        # shard's clock is its last reply's time plus the time since (monotonic, here).
        positions: list[tuple[int, int] | None] = list(start) if start is not None else [None] * shards
        as_of_us: list[int | None] = [None] * shards
        clocks: list[tuple[int, float] | None] = [None] * shards
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
                    shard, epoch, seq, chunk, as_of, shard_now, received, resync = item
                    clocks[shard] = (shard_now, received)
                    positions[shard] = (epoch, seq)
                    if resync is not None:
                        as_of_us[shard] = None
                        yield ENCODER.encode(Resync(resync, shard, epoch)) + b"\n"
                    else:
                        if as_of is not None:
                            as_of_us[shard] = as_of
                        if chunk:
                            yield chunk
                now = time.monotonic()
                if now >= next_beat:
                    now_us = [None if c is None else c[0] + int((now - c[1]) * 1e6) for c in clocks]
                    yield ENCODER.encode(Heartbeat(format_cursor(positions), now_us, list(as_of_us))) + b"\n"
                    feed_metrics.heartbeat([UNKNOWN_AGE_MS if a is None or n is None else max(0, (n - a) // 1000)
                                            for a, n in zip(as_of_us, now_us)])
                    next_beat = now + heartbeat_s
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
