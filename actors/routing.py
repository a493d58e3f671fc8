"""Routing by org to cached shard handles, with per-shard call batching (used by the ingress
and by the scheduler).

One Ray call per request would cost a hop per request; instead each shard gets a batcher that
sends whatever queued up while its previous call was in flight, so under load many gate
checks or commands share one hop, and at low load a call goes out at once.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import ray
from ray.exceptions import RayError

from actors.placement import NAMESPACE, cached_slot_of, shard_name
from actors.refusals import Refusal
from actors.ticks import TICKS_ENCODER, Tick

MAX_BATCH = 4096


class ShardUnavailable(Exception):
    """A shard actor could not be reached (restarting, or its node gone): retry the request."""

    def __init__(self, shard: int) -> None:
        super().__init__(f"billing shard {shard} is unavailable; retry the request")
        self.shard = shard


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


class ShardRouter:
    def __init__(self, slot_to_shard: list[int]) -> None:
        self.slot_to_shard = slot_to_shard
        shard_count = max(slot_to_shard) + 1
        self.handles = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(shard_count)]
        self.gates = [Batcher(k, h.gate.remote) for k, h in enumerate(self.handles)]
        self.commands = [Batcher(k, h.submit.remote) for k, h in enumerate(self.handles)]
        self.states = [Batcher(k, h.state.remote) for k, h in enumerate(self.handles)]

    def shard_of(self, org_id: str) -> int:
        return self.slot_to_shard[cached_slot_of(org_id)]

    async def gate(self, org_id: str, action: str, resources) -> dict:
        return await self.gates[self.shard_of(org_id)].call((org_id, action, resources))

    async def gate_many(self, checks: list[tuple[str, str, object]]) -> list[dict]:
        """Many (org_id, action, resources) checks: one call per shard, answers in order. The
        checks of a shard that cannot be reached answer shard_unavailable; the others decide."""
        parts: dict[int, list[int]] = {}
        for index, (org_id, _, _) in enumerate(checks):
            parts.setdefault(self.shard_of(org_id), []).append(index)

        async def ask(shard: int, indexes: list[int]) -> list[dict]:
            try:
                return await self.handles[shard].gate.remote([checks[i] for i in indexes])
            except RayError:
                unavailable = {"error": {"code": Refusal.SHARD_UNAVAILABLE,
                                         "message": f"billing shard {shard} is unavailable; retry the check"}}
                return [unavailable] * len(indexes)

        answers: list[dict] = [{}] * len(checks)
        shards = list(parts)
        for shard, results in zip(shards, await asyncio.gather(*(ask(k, parts[k]) for k in shards))):
            assert len(results) == len(parts[shard]), (len(results), len(parts[shard]))
            for index, result in zip(parts[shard], results):
                answers[index] = result
        return answers

    async def state(self, org_id: str) -> dict:
        """The org's state from its shard's memory: {"state": OrgState} or {"error": ...}."""
        return await self.states[self.shard_of(org_id)].call(org_id)

    async def command(self, org_id: str, command, request_hash: str | None = None) -> dict:
        return await self.commands[self.shard_of(org_id)].call((org_id, command, request_hash))

    async def usage(self, ticks: list[Tick]) -> list[dict]:
        """Split ticks per shard, send the parts in parallel; one result per shard touched."""
        parts: dict[int, list[Tick]] = {}
        for tick in ticks:
            parts.setdefault(self.shard_of(tick.org_id), []).append(tick)

        async def send(shard: int, part: list[Tick]) -> dict:
            try:
                return await self.handles[shard].usage.remote(TICKS_ENCODER.encode(part))
            except RayError:
                raise ShardUnavailable(shard) from None

        return list(await asyncio.gather(*(send(k, p) for k, p in parts.items())))
