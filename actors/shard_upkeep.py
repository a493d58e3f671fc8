"""A shard's upkeep between commits (a mixin of ShardActor, actors/shard.py): parity of memory
against the journal, and housekeeping (the claim's check, idle snapshots and passivation,
actors/shard_residency.py, the views' eviction, metrics, stuck charges)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from actors.batch import error
from actors.formats import UnreadableOrg
from actors.org import OrgBillingActor
from actors.refusals import Refusal
from storage import journal as store
from storage.slots import Fenced

log = logging.getLogger("metergate.shard")

RECHARGE_SCAN_EVERY_S = 30.0
PARITY_CHUNK = 500  # orgs checked per pause of the commit loop
REPLAY_ATTEMPTS = 3  # a replay whose org left memory before its check is tried this often


class ShardUpkeep:
    async def parity(self, sample: int | None = None) -> dict:
        """Rebuild the loaded orgs from Postgres and compare them with memory: every one, or
        `sample` of them chosen at random (the scheduler's periodic run; see
        METERGATE_PARITY_SAMPLE_ORGS). `loaded`: how many were in memory.

        Each chunk of orgs is checked between two commits (memory then equals what is
        committed), and commits go on between chunks.
        """
        await self._ensure_started()
        org_ids = list(self.orgs)
        loaded = len(org_ids)
        if sample and loaded > sample:
            org_ids = random.sample(org_ids, sample)
        checked, drift = 0, []
        for start in range(0, len(org_ids), PARITY_CHUNK):
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self.pending.append(("parity", done, org_ids[start:start + PARITY_CHUNK]))
            self.wake.set()
            part = await done
            checked += part["checked"]
            drift += part["drift"]
        self.stats_parity_drift = len(drift)
        return {"shard": self.shard, "checked": checked, "drift": drift, "loaded": loaded}

    async def replay(self, org_id: str) -> dict:
        """Parity for one org (`metergate replay`): load it if it is not in memory, rebuild it
        from its snapshot and journal between two commits, and compare. A passivation in
        between leaves it unchecked, so it is loaded and tried again."""
        for _ in range(REPLAY_ATTEMPTS):
            [org] = await self._readable([org_id])
            if not isinstance(org, OrgBillingActor):
                return org  # unknown org, or not this shard's
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self.pending.append(("parity", done, [org_id]))
            self.wake.set()
            part = await done
            if part["checked"]:
                return {"shard": self.shard, "org_id": org_id, "match": not part["drift"]}
        return error(Refusal.SHARD_BUSY, f"org {org_id} left memory before it could be checked; retry")

    async def _parity_now(self, org_ids: list[str]) -> dict:
        checked, drift = 0, []
        async with self.pool.acquire() as conn:
            rows = await store.load_orgs(conn, [o for o in org_ids if o in self.orgs])
        for org_id, (seq, state, entries) in rows.items():
            lo = self.orgs.get(org_id)
            if lo is None or lo.seq != seq + len(entries):
                continue  # passivated or moved on meanwhile: next time
            checked += 1
            try:
                stored = self._replayed(org_id, state, entries).to_snapshot()
            except UnreadableOrg as unreadable:  # memory has it, Postgres cannot give it back
                log.error("parity: org %s on shard %s: %s", org_id, self.shard, unreadable.reason)
                stored = None
            if stored != lo.org.to_snapshot():
                drift.append(org_id)
                log.error("parity: org %s on shard %s differs from its journal", org_id, self.shard)
        return {"checked": checked, "drift": drift}

    async def _housekeeping_safely(self) -> None:
        self.last_housekeeping = time.monotonic()
        try:
            async with self.pool.acquire() as conn:  # no commit for a while: is the database still ours?
                await self.claim.check(conn)
            await self._snapshot_dirty(only_idle=True)
            self._passivate()
            self.views.evict(self.settings.view_log_max_records, self.orgs)
            self.metrics.memory(len(self.orgs), self.leases_held, self.tail_orgs, self.tail_entries,
                                self.views.seq)
            if time.monotonic() - self.last_recharge_scan > RECHARGE_SCAN_EVERY_S:
                self.last_recharge_scan = time.monotonic()
                self._retry_stuck_charges()
        except Fenced as exc:
            await self._after_fence(exc)
        except Exception:
            log.exception("shard %s: housekeeping failed (will retry)", self.shard)
