"""A shard's residency (a mixin of ShardActor, actors/shard.py): which orgs it holds in memory.

Orgs load on first use (prefetched as work arrives, so the commit loop rarely waits), are
rebuilt from their snapshot and journal tail, counted into the shard's running totals, and
leave memory idle (passivation, after their journal tail was snapshotted) or all at once when
memory can no longer be trusted (a failed commit's orgs, a fence).
"""

from __future__ import annotations

import asyncio
import logging
import time

from actors.batch import LoadedOrg, UsageItem, leases_held
from actors.clock import now_us
from actors.formats import UnreadableOrg, encode_snapshot, load_org
from actors.org import OrgBillingActor
from actors.viewlog import ViewLog
from storage import journal as store

log = logging.getLogger("metergate.shard")

IDLE_SNAPSHOT_AFTER_S = 2
UNSNAPSHOTTABLE_RETRY_S = 60.0  # an org whose snapshot failed is tried again after this


class ShardResidency:
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

    def _forget(self, batch: list) -> None:
        for org_id in self._org_ids(batch):
            lo = self.orgs.pop(org_id, None)
            if lo is not None:
                self._count_out(lo)
        for item in batch:
            if isinstance(item, UsageItem):
                item.accepted = item.duplicates = 0
                item.rejected, item.keys = [], []

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

    async def _snapshot_dirty(self, only_idle: bool) -> dict:
        """Snapshot orgs with a journal tail and compact their journal behind it."""
        now_s = int(time.monotonic())
        dirty = [(org_id, lo) for org_id, lo in self.orgs.items()
                 if lo.tail and (not only_idle or now_s - lo.touched_s >= IDLE_SNAPSHOT_AFTER_S)]
        if not dirty:
            return {"snapshots": 0}
        batch, taken = store.CommitBatch(), []
        for org_id, lo in dirty[:5_000]:
            if self.unsnapshottable.get(org_id, 0.0) > time.monotonic() - UNSNAPSHOTTABLE_RETRY_S:
                continue
            try:
                state = encode_snapshot(lo.org.to_snapshot())
            except Exception:  # noqa: BLE001 - a bug one org reaches: its journal keeps it; the others go on
                self.unsnapshottable[org_id] = time.monotonic()
                log.exception("shard %s: org %s cannot be snapshotted (its journal keeps it)", self.shard, org_id)
                continue
            self.unsnapshottable.pop(org_id, None)
            batch.snapshots.append((org_id, lo.seq, state))
            batch.compact.append((org_id, lo.seq))
            taken.append(org_id)
        if not taken:
            return {"snapshots": 0}
        await self._fenced_transaction(lambda conn: store.write_batch(conn, batch))
        for org_id in taken:
            lo = self.orgs.get(org_id)
            if lo is not None:
                self._count_out(lo)
                lo.tail = 0
                self._count_in(lo)
        return {"snapshots": len(batch.snapshots)}

    def _passivate(self) -> None:
        cutoff = int(time.monotonic()) - self.settings.passivate_after_s
        idle = [org_id for org_id, lo in self.orgs.items()
                if lo.tail == 0 and lo.touched_s < cutoff and lo.org.pending_charge() is None]
        for org_id in idle:
            self._count_out(self.orgs.pop(org_id))
