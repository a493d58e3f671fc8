"""A shard's claim on its slots, as Postgres records it: the epoch and the count of commits.

Every commit of the shard advances the count in the statement that fences it (storage.slots
`fence`), so the row is both the fence and the durable record of the shard's commits:

- A commit whose COMMIT lost its answer is decided by the count (one more: it landed; the same:
  it did not), once no server process holds its transaction open. Transaction ids are not
  trusted for this when the epoch still matches: a promoted standby may reuse them.
- A database that does not hold the count this shard's memory reached (a failover to a standby
  that lacks the last commits, a point-in-time restore) fences the next commit, and the shard's
  periodic check finds it when no commit comes: the shard drops its memory and claims anew.
- A later epoch means another incarnation claimed the shard: this one stops.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from storage.db import drop, is_outage
from storage.slots import RESTORE_EPOCH_STEP, Fenced, backend_holding, claim_of, claim_shard, end_transaction, \
    fence, fenced_by, transaction_status

log = logging.getLogger("metergate.shard")

# A COMMIT whose answer was lost is looked up in Postgres for at most this long.
OUTCOME_WAIT_S = 15.0


class CommitOutcomeUnknown(Exception):
    """A COMMIT lost its connection and Postgres could not be asked whether it committed."""


class Claim:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.epoch = 0
        self.commit_no = 0  # commits recorded under this epoch (and before it) that memory reflects
        self.slots: set[int] = set()
        self.resolved = {"committed": 0, "aborted": 0, "unknown": 0}  # COMMITs whose answer was lost
        self.claims = 0  # claims taken by this process: more than one after a failover or a restore
        # A fenced transaction whose outcome is not known (its COMMIT's answer lost, and Postgres
        # not asked in time): the count is then ours or one more. One more is that commit landing
        # late: no divergence of the database, but orgs of its batch may have loaded again
        # before it landed, so memory is dropped then (Fenced with `landed_late`), never kept.
        self.uncertain = False

    async def take(self, conn: asyncpg.Connection) -> None:
        """Claim the shard: an epoch above any this process held, the count as recorded."""
        self.epoch, self.commit_no, self.slots = await claim_shard(conn, self.shard, self.epoch)
        self.claims += 1
        self.uncertain = False

    async def fence(self, conn: asyncpg.Connection) -> int:
        """In a commit's transaction: count it, or raise Fenced. Returns the transaction id."""
        try:
            return await fence(conn, self.shard, self.epoch, self.commit_no)
        except Fenced as exc:
            self._landed_after_all(exc.found)
            raise

    def committed(self) -> None:
        """A fenced transaction committed: the count moved on by one."""
        self.commit_no += 1
        self.uncertain = False

    def unsure(self) -> None:
        """A fenced transaction ended without its outcome known."""
        self.uncertain = True

    async def check(self, conn: asyncpg.Connection) -> None:
        """Raise Fenced if the database's record is not this claim (a failover, a restore)."""
        found = await claim_of(conn, self.shard)
        if found != (self.epoch, self.commit_no):
            self._landed_after_all(found)
            raise fenced_by(self.shard, self.epoch, self.commit_no, found)

    def _landed_after_all(self, found: tuple[int, int] | None) -> None:
        """If the transaction whose outcome was not known committed (the database is one commit
        ahead, in this epoch), raise Fenced `landed_late`: the count takes it in; memory must
        go (orgs of its batch may have loaded before it landed), but nothing else diverged."""
        if self.uncertain and found == (self.epoch, self.commit_no + 1):
            self.commit_no += 1
            self.uncertain = False
            raise Fenced(f"shard {self.shard}: a commit whose outcome was unknown landed late", superseded=False,
                         found=found, landed_late=True)

    async def landed(self, pool: asyncpg.Pool, backend_pid: int, xid: int, failure: Exception) -> bool:
        """Whether transaction `xid`, fenced by this claim, whose COMMIT lost its connection,
        committed.

        Postgres decides it, over a new connection: its old server process is ended (over a
        silent network it could hold the transaction open for minutes), unless it waits for a
        synchronous standby (ended then, its commit would stand on the primary alone: it is
        waited for), and once no process holds it, the count says. Raises Fenced if the
        database is not the one the commit went to, CommitOutcomeUnknown if Postgres cannot
        be asked within OUTCOME_WAIT_S."""
        deadline = time.monotonic() + OUTCOME_WAIT_S

        def left() -> float:  # every step is bounded: over a partition, pooled connections are silent too
            return max(0.1, deadline - time.monotonic())

        while time.monotonic() < deadline:
            try:
                async with pool.acquire(timeout=left()) as conn:
                    try:
                        status = await self._outcome(conn, backend_pid, xid, left())
                    except Exception as exc:
                        if not isinstance(exc, (Fenced, asyncpg.InvalidParameterValueError, CommitOutcomeUnknown)):
                            drop(conn)  # not put back: its link failed or went quiet
                        raise
            except asyncpg.InvalidParameterValueError as exc:  # "transaction ID is in the future"
                raise Fenced(f"shard {self.shard}: transaction {xid} is unknown to the database ({exc}):"
                             " a failover or a restore?", superseded=False) from failure
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - Postgres cannot be asked yet: again, until the deadline
                if not is_outage(exc):
                    raise
                status = "unreachable"
            if status in ("committed", "aborted"):
                self.resolved[status] += 1
                return status == "committed"
            await asyncio.sleep(0.05 if status in ("in progress", "sync_rep") else 0.25)
        self.resolved["unknown"] += 1
        self.unsure()
        raise CommitOutcomeUnknown(f"transaction {xid}: {failure!r}") from failure

    async def _outcome(self, conn: asyncpg.Connection, backend_pid: int, xid: int, timeout: float) -> str:
        holding = await backend_holding(conn, backend_pid, xid, timeout=timeout)
        if holding == "open":
            await end_transaction(conn, backend_pid, xid, timeout=timeout)
            return "in progress"  # looked at again: its end is final only once the process is gone
        if holding == "sync_rep":
            return "sync_rep"
        found = await claim_of(conn, self.shard, timeout=timeout)
        if found is not None and found[0] == self.epoch:
            if found[1] == self.commit_no + 1:
                return "committed"
            if found[1] == self.commit_no:
                return "aborted"
        if found is None or found[0] <= self.epoch:
            raise fenced_by(self.shard, self.epoch, self.commit_no, found)
        if found[0] >= self.epoch + RESTORE_EPOCH_STEP:  # a restore since: its transaction ids are not ours
            self.resolved["unknown"] += 1
            raise CommitOutcomeUnknown(f"transaction {xid}: the database was restored since (epoch {found[0]})")
        # Claimed by another incarnation since (its claim waited for this transaction): the
        # count moved on with it, so the transaction's own status says.
        status = await transaction_status(conn, xid, timeout=timeout)
        return status or "unknown"
