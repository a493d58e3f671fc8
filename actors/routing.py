"""Routing by org to cached shard handles, with per-shard call batching (used by the ingress
and by the scheduler), and the router's own projection of the shards' gate views.

One Ray call per request would cost a hop per request; instead each shard gets a batcher that
sends whatever queued up while its previous call was in flight, so under load many gate
checks or commands share one hop, and at low load a call goes out at once.

Gate checks cost no hop at all while the router follows the shard's view feed: it decides
from the org's published view with the same pure function the shard uses. It asks the shard
for an org's view only when it has none, when the view has expired, or when it has not heard
from the shard's feed lately (then the shard's own answer is the only current one). Every
reply to a command, and to a usage batch of at most 64 orgs, carries the views it changed, so
a change made through this router shows in its next gate check at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Awaitable, Callable

import ray
from ray.exceptions import RayActorError, RayError

from actors import metrics
from actors.placement import NAMESPACE, cached_slot_of, shard_name
from actors.refusals import Refusal
from actors.ticks import TICKS_ENCODER, Tick
from config.version import incompatibility, this_version
from metergate_client.decision import Decision, Resources, decide
from metergate_client.projection import RECORD_DECODER, Projection, ViewRecord, mono_us

log = logging.getLogger("metergate.routing")
MAX_BATCH = 4096
FEED_WAIT_S = 0.5  # a shard's feed answers at least this often, with or without changes
FRESH_S = 2.0  # a view is decided from locally only while the shard's feed was heard this recently
FEED_RETRY_S = (0.05, 1.0)  # backoff of a feed whose shard cannot be reached: first, at most


class ShardUnavailable(Exception):
    """A shard actor could not be reached (restarting, or its node gone): retry the request."""

    code = Refusal.SHARD_UNAVAILABLE

    def __init__(self, shard: int, message: str | None = None) -> None:
        super().__init__(message or f"billing shard {shard} is unavailable; retry the request")
        self.shard = shard


class ShardVersionMismatch(ShardUnavailable):
    """The shard runs a version this router may not talk to (config/version.py): a deploy
    mixes versions. Nothing is sent to it; the 503 lasts until the versions agree."""

    code = Refusal.SHARD_VERSION_MISMATCH

    def __init__(self, shard: int, why: str) -> None:
        super().__init__(shard, f"billing shard {shard} is refused: {why}; a deploy is mixing metergate versions, "
                                "and requests for its orgs fail until every part runs one version "
                                "(docs/operations/upgrades.md)")


class Batcher:
    def __init__(self, shard: int, send: Callable[[list], Awaitable[list]], max_in_flight: int = 2) -> None:
        self.shard = shard
        self.send = send
        self.max_in_flight = max_in_flight
        self.queue: list[tuple[object, asyncio.Future]] = []
        self.in_flight = 0

    async def call(self, item: object) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self.queue and self.in_flight < self.max_in_flight:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            self.in_flight += 1
            asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[object, asyncio.Future]]) -> None:
        try:
            results = await self.send([item for item, _ in batch])
        except RayError:
            failure = ShardUnavailable(self.shard)
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            assert len(results) == len(batch), (len(results), len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self.in_flight -= 1
            self._pump()


def reason_of(answer: Decision | dict) -> str:
    """A gate answer's reason, or the code of the refusal that stood in for a decision."""
    return answer.reason if isinstance(answer, Decision) else answer["error"]["code"]


MAX_ANSWERED_KEPT = 10_000  # unpublished views a router remembers for its tokens, the latest kept


def view_end_us(records, shard_now_us, now: int) -> int | None:
    """When the view a decision came from ends, in this replica's clock (a record's
    valid_until_us is in its shard's), from the records it may have been: the router's
    published record of the org and the unpublished one a shard last answered for it (seq 0:
    a command of the org being committed). The soonest end is taken; one already past gives
    `now` (fail closed: a token then ends at once, never outlives the view). None: no record
    with an end (valid until the next record), the token keeps its own lifetime."""
    ends = []
    for record in records:
        if record is None or record.valid_until_us is None:
            continue
        shard_now = shard_now_us(record.shard)
        ends.append(now + record.valid_until_us - (shard_now if shard_now is not None else now))
    return max(now, min(ends)) if ends else None


