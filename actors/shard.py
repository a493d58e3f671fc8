"""ShardActor: the imperative shell around many OrgBillingActors.

A Ray actor (async, named, detached, restartable) that owns the orgs whose slot maps to its
shard. Commands for all its orgs go through one commit loop, so each org has a single writer
and commands apply in arrival order. The loop cuts a batch whenever the previous commit has
returned (group commit): it loads missing orgs, dedupes tick ids in Postgres, applies the
batch in memory, writes journal, ledger, rollups and outbox in one transaction fenced by the
shard's epoch, and only then answers the callers. Gate checks are read-only and answer from
memory at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

from actors import commands as cmd
from actors.claim import OUTCOME_WAIT_S, Claim, CommitOutcomeUnknown  # noqa: F401 - OUTCOME_WAIT_S for tests
from actors.charger import Charger
from actors import clock
from actors.clock import now_us
from actors.metrics import ShardMetrics
from actors.batch import (
    UNAVAILABLE,
    UNSTORABLE,
    BatchWork,
    CommandItem,
    LoadedOrg,
    UsageItem,
    error,
    leases_held,
)
from actors.org import OrgBillingActor
from actors.formats import UnreadableOrg, load_org
from actors.refusals import Refusal
from actors.shard_charges import ShardCharges
from actors.shard_reads import ShardReads
from actors.shard_upkeep import ShardUpkeep
from actors.placement import slot_of
from actors.ticks import TICKS_DECODER, Tick
from actors.viewlog import ViewLog
from config.catalog import Catalog, load_catalog
from config.settings import Settings
from config.version import this_version
from storage import clock_offset, holds
from storage import journal as store
from storage.slots import Fenced
from storage.db import ITEM_FAILURES_IN_POSTGRES, create_pool, drop, is_outage, roll_back

log = logging.getLogger("metergate.shard")

MAX_PENDING_ITEMS = 100_000  # back-pressure: beyond this, callers get shard_busy
HOUSEKEEPING_EVERY_S = 1.0
MAX_VIEWS_IN_REPLY = 64  # a usage reply carries the views of at most this many orgs


# A batch whose failure is isolated costs at most this many commits; what is left then is
# answered shard_unavailable (retry), so a run of guilty items cannot stall the shard.
MAX_ISOLATION_COMMITS = 64


# A COMMIT is a WAL flush: milliseconds. One left unanswered this long counts as lost, as if its
# connection were cut (a silent network resets nothing, and asyncpg would wait its 60 s command
# timeout with the shard's every commit queued behind it). A false alarm costs a connection,
# never a wrong answer: Postgres is asked how the transaction ended.
COMMIT_WAIT_S = 5.0
OUTCOME_UNKNOWN = error(Refusal.OUTCOME_UNKNOWN,
                        "the billing database went away while this request was committing, and whether it "
                        "took effect cannot be known yet; retry it with the same Idempotency-Key, tick ids "
                        "or lease id, which make the retry safe")


def tick_key(org_id: str, tick_id: str) -> bytes:
    """128-bit key of a tick id within its org: what tick_ids stores for dedupe."""
    return hashlib.blake2b(f"{org_id}\x1f{tick_id}".encode(), digest_size=16).digest()


# Orgs are created through submit() like any command; the name stays importable from here.
CreateOrg = cmd.CreateOrg


class ShardActor(ShardReads, ShardCharges, ShardUpkeep):
    def __init__(self, shard: int, settings_json: str) -> None:
        logging.basicConfig(level=logging.INFO)
        self.shard = shard
        self.settings = Settings.model_validate_json(settings_json)
        self.catalog: Catalog = load_catalog(self.settings.catalog)
        self.orgs: dict[str, LoadedOrg] = {}
        self.loading: dict[str, asyncio.Future] = {}
        self.unreadable: dict[str, str] = {}  # org → why its stored rows could not be read (its last load)
        self.unsnapshottable: dict[str, float] = {}  # org → when its snapshot last failed (monotonic)
        self.generation = 0  # memory dropped whole (_forget_all) this many times
        self.unanswered: dict[str, asyncio.Future] = {}  # org → its last command applied, not yet answered
        self.pending: list = []
        self.recent_keys: dict[tuple[str, str], tuple[str, dict]] = {}
        self.claim = Claim(shard)
        self.slots: set[int] = set()
        self.pool = None
        self.wake: asyncio.Event | None = None
        self.started: asyncio.Task | None = None
        self.loop_task: asyncio.Task | None = None
        self.last_housekeeping = 0.0
        self.stats_commits = 0
        self.stats_commit_ms_total = 0.0
        self.stats_items = 0
        self.stats_phase_ms: dict[str, float] = {}
        self.stats_loop_errors = 0
        self.stats_parity_drift = 0
        self.stats_isolations = 0
        self.stats_loaded_in_commit = 0  # orgs the commit loop had to wait for (not prefetched)
        self.views = ViewLog(shard, self.settings.gate_views)
        # Running totals over the orgs in memory, for the metrics: kept as orgs load, commit,
        # snapshot and leave, so that no request and no report scans the orgs for them.
        self.metrics = ShardMetrics(shard)
        self.leases_held = 0
        self.tail_orgs = 0
        self.tail_entries = 0
        self.views_to_load: set[str] = set()  # passivated orgs whose published view expired
        self.committing: set[str] = set()  # orgs of the batch being committed (memory ahead of Postgres)
        self.charger: Charger | None = None
        self.charging: dict[tuple[str, str], asyncio.Task] = {}
        self.last_recharge_scan = 0.0

    # ----- life cycle -------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        if self.started is None or (self.started.done() and not self.started.cancelled()
                                    and self.started.exception() is not None):
            self.started = asyncio.ensure_future(self._start())  # first call, or a failed start again
        await asyncio.shield(self.started)

    @property
    def epoch(self) -> int:
        return self.claim.epoch

    def owns(self, org_id: str) -> bool:
        # Single writer per org: a command routed here by a stale slot map must not load or
        # write the org, since the shard that owns its slot may hold it too.
        return org_id in self.orgs or slot_of(org_id) in self.slots  # loaded orgs are ours

    async def _start(self) -> None:
        self.wake = asyncio.Event()
        self.pool = await create_pool(self.settings.database_url, min_size=2, max_size=4)
        async with self.pool.acquire() as conn:
            await self.claim.take(conn)
            self.slots = self.claim.slots
            self.views.start(self.epoch)
            if self.settings.test_clock:
                clock.set_offset_us(await clock_offset.offset_us(conn))
        self.charger = Charger(self.settings, self.pool)
        self.loop_task = asyncio.ensure_future(self._commit_loop())
        log.info("shard %s up: epoch %s, %s slots, pid %s", self.shard, self.epoch, len(self.slots), os.getpid())

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"shard": self.shard, "epoch": self.epoch, "slots": len(self.slots), "pid": os.getpid(),
                "version": this_version(self.settings)}

    async def drain(self) -> dict:
        """Wait for everything queued to commit, then snapshot every org with a journal tail."""
        await self._ensure_started()
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending.append(("snapshot_all", done))
        self.wake.set()
        return await done

    async def set_clock(self, offset_us: int) -> int:
        """The test clock moved (METERGATE_TEST_CLOCK=1 only): take the new offset."""
        await self._ensure_started()
        if self.settings.test_clock:
            clock.set_offset_us(offset_us)
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self.pending.append(("views_expired", done))
            self.wake.set()
            await done
        return clock.offset_us()

    async def stats(self) -> dict:
        await self._ensure_started()
        import psutil

        return {
            "shard": self.shard, "epoch": self.epoch, "pid": os.getpid(),
            "loaded_orgs": len(self.orgs), "pending": len(self.pending),
            "commits": self.stats_commits, "items": self.stats_items, "loop_errors": self.stats_loop_errors,
            "parity_drift": self.stats_parity_drift, "isolations": self.stats_isolations,
            "loaded_in_commit": self.stats_loaded_in_commit, "unreadable_orgs": len(self.unreadable),
            "claims": self.claim.claims, "commits_resolved": self.claim.resolved,
            "commit_ms_avg": self.stats_commit_ms_total / self.stats_commits if self.stats_commits else 0.0,
            "rss_bytes": psutil.Process().memory_info().rss,
            "commit_phase_ms_total": {k: round(v, 1) for k, v in self.stats_phase_ms.items()},
            # The metrics' running totals, and the same counted afresh over the orgs in memory.
            "totals": {"leases_held": self.leases_held, "tail_orgs": self.tail_orgs,
                       "tail_entries": self.tail_entries},
            "recounted": {"leases_held": sum(lo.leases for lo in self.orgs.values()),
                          "leases_in_orgs": sum(leases_held(lo.org) for lo in self.orgs.values()),
                          "tail_orgs": sum(1 for lo in self.orgs.values() if lo.tail),
                          "tail_entries": sum(lo.tail for lo in self.orgs.values())},
        }

    # ----- writes -----------------------------------------------------------------------

    async def submit(self, items: list[tuple[str, object, str | None]]) -> list[dict]:
        """Commands (org_id, command, request_hash); each answered after its commit."""
        await self._ensure_started()
        if len(self.pending) >= MAX_PENDING_ITEMS:
            return [error(Refusal.SHARD_BUSY, "shard is overloaded, retry") for _ in items]
        await self._prefetch([org_id for org_id, _, _ in items])
        loop = asyncio.get_running_loop()
        futures = []
        for org_id, command, request_hash in items:
            future = loop.create_future()
            self.pending.append(CommandItem(org_id, command, future, request_hash))
            futures.append(future)
        self.wake.set()
        return list(await asyncio.gather(*futures))

    async def usage(self, ticks_msgpack: bytes) -> dict:
        """A batch of validated ticks; answered after the commit that bills them."""
        await self._ensure_started()
        if len(self.pending) >= MAX_PENDING_ITEMS:
            return error(Refusal.SHARD_BUSY, "shard is overloaded, retry")
        ticks = TICKS_DECODER.decode(ticks_msgpack)
        await self._prefetch([tick.org_id for tick in ticks])
        future = asyncio.get_running_loop().create_future()
        self.pending.append(UsageItem(ticks, future))
        self.wake.set()
        return await future

    # ----- loading ----------------------------------------------------------------------

    async def _prefetch(self, org_ids: list[str]) -> None:
        """Load the orgs of arriving work before it is queued: the commit loop, which loads
        what is still missing when it cuts a batch, then rarely waits for a load (an org
        loads once, whoever asks). A failure is left to the commit, which answers it."""
        wanted = {org_id for org_id in org_ids if org_id not in self.orgs and self.owns(org_id)}
        if wanted:
            try:
                await self._ensure_loaded(wanted)
            except Exception:  # noqa: BLE001 - loaded again, and answered, by the commit
                pass

    async def _ensure_loaded(self, org_ids) -> None:
        wanted = [o for o in org_ids if o not in self.orgs]
        if not wanted:
            return
        waits = [self.loading[o] for o in wanted if o in self.loading]
        to_load = [o for o in wanted if o not in self.loading]
        if to_load:
            future = asyncio.get_running_loop().create_future()
            for org_id in to_load:
                self.loading[org_id] = future
            try:
                generation = self.generation
                async with self.pool.acquire() as conn:
                    rows = await store.load_orgs(conn, to_load)
                if self.generation != generation:  # memory was dropped meanwhile: what was read may be stale
                    raise ConnectionResetError("the shard dropped its memory during a load; load again")
                now_s = int(time.monotonic())
                now = now_us()
                for org_id, (seq, state, entries) in rows.items():
                    if org_id not in self.orgs:
                        try:
                            loaded = self._rebuild(org_id, seq, state, entries, now_s)
                        except UnreadableOrg as unreadable:  # this org alone: the others load
                            self.unreadable[org_id] = unreadable.reason
                            log.error("shard %s: org %s cannot be read: %s", self.shard, org_id, unreadable.reason)
                            continue
                        self.unreadable.pop(org_id, None)
                        self.orgs[org_id] = loaded
                        self._count_in(loaded)
                        self.views.publish(org_id, loaded.org, now)  # as Postgres holds it: committed
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # handed on by the raise below; other waiters, if any, get it too
                raise
            finally:
                for org_id in to_load:
                    self.loading.pop(org_id, None)
        for wait in waits:
            await wait

    def _replayed(self, org_id: str, state: bytes, entries: list[bytes]) -> OrgBillingActor:
        """An org from its snapshot and journal tail, as Postgres holds them (UnreadableOrg if
        they cannot be read)."""
        return load_org(org_id, state, entries, self.catalog)

    def _rebuild(self, org_id: str, seq: int, state: bytes, entries: list[bytes], now_s: int) -> LoadedOrg:
        org = self._replayed(org_id, state, entries)
        charge = org.pending_charge()
        if charge is not None:  # asked for before a restart or a passivation: see it through
            self._start_charges([charge])
        return LoadedOrg(org, seq + len(entries), len(entries), now_s)

    # ----- the commit loop --------------------------------------------------------------

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

    def _forget(self, batch: list) -> None:
        for org_id in self._org_ids(batch):
            lo = self.orgs.pop(org_id, None)
            if lo is not None:
                self._count_out(lo)
        for item in batch:
            if isinstance(item, UsageItem):
                item.accepted = item.duplicates = 0
                item.rejected, item.keys = [], []

    @staticmethod
    def _answer(batch: list, reply: dict) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_result(reply)

    def _count_in(self, lo: LoadedOrg) -> None:
        """Add an org's leases and journal tail to the shard's totals (it loaded or committed).

        Leases held, expired or not: the sweep ends an expired one within seconds, and a count
        that does not depend on the clock can be checked against the orgs (stats(), which
        tests/test_metrics.py compares). No assertion here: this runs after a commit, and a
        miscount must never fail a commit's answer."""
        lo.leases = leases_held(lo.org)
        self.leases_held += lo.leases
        self.tail_orgs += lo.tail > 0
        self.tail_entries += lo.tail

    def _count_out(self, lo: LoadedOrg) -> None:
        """Take out what _count_in added (the org leaves memory, or is about to be counted again)."""
        self.leases_held -= lo.leases
        self.tail_orgs -= lo.tail > 0
        self.tail_entries -= lo.tail

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

    async def _fenced_transaction(self, body):
        """`body(conn)` in one transaction fenced by the shard's claim, committed; returns what
        it returned. Raises if the transaction did not commit (then nothing of it did).

        A COMMIT whose answer is lost (its link failed, or the answer is overdue) may have
        committed. Guessing either way is wrong (a retry would bill twice, or an acknowledged
        change would be answered as failed), so Postgres is asked (Claim.landed). The answer
        may still come on this connection: it is dropped, so nothing reads it."""
        conn = await self.pool.acquire()
        backend_pid = conn.get_server_pid()
        xid = None  # the transaction's id
        committing = False  # set once the body is done: what fails after that is the COMMIT
        try:
            transaction = conn.transaction()
            await transaction.start()
            try:
                xid = await self.claim.fence(conn)
                result = await body(conn)
            except BaseException:
                await roll_back(conn, transaction)
                raise
            committing = True
            await asyncio.wait_for(transaction.commit(), COMMIT_WAIT_S)
        except Exception as exc:
            if not (committing and is_outage(exc)):
                raise  # failed before COMMIT was sent, or refused by Postgres: rolled back
            drop(conn)
            if not await self.claim.landed(self.pool, backend_pid, xid, exc):
                raise
            log.warning("shard %s: the answer to a COMMIT was lost (%r); Postgres says it committed",
                        self.shard, exc)
        finally:
            await self._release(conn)
        self.claim.committed()
        return result

    async def _after_fence(self, exc: Fenced) -> None:
        """The database's record of this shard's claim is not the one it holds.

        Superseded (another incarnation claimed the shard): this process stops; if it is the
        shard's live actor, Ray starts it again, and the new process claims afresh. Otherwise
        the database lacks commits memory reflects (a failover, a restore) or has others:
        memory is dropped whole, views start over (readers resync), and the shard claims
        again; orgs load from the database as they are used. Nothing memory held beyond the
        database is kept, or answered from."""
        if exc.superseded:
            log.error("shard %s: %s; this process stops", self.shard, exc)
            self._answer(self.pending, UNAVAILABLE)
            self.pending = []
            if _in_ray_actor():
                asyncio.get_running_loop().call_later(0.5, os._exit, 1)  # replies go out first
            else:  # a shard run in a test's own process: it stops committing
                self.loop_task.cancel()
            return
        if exc.landed_late:  # the database did not diverge: only memory may be behind it
            log.warning("shard %s: %s: dropping the %d orgs in memory", self.shard, exc, len(self.orgs))
            self._forget_all()
            return
        log.error("shard %s: %s: dropping the %d orgs in memory and claiming again", self.shard, exc, len(self.orgs))
        self._forget_all()
        async with self.pool.acquire() as conn:
            for name in holds.AFTER_A_RESTORE:
                await holds.hold(conn, name, f"shard {self.shard} found the database behind its memory: a "
                                 "failover or a restore? `metergate inbound reconcile --since` takes this off")
            await self.claim.take(conn)
        self.slots = self.claim.slots
        self.views.start(self.epoch)
        log.warning("shard %s: claimed again: epoch %s after %s commits", self.shard, self.epoch, self.claim.commit_no)

    def _forget_all(self) -> None:
        self.generation += 1  # a load that read before this must not put what it read back
        for lo in self.orgs.values():
            self._count_out(lo)
        self.orgs.clear()
        self.recent_keys.clear()
        self.views_to_load.clear()
        stale, self.views = self.views, ViewLog(self.shard, self.settings.gate_views)
        self.views.start(stale.epoch)  # behind every reader's position: each resyncs
        stale.poke()

    async def _release(self, conn) -> None:
        """Back to the pool. asyncpg re-raises a failure to reset the connection, which comes
        after the COMMIT: it must not make a committed batch look failed (and be retried)."""
        try:
            await self.pool.release(conn)
        except Exception as exc:  # noqa: BLE001 - the connection is dropped; the commit stands
            log.warning("shard %s: connection not reusable after a transaction: %r", self.shard, exc)

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
        for item in batch:
            if not isinstance(item, UsageItem):
                continue
            item.keys = []
            for tick in item.ticks:
                loaded = self.orgs.get(tick.org_id) if self.owns(tick.org_id) else None
                if loaded is None:
                    item.rejected.append({"index": tick.index, "tick_id": tick.tick_id, "org_id": tick.org_id,
                                          "error": Refusal.WRONG_SHARD if not self.owns(tick.org_id)
                                          else Refusal.ORG_UNREADABLE if tick.org_id in self.unreadable
                                          else Refusal.UNKNOWN_ORG})
                    item.keys.append(None)
                    continue
                key = tick_key(tick.org_id, tick.tick_id)
                item.keys.append(key)
                keys.setdefault(key, tick)
        return keys


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def by_index(rejection: dict) -> int:
    return rejection["index"]


def _all_rejected(ticks: list[Tick], code: Refusal) -> dict:
    return {"accepted": 0, "duplicates": 0, "rejected": [
        {"index": t.index, "tick_id": t.tick_id, "org_id": t.org_id, "error": code} for t in ticks]}
