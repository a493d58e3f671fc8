"""A shard's group commit (a mixin of ShardActor, actors/shard.py).

One loop takes what callers queued: it cuts a batch whenever the previous commit has returned,
loads the orgs the batch needs, dedupes tick ids in Postgres, applies the batch in memory,
writes journal, ledger, rollups and outbox in one fenced transaction (actors/shard_fence.py),
publishes the views it changed, and only then answers the callers. An item that makes the
commit fail is isolated by halving the batch, so one request never fails another.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from actors import commands as cmd
from actors.batch import UNAVAILABLE, UNSTORABLE, BatchWork, CommandItem, UsageItem, error
from actors.claim import CommitOutcomeUnknown
from actors.clock import now_us
from actors.refusals import Refusal
from actors.ticks import Tick
from storage import journal as store
from storage.db import ITEM_FAILURES_IN_POSTGRES, is_outage
from storage.slots import Fenced

log = logging.getLogger("metergate.shard")

HOUSEKEEPING_EVERY_S = 1.0
MAX_VIEWS_IN_REPLY = 64  # a usage reply carries the views of at most this many orgs
# A batch whose failure is isolated costs at most this many commits; what is left then is
# answered shard_unavailable (retry), so a run of guilty items cannot stall the shard.
MAX_ISOLATION_COMMITS = 64
OUTCOME_UNKNOWN = error(Refusal.OUTCOME_UNKNOWN,
                        "the billing database went away while this request was committing, and whether it "
                        "took effect cannot be known yet; retry it with the same Idempotency-Key, tick ids "
                        "or lease id, which make the retry safe")


def tick_key(org_id: str, tick_id: str) -> bytes:
    """128-bit key of a tick id within its org: what tick_ids stores for dedupe."""
    return hashlib.blake2b(f"{org_id}\x1f{tick_id}".encode(), digest_size=16).digest()


def by_index(rejection: dict) -> int:
    return rejection["index"]


def _all_rejected(ticks: list[Tick], code: Refusal) -> dict:
    return {"accepted": 0, "duplicates": 0, "rejected": [
        {"index": t.index, "tick_id": t.tick_id, "org_id": t.org_id, "error": code} for t in ticks]}


class ShardCommit:
    async def _commit_loop(self) -> None:
        while True:
            try:
                await self._commit_step()
            except Exception:  # noqa: BLE001 - a bug; the loop must go on or the shard stops committing
                self.stats_loop_errors += 1
                log.exception("shard %s: commit loop error", self.shard)
                await asyncio.sleep(0.1)

    async def _commit_step(self) -> None:
        """One turn of the commit loop: housekeeping, or one group commit."""
        if not self.pending:
            self.wake.clear()
            wait_s = HOUSEKEEPING_EVERY_S
            if self.views.expiring:  # a view that time ends is published again at once
                wait_s = min(wait_s, max(0.0, (self.views.expiring[0][0] - now_us()) / 1e6))
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=wait_s)
            except asyncio.TimeoutError:
                pass
        if self.views.expiring and self.views.expiring[0][0] <= now_us():
            await self._publish_expired()
        if not self.pending:  # woken by time (its interval, or a view that time ends)
            if time.monotonic() - self.last_housekeeping >= HOUSEKEEPING_EVERY_S:
                await self._housekeeping_safely()
            return
        if time.monotonic() - self.last_housekeeping > HOUSEKEEPING_EVERY_S * 5:
            await self._housekeeping_safely()
            return
        batch, self.pending = self._cut_batch()
        if isinstance(batch[0], tuple):
            await self._run_marker(batch[0])
            return
        # Memory holds this batch's commands before their commit: no read may publish it. (A
        # caller's future cannot say so: a cancelled one is done before the commit is.)
        self.committing = self._org_ids(batch)
        try:
            try:
                await self._commit_isolating(batch, [MAX_ISOLATION_COMMITS])
            finally:
                self.committing = set()
            # The feed readers this commit woke (its views) go before the next batch's work.
            await asyncio.sleep(0)
        except Exception:  # a bug after or around a commit: no caller may be left waiting
            log.exception("shard %s: a batch of %d items failed outside its commit", self.shard, len(batch))
            self._forget(batch)
            self._answer(batch, error(Refusal.INTERNAL_ERROR, "internal error; it has been logged"))
            raise

    def _cut_batch(self) -> tuple[list, list]:
        budget = self.settings.commit_max_commands
        for i, item in enumerate(self.pending):
            if isinstance(item, tuple):  # a drain marker runs alone, after what came before it
                if i == 0:
                    return [item], self.pending[1:]
                return self.pending[:i], self.pending[i:]
            budget -= len(item.ticks) if isinstance(item, UsageItem) else 1
            if budget <= 0:
                return self.pending[: i + 1], self.pending[i + 1:]
        return self.pending, []

    async def _run_marker(self, marker: tuple) -> None:
        kind, done = marker[0], marker[1]
        try:
            if kind == "parity":
                result = await self._parity_now(marker[2])
            elif kind == "views_expired":
                result = await self._publish_expired()
            else:  # a drain: every org with a journal tail, not one round of them
                result, step = {"snapshots": 0}, {"snapshots": 1}
                while step["snapshots"]:
                    step = await self._snapshot_dirty(only_idle=False)
                    result["snapshots"] += step["snapshots"]
        except Exception as exc:  # noqa: BLE001 - handed to the caller that waits on it
            log.exception("shard %s: %s failed", self.shard, kind)
            if not done.done():
                done.set_exception(exc)
            if isinstance(exc, Fenced):
                await self._after_fence(exc)
            return
        if not done.done():
            done.set_result(result)

    async def _commit_isolating(self, batch: list, budget: list[int]) -> None:
        """Commit a batch; if one of its items makes the commit fail, commit all the others.

        One request must never fail another. A failure that an item can cause (a value
        Postgres refuses, a bug hit by one input) splits the batch in halves, each committed
        on its own, down to the guilty items, which are refused alone; a single usage item is
        split by ticks the same way. A failure of the database itself (connection lost, epoch
        fenced) fails the whole batch as shard_unavailable: nothing of it was acknowledged, a retry
        is safe. Either way memory forgets the orgs the failed attempt touched, since it may
        hold effects that never committed; they reload from Postgres on next use. `budget`
        (shared by the whole split) bounds the commits one isolation may cost.
        """
        started = time.perf_counter()
        budget[0] -= 1
        try:
            committed = await self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - sorted below: outage or a guilty item
            self._forget(batch)
            if isinstance(exc, Fenced):
                self._answer(batch, UNAVAILABLE)
                await self._after_fence(exc)
                return
            if isinstance(exc, CommitOutcomeUnknown):
                log.error("shard %s: commit of %d items: outcome unknown (%s)", self.shard, len(batch), exc)
                self._answer(batch, OUTCOME_UNKNOWN)
                return
            if is_outage(exc) or budget[0] <= 0:
                log.warning("shard %s: commit of %d items failed (%s): %r", self.shard, len(batch),
                            "database unavailable" if is_outage(exc) else "isolation budget spent", exc)
                self._answer(batch, UNAVAILABLE)
                return
            failure = exc
        else:
            self._acknowledge(batch, *committed)
            commit_ms = (time.perf_counter() - started) * 1000
            self.stats_commit_ms_total += commit_ms
            self._count_commit(batch, commit_ms)
            return
        if len(batch) > 1:
            self.stats_isolations += 1
            middle = len(batch) // 2
            await self._commit_isolating(batch[:middle], budget)
            await self._commit_isolating(batch[middle:], budget)
        elif isinstance(batch[0], UsageItem) and len(batch[0].ticks) > 1:
            await self._commit_usage_in_halves(batch[0], budget)
        else:
            self._refuse(batch[0], failure)

    async def _commit_usage_in_halves(self, item: UsageItem, budget: list[int]) -> None:
        """One usage request split by ticks. If one half committed and the other could not
        (an outage), the answer says so tick by tick: the committed ticks are counted, the
        others rejected as shard_unavailable, to be sent again (duplicates are recognised)."""
        loop = asyncio.get_running_loop()
        middle = len(item.ticks) // 2
        halves = [UsageItem(item.ticks[:middle], loop.create_future()),
                  UsageItem(item.ticks[middle:], loop.create_future())]
        for half in halves:
            await self._commit_isolating([half], budget)
        answers = [half.future.result() for half in halves]
        if all("error" in answer for answer in answers):
            result = answers[0]  # nothing committed: the request fails as a whole
        else:
            answers = [_all_rejected(half.ticks, answer["error"]["code"]) if "error" in answer else answer
                       for half, answer in zip(halves, answers)]
            result = {"accepted": sum(a["accepted"] for a in answers),
                      "duplicates": sum(a["duplicates"] for a in answers),
                      "rejected": [r for a in answers for r in a["rejected"]]}
        if not item.future.done():
            item.future.set_result(result)

    def _refuse(self, item, exc: Exception) -> None:
        """The one item whose commit fails on its own: it gets an answer of its own."""
        if isinstance(exc, ITEM_FAILURES_IN_POSTGRES):
            log.warning("shard %s: refused an item Postgres cannot store: %r", self.shard, exc)
            reply = UNSTORABLE
        else:  # a bug that one input reaches: logged whole, the caller is told nothing internal
            log.error("shard %s: an item failed its commit on its own", self.shard, exc_info=exc)
            reply = error(Refusal.INTERNAL_ERROR, "internal error; it has been logged")
        if isinstance(item, UsageItem):
            reply = _all_rejected(item.ticks, reply["error"]["code"])
        if not item.future.done():
            item.future.set_result(reply)

    @staticmethod
    def _answer(batch: list, reply: dict) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_result(reply)

    def _count_commit(self, batch: list, commit_ms: float) -> None:
        ticks = accepted = duplicates = rejected = 0
        for item in batch:
            if isinstance(item, UsageItem):
                ticks += len(item.ticks)
                accepted += item.accepted
                duplicates += item.duplicates
                rejected += len(item.rejected)
        self.metrics.commit(len(batch), ticks, commit_ms, accepted, duplicates, rejected)

    def _phase_clock(self):
        """Accumulates time per commit phase, for stats()."""
        last = [time.perf_counter()]

        def mark(name: str) -> None:
            now = time.perf_counter()
            self.stats_phase_ms[name] = self.stats_phase_ms.get(name, 0.0) + (now - last[0]) * 1000
            last[0] = now

        return mark

    def _org_ids(self, batch: list) -> set[str]:
        """The orgs of this shard that a batch touches."""
        ids: set[str] = set()
        for item in batch:
            if isinstance(item, CommandItem):
                ids.add(item.org_id)
            elif isinstance(item, UsageItem):
                ids.update(t.org_id for t in item.ticks)
        return {org_id for org_id in ids if self.owns(org_id)}

    async def _commit(self, batch: list) -> tuple["BatchWork", dict[int, dict], list[int]]:
        """One group commit: (the batch's work, command results by position, outbox ids).

        Raises if the transaction failed; nothing of the batch is then committed."""
        org_ids = self._org_ids(batch)
        missing = [org_id for org_id in org_ids if org_id not in self.orgs]
        await self._ensure_loaded(missing)
        self.stats_loaded_in_commit += sum(org_id in self.orgs for org_id in missing)  # prefetch missed them
        now = now_us()
        tick_keys = self._candidate_ticks(batch)
        key_pairs = [(i.org_id, i.command.idempotency_key) for i in batch
                     if isinstance(i, CommandItem) and isinstance(i.command, cmd.KEYED)
                     and i.command.idempotency_key
                     and (i.org_id, i.command.idempotency_key) not in self.recent_keys]
        results: dict[int, dict] = {}
        phase = self._phase_clock()

        async def body(conn) -> tuple[BatchWork, list[int]]:
            seen_before = await store.claim_tick_ids(conn, list(tick_keys), now)
            keyed = await store.keyed_entries(conn, key_pairs)
            phase("dedupe")
            work = BatchWork(self, now)
            for index, item in enumerate(batch):
                if isinstance(item, UsageItem):
                    work.apply_usage(item, tick_keys, seen_before)
                else:
                    results[index] = work.apply_command(item, keyed)
            out = work.finish()
            phase("apply")
            event_ids = await store.write_batch(conn, out)
            phase("write")
            return work, event_ids

        work, event_ids = await self._fenced_transaction(body)
        phase("commit")
        return work, results, event_ids

    def _acknowledge(self, batch: list, work: "BatchWork", results: dict[int, dict], event_ids: list[int]) -> None:
        """After the commit: memory moves on, charges start, callers get their answers."""
        work.after_commit(event_ids)
        # Published before anyone is answered: a feed reader hears of a change no later than
        # the caller who made it.
        views = self.views
        published = now_us()
        for org_id in work.new_positions:
            lo = self.orgs.get(org_id)
            if lo is not None:
                views.publish(org_id, lo.org, work.now, published)
        if work.fx.charges:
            self._start_charges(work.fx.charges)
        if work.fx.events:
            self.metrics.runway_low(work.fx.events)
        for index, item in enumerate(batch):
            if item.future.done():
                continue  # the caller went away (its request was cancelled); the work is committed
            if isinstance(item, UsageItem):
                touched = {t.org_id for t, key in zip(item.ticks, item.keys) if key is not None}
                # The views a small request changed ride along (its sender's next gate check
                # sees them at once); a big batch's come by the feed, within milliseconds.
                lines = ([line for line in map(views.line, touched) if line is not None]
                         if len(touched) <= MAX_VIEWS_IN_REPLY else [])
                item.future.set_result({"accepted": item.accepted, "duplicates": item.duplicates,
                                        "rejected": sorted(item.rejected, key=by_index), "views": lines})
            else:
                result = results[index]
                line = views.line(item.org_id) if "error" not in result else None
                item.future.set_result({**result, "view": line} if line is not None else result)
        self.stats_commits += 1
        self.stats_items += len(batch)

    def _candidate_ticks(self, batch: list) -> dict[bytes, Tick]:
        """Ticks that may be billed: known org, first in this batch (units are checked when the
        tick is applied, on the plan the org is on then).

        Marks each usage item's ticks with their key (or None when rejected) for apply_usage.
        """
        keys: dict[bytes, Tick] = {}
        # Per org, once per batch (its ticks are many, its orgs few): the refusal of its ticks,
        # or the prefix of their keys (tick_key's, hashed on from a copy).
        orgs: dict[str, Refusal | object] = {}
        for item in batch:
            if not isinstance(item, UsageItem):
                continue
            item.keys = keys_of_item = []
            for tick in item.ticks:
                org_id = tick.org_id
                known = orgs.get(org_id)
                if known is None:
                    known = orgs[org_id] = self._tick_key_prefix(org_id)
                if known.__class__ is Refusal:
                    item.rejected.append({"index": tick.index, "tick_id": tick.tick_id, "org_id": org_id,
                                          "error": known})
                    keys_of_item.append(None)
                    continue
                hashed = known.copy()
                hashed.update(tick.tick_id.encode())
                key = hashed.digest()
                keys_of_item.append(key)
                keys.setdefault(key, tick)
        return keys

    def _tick_key_prefix(self, org_id: str):
        """A blake2b fed with what tick_key puts before the tick id, or the refusal of the
        org's ticks (not this shard's, unreadable, unknown)."""
        if not self.owns(org_id):
            return Refusal.WRONG_SHARD
        if self.orgs.get(org_id) is None:
            return Refusal.ORG_UNREADABLE if org_id in self.unreadable else Refusal.UNKNOWN_ORG
        return hashlib.blake2b(f"{org_id}\x1f".encode(), digest_size=16)
