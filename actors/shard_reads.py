"""A shard's reads (actors/shard.py): gate decisions and views from memory, the feed of views
that changed, state reads that wait for their org's commit, and the orgs loaded for a read."""

from __future__ import annotations

import asyncio
import time

import logging

import msgspec

from actors.batch import UNAVAILABLE, WRONG_SHARD, unknown_org
from actors.clock import now_us
from actors.formats import UnreadableOrg
from actors.org import OrgBillingActor, Resources
from storage import journal as store
from storage import orgs as orgs_store

log = logging.getLogger("metergate.shard")

STATE_WAIT_S = 10  # a state read waits at most this for the commit of its org's last command


class ShardReads:
    """ShardActor's reads: a mixin over its orgs, views and commit loop."""

    # ----- reads ------------------------------------------------------------------------

    async def gate(self, requests: list[tuple[str, str, Resources]]) -> list[dict]:
        """Read-only decisions, answered from memory (loading an org on first use)."""
        orgs = await self._readable([org_id for org_id, _, _ in requests])
        now = now_us()
        return [msgspec.to_builtins(org.gate(action, resources, now)) if isinstance(org, OrgBillingActor) else org
                for org, (_, action, resources) in zip(orgs, requests)]

    async def gate_views(self, org_ids: list[str]) -> list[dict]:
        """Each org's current gate view (the JSON of its ViewRecord): {"view": bytes} or the
        refusal. The ingress asks for the views it lacks, or has only expired, and decides
        from them."""
        orgs = await self._readable(org_ids)
        now = now_us()
        found = []
        for org_id, org in zip(org_ids, orgs):
            if isinstance(org, dict):
                found.append(org)
                continue
            known = self.views.records.get(org_id)
            if known is not None and (known[1].valid_until_us is None or known[1].valid_until_us > now):
                found.append({"view": known[2]})
            else:
                found.append({"view": self._view_now(org_id, org, now)})
        return found

    def _view_now(self, org_id: str, org: OrgBillingActor, now: int) -> bytes:
        """The org's view now, published if memory holds only committed state; else (a command
        of the org is being committed) a record with seq 0, for this answer only."""
        if org_id not in self.unanswered and org_id not in self.committing and self.views.publish(org_id, org, now):
            return self.views.line(org_id)
        return self.views.unpublished(org_id, org, now)

    async def changes(self, epoch: int | None, after: int, wait_s: float, prefix: str = "") -> dict:
        """The gate-view feed of this shard after (epoch, after), waiting up to wait_s for one.

        {"epoch", "seq" (read through), "views" (JSON records, oldest first), "more" (capped:
        ask again at once), "now_us", "waited_s", "resync"}. resync: the reader's epoch is gone (this shard restarted),
        its position is not one this shard gave, or it is behind a record the log dropped
        (ViewLog.evict); it must load the shard again. epoch
        None: no records, only the current position (a reader that starts from now)."""
        await self._ensure_started()
        started = time.monotonic()
        if epoch is None or epoch != self.epoch or after > self.views.seq or after < self.views.floor:
            return {"epoch": self.epoch, "seq": self.views.seq, "views": [], "now_us": now_us(), "waited_s": 0.0,
                    "resync": epoch is not None, "more": False, "floor": self.views.floor}
        if after == self.views.seq and wait_s > 0:
            await self.views.wait(wait_s)
            if after < self.views.floor:  # dropped while we waited: what was not read is gone
                return {"epoch": self.epoch, "seq": self.views.seq, "views": [], "now_us": now_us(),
                        "waited_s": time.monotonic() - started, "resync": True, "more": False,
                        "floor": self.views.floor}
        seq, lines, more = self.views.after(after, prefix)
        return {"epoch": self.epoch, "seq": seq, "views": lines, "now_us": now_us(),
                "waited_s": time.monotonic() - started, "resync": False, "more": more, "floor": self.views.floor}

    async def views_page(self, after: str | None, limit: int, prefix: str = "", as_of: tuple[int, int] | None = None) -> dict:
        """The gate views of this shard's orgs after org id `after`, in org id order: {"views":
        JSON records, "last": the last org id or None when there are no more}.

        Not in the commit loop, and nothing is loaded: an org's published record when the log
        holds one (published records are committed state); else, for an org in memory, its
        view published now if nothing of it is uncommitted (one that is will be published
        at its commit, after the reader's cursor); else its view as Postgres holds it, read
        and replayed aside, stamped with the snapshot's own position `as_of` (epoch, seq)
        when this shard is still in that epoch (seq 0 otherwise): it is at least as new as
        any record of the org up to that position (the org is not in memory: all it did is
        committed), and any record the shard publishes later has a higher seq and wins."""
        await self._ensure_started()
        async with self.pool.acquire() as conn:
            org_ids = await orgs_store.ids_in_slots(conn, sorted(self.slots), after, limit, prefix)
        lines: dict[str, bytes] = {}
        stored = []
        now = now_us()
        for org_id in org_ids:
            line = self.views.line(org_id)
            if line is None:
                lo = self.orgs.get(org_id)
                if lo is None:
                    stored.append(org_id)
                    continue
                if org_id not in self.unanswered and org_id not in self.committing and \
                        self.views.publish(org_id, lo.org, now):
                    line = self.views.line(org_id)
            if line is not None:
                lines[org_id] = line
        if stored:
            async with self.pool.acquire() as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    rows = await store.load_orgs(conn, stored)
            now = now_us()
            for org_id in stored:
                row = rows.get(org_id)
                line = self.views.line(org_id)  # published meanwhile (loaded): that one
                if line is None and row is not None:
                    seq = as_of[1] if as_of is not None and as_of[0] == self.epoch else 0
                    try:
                        line = self.views.unpublished(org_id, self._replayed(org_id, row[1], row[2]), now, seq)
                    except UnreadableOrg as unreadable:  # left out: its callers get org_unreadable
                        log.error("shard %s: org %s cannot be read: %s", self.shard, org_id, unreadable.reason)
                if line is not None:
                    lines[org_id] = line
        return {"views": [lines[o] for o in org_ids if o in lines], "last": org_ids[-1] if len(org_ids) == limit else None}

    async def _publish_expired(self) -> dict:
        """Publish again the views that time made stale (between commits: memory is committed)."""
        now = now_us()
        republished = 0
        for org_id in self.views.expired(now):
            lo = self.orgs.get(org_id)
            if lo is None:
                self.views_to_load.add(org_id)
            elif self.views.publish(org_id, lo.org, now):
                republished += 1
        if self.views_to_load:  # passivated orgs: loading one publishes its view
            wanted, self.views_to_load = list(self.views_to_load)[:5_000], set(list(self.views_to_load)[5_000:])
            await self._ensure_loaded(wanted)
        self.views.poke()
        return {"republished": republished}

    async def state(self, org_ids: list[str]) -> list[dict]:
        """Each org's state as of now, answered from memory like the gate: {"state": OrgState}.

        Unlike the gate it first waits for the commands applied to these orgs to be answered:
        a commit in flight may still fail, and a read must not show what it would lose.
        """
        deadline = time.monotonic() + STATE_WAIT_S
        while True:
            orgs = await self._readable(org_ids)
            waits = [f for f in map(self.unanswered.get, org_ids) if f is not None and not f.done()]
            if not waits:
                break
            if time.monotonic() >= deadline:
                return [UNAVAILABLE for _ in org_ids]
            await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()))
        now = now_us()
        return [{"state": org.state(now)} if isinstance(org, OrgBillingActor) else org for org in orgs]

    def _unanswered(self, org_id: str, future: asyncio.Future) -> None:
        """Reads of the org wait for `future`: its command is in memory, not yet committed."""
        self.unanswered[org_id] = future

        def answered(done: asyncio.Future) -> None:
            if self.unanswered.get(org_id) is done:
                del self.unanswered[org_id]

        future.add_done_callback(answered)

    async def _readable(self, org_ids: list[str]) -> list[OrgBillingActor | dict]:
        """Each org in memory (loaded on first use), or the refusal to read it."""
        await self._ensure_started()
        await self._ensure_loaded({org_id for org_id in org_ids if self.owns(org_id)})
        now_s = int(time.monotonic())
        found: list[OrgBillingActor | dict] = []
        for org_id in org_ids:
            loaded = self.orgs.get(org_id)
            if not self.owns(org_id):
                found.append(WRONG_SHARD)
            elif loaded is None:
                found.append(unknown_org(org_id, self.unreadable.get(org_id)))
            else:
                loaded.touched_s = now_s  # an org that is only read is in use too
                found.append(loaded.org)
        return found

    async def tasks(self) -> list[str]:
        """What each coroutine of this shard is waiting on (for operators chasing a stall)."""
        import io

        dumps = []
        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(limit=8, file=out)
            dumps.append(out.getvalue())
        return dumps

    async def loaded(self, org_ids: list[str]) -> list[bool]:
        """Which of these orgs are in memory now (for operators and tests)."""
        return [org_id in self.orgs for org_id in org_ids]
