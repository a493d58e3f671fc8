"""ShardActor: the imperative shell around many OrgBillingActors.

A Ray actor (async, named, detached, restartable) that owns the orgs whose slot maps to its
shard. Commands for all its orgs go through one commit loop, so each org has a single writer
and commands apply in arrival order. The loop cuts a batch whenever the previous commit has
returned (group commit): it loads missing orgs, dedupes tick ids in Postgres, applies the
batch in memory, writes journal, ledger, rollups and outbox in one transaction fenced by the
shard's epoch, and only then answers the callers. Gate checks are read-only and answer from
memory at once.

This module is the actor's shell: its state, life cycle and the calls callers make. The work
is in its parts, each a mixin with one job: the group commit (shard_commit), fenced
transactions and lost COMMITs (shard_fence), which orgs are in memory (shard_residency),
reads (shard_reads), charges (shard_charges), parity and housekeeping (shard_upkeep).
"""

from __future__ import annotations

import asyncio
import logging
import os

from actors import clock
from actors import commands as cmd
from actors.batch import CommandItem, LoadedOrg, UsageItem, error, leases_held
from actors.charger import Charger
from actors.claim import Claim
from actors.metrics import ShardMetrics
from actors.placement import slot_of
from actors.refusals import Refusal
from actors.shard_charges import ShardCharges
from actors.shard_commit import ShardCommit
from actors.shard_fence import ShardFence
from actors.shard_reads import ShardReads
from actors.shard_residency import ShardResidency
from actors.shard_upkeep import ShardUpkeep
from actors.ticks import TICKS_DECODER
from actors.viewlog import ViewLog
from config.catalog import Catalog, load_catalog
from config.settings import Settings
from config.version import this_version
from storage import clock_offset
from storage.db import create_pool

log = logging.getLogger("metergate.shard")

MAX_PENDING_ITEMS = 100_000  # back-pressure: beyond this, callers get shard_busy


# Orgs are created through submit() like any command; the name stays importable from here.
CreateOrg = cmd.CreateOrg


class ShardActor(ShardCommit, ShardFence, ShardResidency, ShardReads, ShardCharges, ShardUpkeep):
    """The Ray actor: its state, its life cycle and what callers call; the work is in the mixins."""

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