class ShardRouter:
    def __init__(self, slot_to_shard: list[int], project_views: bool = True) -> None:
        """project_views: keep the views that replies carry (the ingress, which gates)."""
        self.slot_to_shard = slot_to_shard
        self.project_views = project_views
        shard_count = max(slot_to_shard) + 1
        self.handles = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(shard_count)]
        # The version handshake: a shard is called only once its ready() reported a version
        # this code may talk to; again after it died or restarted (it may run other code then).
        self.version = this_version()
        self.agreed = [False] * shard_count
        self.handshakes = [asyncio.Lock() for _ in range(shard_count)]
        self.views = [Batcher(k, self._sender(k, "gate_views")) for k in range(shard_count)]
        self.projection = Projection()
        # org → (the unpublished view a shard last answered, the seq of the published one then)
        self.answered: dict[str, tuple[ViewRecord, int]] = {}
        self.following: list[asyncio.Task] = []
        self.commands = [Batcher(k, self._sender(k, "submit")) for k in range(shard_count)]
        self.states = [Batcher(k, self._sender(k, "state")) for k in range(shard_count)]

    # ----- the version handshake ---------------------------------------------------------

    async def handle(self, shard: int):
        """The shard's actor handle, once it reported a version this code may talk to; raises
        ShardVersionMismatch (it may not) or ShardUnavailable (it did not answer)."""
        if self.agreed[shard]:
            return self.handles[shard]
        async with self.handshakes[shard]:
            if not self.agreed[shard]:
                await self._handshake(shard)
        return self.handles[shard]

    async def _handshake(self, shard: int) -> None:
        for attempt in range(2):
            try:
                report = await self.handles[shard].ready.remote()
                break
            except RayActorError:
                # Gone for good (a deploy replaced it) or restarting: its name may now lead to
                # a new actor.
                if attempt:
                    raise ShardUnavailable(shard) from None
                try:
                    self.handles[shard] = await asyncio.to_thread(ray.get_actor, shard_name(shard),
                                                                  namespace=NAMESPACE)
                except ValueError:
                    raise ShardUnavailable(shard) from None
            except RayError:  # its start failed (Postgres away): asked again at the next call
                raise ShardUnavailable(shard) from None
        why = incompatibility(report.get("version"), self.version)
        if why is not None:
            log.error("routing: billing shard %s refused: %s", shard, why)
            raise ShardVersionMismatch(shard, why)
        self.agreed[shard] = True

    def forget_version(self, shard: int) -> None:
        """The shard died or restarted: it is asked its version again before the next call."""
        self.agreed[shard] = False

    def _sender(self, shard: int, method: str) -> Callable[[list], Awaitable[list]]:
        async def send(items: list) -> list:
            handle = await self.handle(shard)
            try:
                return await getattr(handle, method).remote(items)
            except RayActorError:
                self.forget_version(shard)
                raise

        return send

    def shard_of(self, org_id: str) -> int:
        return self.slot_to_shard[cached_slot_of(org_id)]

    # ----- the gate, from the shards' views ---------------------------------------------

    def _decide_locally(self, org_id: str, action: str, resources: Resources,
                        max_age_s: float) -> tuple[Decision, float] | None:
        return self.projection.decide(org_id, action, resources, min(FRESH_S, max_age_s))

    async def gate(self, org_id: str, action: str, resources: Resources,
                   max_age_s: float = FRESH_S) -> tuple[Decision | dict, float]:
        """The gate decision, or the shard's refusal ({"error": ...}: unknown org, shard down),
        and the age of the view it was decided from (0: the shard's own, current view). A view
        of this router's older than max_age_s (or FRESH_S) is not decided from."""
        if not self.following:
            self._follow()
        decided = self._decide_locally(org_id, action, resources, max_age_s)
        if decided is not None:
            metrics.gate_decided(decided[0].reason, action, "local", decided[0].would_reason)
            return decided
        answer = await self._decide_from_shard(org_id, action, resources)
        metrics.gate_decided(reason_of(answer), action, "shard", getattr(answer, "would_reason", None))
        return answer, 0.0

    async def _decide_from_shard(self, org_id: str, action: str, resources: Resources) -> Decision | dict:
        shard = self.shard_of(org_id)
        try:
            reply = await self.views[shard].call(org_id)
        except ShardVersionMismatch as exc:
            return {"error": {"code": exc.code, "message": str(exc)}}
        except ShardUnavailable:
            return {"error": {"code": Refusal.SHARD_UNAVAILABLE,
                              "message": f"billing shard {shard} is unavailable; retry the check"}}
        if "view" not in reply:
            return reply
        record = RECORD_DECODER.decode(reply["view"])
        if record.seq:  # seq 0: a view for this answer only, not a published one
            self.projection.apply(record)
            self.answered.pop(org_id, None)
        else:  # kept (the latest per org) so a token of this answer ends with its view, while no
            self.answered.pop(org_id, None)  # newer published record came (the seq it came after)
            published = self.projection.get(org_id)
            self.answered[org_id] = (record, published.seq if published is not None else 0)
            if len(self.answered) > MAX_ANSWERED_KEPT:
                del self.answered[next(iter(self.answered))]
        return decide(action, resources, record.view)  # the shard's current view

    def view_until_us(self, org_id: str, now: int) -> int | None:
        """When the view the org's last decision came from ends, in this replica's clock: see
        view_end_us. Read right after the decision, with no await between."""
        projection = self.projection
        published = projection.get(org_id)
        answered = self.answered.get(org_id)
        if answered is not None and answered[1] != (published.seq if published is not None else 0):
            del self.answered[org_id]  # a newer published view came since: decisions are from it
            answered = None
        return view_end_us((published, answered[0] if answered else None), projection.shard_now_us, now)

    async def gate_many(self, checks: list[tuple[str, str, Resources]],
                        max_age_s: float = FRESH_S) -> list[tuple[Decision | dict, float]]:
        """Many (org_id, action, resources) checks, answers in order: each what gate() answers."""
        if not self.following:
            self._follow()
        answers: list[tuple[Decision | dict, float] | None] = [
            self._decide_locally(*check, max_age_s) for check in checks]
        missing = [index for index, answer in enumerate(answers) if answer is None]
        if missing:
            for index, answer in zip(missing, await asyncio.gather(
                    *(self._decide_from_shard(*checks[index]) for index in missing))):
                answers[index] = (answer, 0.0)
        asked = set(missing)
        metrics.gates_decided(Counter((reason_of(answer[0]), check[1], "shard" if index in asked else "local",
                                       getattr(answer[0], "would_reason", None))
                                      for index, (check, answer) in enumerate(zip(checks, answers))))
        return answers

    def _follow(self) -> None:
        """Follow every shard's view feed, for as long as this router lives (started on the
        serving loop, on first use)."""
        self.following = [asyncio.ensure_future(self._follow_shard(k)) for k in range(len(self.handles))]

    async def _follow_shard(self, shard: int) -> None:
        epoch, seq, retry = None, 0, FEED_RETRY_S[0]
        projection = self.projection
        while True:
            sent = mono_us()
            try:
                handle = await self.handle(shard)
                reply = await handle.changes.remote(epoch, seq, FEED_WAIT_S)
            except (RayError, ShardUnavailable) as exc:  # the shard restarts or its node is gone, or
                # runs another version: decide from it (which refuses), not from views
                if isinstance(exc, RayActorError):
                    self.forget_version(shard)
                projection.forget_heard(shard)
                await asyncio.sleep(retry)
                retry = min(retry * 2, FEED_RETRY_S[1])
                continue
            except Exception:  # noqa: BLE001 - a bug must not stop the feed for good
                log.exception("following shard %s's view feed", shard)
                projection.forget_heard(shard)
                await asyncio.sleep(FEED_RETRY_S[1])
                continue
            retry = FEED_RETRY_S[0]
            if epoch is not None and reply["epoch"] != epoch:
                self.forget_version(shard)  # a new incarnation, maybe of other code: asked again
            if epoch is None or reply["resync"]:
                # A new incarnation, the first contact, or behind what the log dropped: forget
                # the shard's views and read its whole log from seq 0 (every org's latest
                # view), or when the log dropped some, from now on (an org with no view here
                # is asked of the shard). Not current until then.
                epoch, seq = reply["epoch"], (0 if not reply.get("floor") else reply["seq"])
                projection.reset(shard, epoch, seq, every=True)  # nothing at or below (epoch, seq) again
                continue
            received = mono_us()
            projection.clock(shard, reply["now_us"], received)
            # The shard began to answer after we asked: its time then bounds its clock from above.
            projection.clock(shard, reply["now_us"] - int(reply["waited_s"] * 1e6), received, sent)
            projection.advance(shard, reply["epoch"], reply["seq"],
                               [RECORD_DECODER.decode(line) for line in reply["views"]])
            epoch, seq = reply["epoch"], reply["seq"]
            if not reply["more"]:  # a capped answer proves nothing about what it left out
                projection.heard(shard, reply["now_us"])  # in the shard's time: transit counts

    async def caught_up(self, timeout_s: float = 5.0) -> bool:
        """Wait until this router's views include everything every shard published before the
        call, and it has heard each shard's clock since (the test clock moved). False on timeout."""
        if not self.following:
            return True
        started = time.monotonic()
        try:
            targets = await asyncio.gather(*(self.changes(k, None, 0, 0) for k in range(len(self.handles))))
        except ShardUnavailable:
            return False
        while time.monotonic() - started < timeout_s:
            positions = self.projection.positions()
            if all(positions.get(k, (-1, -1)) >= (t["epoch"], t["seq"]) and
                   self.projection.age_s(k) <= time.monotonic() - started for k, t in enumerate(targets)):
                return True
            await asyncio.sleep(0.01)
        return False

    def _take_views(self, reply: dict) -> dict:
        """Apply the views a shard's reply carries (popped: callers never see them)."""
        lines = reply.pop("views", None) or []
        line = reply.pop("view", None)
        if line is not None:
            lines.append(line)
        if self.project_views:
            for line in lines:
                self.projection.apply(RECORD_DECODER.decode(line))
        return reply

    async def changes(self, shard: int, epoch: int | None, seq: int, wait_s: float, prefix: str = "") -> dict:
        """One shard's view feed after (epoch, seq), of the orgs whose id begins with `prefix`;
        raises ShardUnavailable."""
        handle = await self.handle(shard)
        try:
            return await handle.changes.remote(epoch, seq, wait_s, prefix)
        except RayError as exc:
            if isinstance(exc, RayActorError):
                self.forget_version(shard)
            raise ShardUnavailable(shard) from None

    async def views_page(self, shard: int, after: str | None, limit: int, prefix: str = "",
                         as_of: tuple[int, int] | None = None) -> dict:
        handle = await self.handle(shard)
        try:
            return await handle.views_page.remote(after, limit, prefix, as_of)
        except RayError as exc:
            if isinstance(exc, RayActorError):
                self.forget_version(shard)
            raise ShardUnavailable(shard) from None

    async def state(self, org_id: str) -> dict:
        """The org's state from its shard's memory: {"state": OrgState} or {"error": ...}."""
        return await self.states[self.shard_of(org_id)].call(org_id)

    async def command(self, org_id: str, command, request_hash: str | None = None) -> dict:
        return self._take_views(await self.commands[self.shard_of(org_id)].call((org_id, command, request_hash)))

    async def usage(self, ticks: list[Tick]) -> list[dict]:
        """Split ticks per shard, send the parts in parallel; one result per shard touched."""
        parts: dict[int, list[Tick]] = {}
        part_of: dict[str, list[Tick]] = {}  # org → its shard's part (a body's orgs are few, its ticks many)
        for tick in ticks:
            part = part_of.get(tick.org_id)
            if part is None:
                part = part_of[tick.org_id] = parts.setdefault(self.shard_of(tick.org_id), [])
            part.append(tick)

        async def send(shard: int, part: list[Tick]) -> dict:
            handle = await self.handle(shard)
            try:
                return self._take_views(await handle.usage.remote(TICKS_ENCODER.encode(part)))
            except RayError as exc:
                if isinstance(exc, RayActorError):
                    self.forget_version(shard)
                raise ShardUnavailable(shard) from None

        return list(await asyncio.gather(*(send(k, p) for k, p in parts.items())))
