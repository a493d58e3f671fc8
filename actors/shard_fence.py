"""A shard's fenced transactions (a mixin of ShardActor, actors/shard.py): every write is
fenced by the shard's claim, a COMMIT whose answer is lost is resolved by asking Postgres, and
a fence that fails (another incarnation, a failover, a restore) is acted on.
"""

from __future__ import annotations

import asyncio
import logging
import os

from actors.batch import UNAVAILABLE
from storage import holds
from storage.db import drop, is_outage, roll_back
from storage.slots import Fenced

log = logging.getLogger("metergate.shard")

# A COMMIT is a WAL flush: milliseconds. One left unanswered this long counts as lost, as if its
# connection were cut (a silent network resets nothing, and asyncpg would wait its 60 s command
# timeout with the shard's every commit queued behind it). A false alarm costs a connection,
# never a wrong answer: Postgres is asked how the transaction ended.
COMMIT_WAIT_S = 5.0


class ShardFence:
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

    async def _release(self, conn) -> None:
        """Back to the pool. asyncpg re-raises a failure to reset the connection, which comes
        after the COMMIT: it must not make a committed batch look failed (and be retried)."""
        try:
            await self.pool.release(conn)
        except Exception as exc:  # noqa: BLE001 - the connection is dropped; the commit stands
            log.warning("shard %s: connection not reusable after a transaction: %r", self.shard, exc)


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
