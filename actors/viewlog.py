"""A shard's gate-view feed: the latest published view of each of its orgs, in publish order.

The shard publishes an org's view after each commit that touched it (and when it loads it),
only if the view or its validity changed. Each publication takes the next sequence number of
the shard and moves the org to the end of the log, so the log holds one record per org, ordered
by seq: "what changed after seq s" is a suffix of it, and a reader that comes back after any
time gets the latest view of every org that changed, never a gap. A restart of the shard
starts a new epoch and an empty log: readers with an older epoch are told to resync.
"""

from __future__ import annotations

import asyncio
import heapq

from actors.org import OrgBillingActor
from metergate_client.projection import RECORD_ENCODER, PublishedRecord, ViewRecord

MAX_RECORDS_PER_ANSWER = 5_000


class ViewLog:
    def __init__(self, shard: int, enabled: bool = True) -> None:
        self.shard = shard
        self.enabled = enabled  # off: nothing is published (settings.gate_views)
        self.epoch = 0
        self.seq = 0
        self.floor = 0  # the highest seq of a dropped record: a reader behind it must resync
        # org → (seq, record, its JSON); insertion order is seq order.
        self.records: dict[str, tuple[int, ViewRecord, bytes]] = {}
        # When to look at an org's view again: (time, org_id) in a heap, and each org's time in
        # `scheduled`. A view whose validity moves later (a tick renews a lease) keeps its
        # entry, which is moved on when it comes up: one entry per org, not one per publish.
        self.expiring: list[tuple[int, str]] = []
        self.scheduled: dict[str, int] = {}
        self.waiters: set[asyncio.Future] = set()  # readers waiting for the next publication

    def start(self, epoch: int) -> None:
        self.epoch = epoch

    def publish(self, org_id: str, org: OrgBillingActor, now_us: int, published_us: int | None = None) -> bool:
        """Record the org's view as of now_us (committed state only); True if it changed.
        published_us: the shard's time now, after the commit (default now_us)."""
        if not self.enabled:
            return False
        view, until = org.view_as_of(now_us)
        known = self.records.get(org_id)
        if known is not None and known[1].view == view and known[1].valid_until_us == until:
            return False
        self.seq += 1
        record = PublishedRecord(org_id, self.shard, self.epoch, self.seq, until, view,
                                 now_us if published_us is None else published_us)
        if known is not None:
            del self.records[org_id]  # to the end: the log stays in seq order
        self.records[org_id] = (self.seq, record, RECORD_ENCODER.encode(record))
        if until is not None:
            self._schedule(org_id, until)
        self.poke()
        return True

    def unpublished(self, org_id: str, org: OrgBillingActor, now_us: int, seq: int = 0) -> bytes:
        """The org's view now as a record of this `seq` (0: for one answer only, since memory
        may hold a command that is not committed yet), never in the log."""
        view, until = org.view_as_of(now_us)
        return RECORD_ENCODER.encode(PublishedRecord(org_id, self.shard, self.epoch, seq, until, view, now_us))

    def poke(self) -> None:
        """Wake the readers waiting for a change (they answer with the shard's clock, which moved)."""
        waiters, self.waiters = self.waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def line(self, org_id: str) -> bytes | None:
        known = self.records.get(org_id)
        return known[2] if known is not None else None

    def _schedule(self, org_id: str, at_us: int) -> None:
        scheduled = self.scheduled.get(org_id)
        if scheduled is None or at_us < scheduled:
            self.scheduled[org_id] = at_us
            heapq.heappush(self.expiring, (at_us, org_id))

    def expired(self, now_us: int) -> list[str]:
        """Orgs whose published view no longer holds by time: to publish again."""
        due = []
        while self.expiring and self.expiring[0][0] <= now_us:
            at, org_id = heapq.heappop(self.expiring)
            if self.scheduled.get(org_id) != at:
                continue  # superseded by an earlier time
            del self.scheduled[org_id]
            known = self.records.get(org_id)
            until = known[1].valid_until_us if known is not None else None
            if until is not None and until <= now_us:
                due.append(org_id)
            elif until is not None:
                self._schedule(org_id, until)  # it moved later since: look again then
        return due

    def evict(self, keep: int, loaded) -> int:
        """Drop the oldest records of orgs not in `loaded` until at most `keep` of those are
        left; returns how many were dropped. The log stays a suffix of every reader's news
        only for readers at or past `floor`: the others are told to load the shard again."""
        if len(self.records) <= keep:
            return 0
        excess = sum(1 for org_id in self.records if org_id not in loaded) - keep
        if excess <= 0:
            return 0
        dropped = []
        for org_id, (seq, _, _) in self.records.items():  # oldest first
            if org_id not in loaded:
                dropped.append(org_id)
                self.floor = max(self.floor, seq)
                if len(dropped) == excess:
                    break
        for org_id in dropped:
            del self.records[org_id]
            self.scheduled.pop(org_id, None)  # its heap entry is skipped when it comes up
        return len(dropped)

    def after(self, seq: int, prefix: str = "") -> tuple[int, list[bytes], bool]:
        """(the seq read through, the records published after `seq` of the orgs whose id
        begins with `prefix`, oldest first, at most MAX_RECORDS_PER_ANSWER of them, whether
        more were left out)."""
        newer = []
        for org_id, (known_seq, _, line) in reversed(self.records.items()):
            if known_seq <= seq:
                break
            if org_id.startswith(prefix):
                newer.append((known_seq, line))
        newer.reverse()
        more = len(newer) > MAX_RECORDS_PER_ANSWER
        newer = newer[:MAX_RECORDS_PER_ANSWER]
        return (newer[-1][0] if more else max(seq, self.seq)), [line for _, line in newer], more

    async def wait(self, timeout_s: float) -> None:
        """Until the next publication, at most timeout_s. A plain future, woken in one turn of
        the loop (a commit that publishes lets its readers run before its next batch)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.add(waiter)
        timer = loop.call_later(timeout_s, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiters.discard(waiter)  # (a quiet shard's readers must not pile up here)
