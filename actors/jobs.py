"""The scheduler: time-driven work for every org, one Ray actor (`metergate-jobs`).

Each job runs holding a Postgres advisory lock of its connection's session (never a
transaction: jobs call Stripe and webhook receivers, and a transaction open across a network
call holds back vacuum), so a second scheduler (or a re-run) finds the lock taken and skips;
each statement commits on its own, and each job's effects are idempotent anyway:
- sweep: orgs whose `org_due` time has come get an Advance command through their shard,
  which applies what time changed (a new period with its usage archived, grant and pack
  expiry, lease expiry, dunning steps) from the org's own state, so a second Advance at the
  same time changes nothing;
- outbox: events are delivered to METERGATE_WEBHOOK_URLS, signed with the svix library, with
  the same message id on every attempt, exponential backoff and a dead-letter state;
- meter: postpaid usage rolled up per hour into Stripe meter events (shadow by default);
- parity: each shard compares its loaded orgs with their journal;
- prune_tick_ids: tick-id partitions past the dedupe retention are dropped, the next made ahead;
- retention: delivered and dead outbox events, Idempotency-Key answers, inbound webhook ids and
  settled meter events past their retention are deleted, a bounded batch of each per run;
- fold_usage: the ledger's usage rows older than METERGATE_LEDGER_FOLD_AFTER_S are folded
  into one per org and hour (storage/retention.py says why every reader answers the same).
- fold_rollups: usage_rollups rows older than METERGATE_USAGE_DETAIL_DAYS are folded into one
  per org, lease and hour (storage/retention.py fold_next_rollup_hour).

Every job is one row of JOBS (name, cadence, advisory lock, function): that table is the only
place periodic work is declared. What is sent out (webhooks, meter events) is retried by one
RetryPolicy (actors/retry.py), with a dead letter after the last attempt.

Jobs read the time from actors.clock. With METERGATE_TEST_CLOCK=1, `advance_clock` moves it
(in Postgres and in every shard) and then runs the jobs at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
from svix.webhooks import Webhook

from actors import clock, metrics
from actors.clock import now_us
from actors.commands import Advance
from actors.meter_reconcile import reconcile_meters
from actors.refusals import Refusal
from actors.retry import DEAD, PENDING, US_PER_S, RetryPolicy
from actors.routing import ShardRouter
from actors.timeutil import us_to_rfc3339
from config.settings import Settings, stripe_client
from config.version import this_version
from storage import clock_offset, due, holds, locks, meter_events, outbox, retention, tick_ids
from storage.db import create_pool
from storage.times import us_to_dt

log = logging.getLogger("metergate.jobs")
# httpx logs each request at INFO with its URL, and a webhook URL often carries a secret.
logging.getLogger("httpx").setLevel(logging.WARNING)

JOBS_NAME = "metergate-jobs"
START_RETRY_S = 2.0
TICK_EVERY_S = 1.0  # the loop's beat; each job runs when its own cadence has passed
METER_GRACE_S = 120  # an hour is rolled up this long after it ends (late ticks land first)
METER_BATCH = 500
METER_LOOKBACK_S = 35 * 86_400  # Stripe takes meter events up to 35 days old
# Meter events are revenue: tried for about a day (backoff capped at an hour) before dead.
METER_MAX_ATTEMPTS = 30
SWEEP_BATCH = 2_000
SWEEP_ROUNDS = 50  # per run; what is left is taken by the next run
OUTBOX_BATCH = 200
DELIVERY_TIMEOUT_S = 10.0
RETENTION_BATCH = 10_000  # rows of each table per retention run (a run a minute)
FOLD_HOURS_PER_RUN = 24  # hours of the ledger folded per run; a backlog is caught up an hour at a time


@dataclass(frozen=True)
class Job:
    name: str
    every_s: float
    lock: int  # Postgres advisory lock: one runner at a time across schedulers
    run: Callable[["SchedulerActor", asyncpg.Connection], Awaitable[dict]]


class SchedulerActor:
    def __init__(self, settings_json: str, slot_map: list[int]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.settings = Settings.model_validate_json(settings_json)
        self.slot_map = slot_map
        self.pool = None
        self.router = None
        self.loop_task: asyncio.Task | None = None
        self.started: asyncio.Task | None = None
        self.urls = [u.strip() for u in self.settings.webhook_urls.split(",") if u.strip()]
        self.signer = Webhook(self.settings.webhook_secret) if self.settings.webhook_secret else None
        self.stripe = stripe_client(self.settings)
        self.outbox_retry = RetryPolicy(self.settings.webhook_backoff_s, self.settings.webhook_max_attempts)
        self.meter_retry = RetryPolicy(self.settings.webhook_backoff_s, METER_MAX_ATTEMPTS)
        self.runs = {"sweep": 0, "outbox": 0, "meter": 0, "parity": 0, "prune_tick_ids": 0, "outbox_count": 0,
                     "retention": 0, "fold_usage": 0, "fold_rollups": 0,
                     "skipped_locked": 0, "errors": 0, "parity_drift": 0}
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # built outside an actor's event loop: the first call starts it
        # Ray restarts a killed scheduler, and nobody calls it then: it starts by itself.
        self.starting = asyncio.ensure_future(self._start_until_up())

    async def _start_until_up(self) -> None:
        while True:
            try:
                await self._ensure_started()
                return
            except Exception:  # noqa: BLE001 - Postgres not reachable yet: again shortly
                log.exception("scheduler: start failed; trying again in %s s", START_RETRY_S)
                await asyncio.sleep(START_RETRY_S)

    async def _ensure_started(self) -> None:
        if self.started is None or (self.started.done() and self.started.exception() is not None):
            self.started = asyncio.ensure_future(self._start())
        await asyncio.shield(self.started)

    async def _start(self) -> None:
        self.pool = await create_pool(self.settings.database_url, min_size=1, max_size=4)
        self.router = ShardRouter(self.slot_map, project_views=False)
        if self.settings.test_clock:
            async with self.pool.acquire() as conn:
                clock.set_offset_us(await clock_offset.offset_us(conn))
        if self.settings.jobs_enabled:
            self.loop_task = asyncio.ensure_future(self._loop())

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"runs": self.runs, "offset_us": clock.offset_us(), "version": this_version(self.settings)}

    async def _loop(self) -> None:
        last_run = {job.name: 0.0 for job in JOBS}
        while True:
            for job in JOBS:
                if time.monotonic() - last_run[job.name] < job.every_s:
                    continue
                last_run[job.name] = time.monotonic()
                try:
                    await self._run(job)
                except Exception:  # noqa: BLE001 - a failed run is retried at its next turn
                    self.runs["errors"] += 1
                    log.exception("scheduler: job %s failed", job.name)
            await asyncio.sleep(TICK_EVERY_S)

    async def _run(self, job: Job) -> dict | None:
        """Run one job holding its advisory lock for the connection's session, with no
        transaction open (each statement commits by itself; a job that needs one keeps it
        short and never across a network call); None if another runner has the lock."""
        await self._ensure_started()
        async with self.pool.acquire() as conn:
            if not await locks.try_session_lock(conn, job.lock):
                self.runs["skipped_locked"] += 1
                return None
            try:
                result = await job.run(self, conn)
                assert not conn.is_in_transaction(), f"job {job.name} left a transaction open"
            finally:
                if not conn.is_closed():
                    await locks.release_session_lock(conn, job.lock)
        self.runs[job.name] += 1
        return result

    async def run_due(self) -> dict:
        """Run the time-driven jobs once now (the test clock does this after moving time)."""
        return {"sweep": await self.sweep(), "meter": await self.meter_rollup(), "outbox": await self.deliver_outbox()}

    async def advance_clock(self, seconds: int) -> dict:
        """Test clock only: move time forward for the whole service, then run what became due."""
        await self._ensure_started()
        assert self.settings.test_clock, "the test clock is off"
        async with self.pool.acquire() as conn:
            offset = await clock_offset.advance(conn, seconds)
        clock.set_offset_us(offset)
        await asyncio.gather(*(h.set_clock.remote(offset) for h in self.router.handles))
        ran = await self.run_due()
        return {"offset_us": offset, "now_us": now_us(), "ran": ran}

    # One public method per job, for operators and tests (`ray.get(jobs.parity.remote())`).
    async def sweep(self) -> dict | None:
        return await self._run(JOB["sweep"])

    async def parity(self) -> dict | None:
        return await self._run(JOB["parity"])

    async def meter_rollup(self) -> dict | None:
        return await self._run(JOB["meter"])

    async def deliver_outbox(self) -> dict | None:
        return await self._run(JOB["outbox"])

    async def prune_tick_ids(self) -> dict | None:
        return await self._run(JOB["prune_tick_ids"])

    async def retention(self) -> dict | None:
        return await self._run(JOB["retention"])

    async def fold_usage(self) -> dict | None:
        return await self._run(JOB["fold_usage"])

    async def fold_rollups(self) -> dict | None:
        return await self._run(JOB["fold_rollups"])

    async def reconcile_meters(self, since_us: int) -> dict:
        """After a restore (`metergate inbound reconcile`): record what Stripe's meter holds
        since `since_us` beyond the meter events (actors/meter_reconcile.py), then let the
        roll-up go again (the `meters` hold)."""
        await self._ensure_started()
        async with self.pool.acquire() as conn:
            started = await holds.now(conn)  # a hold put on after this is not taken off by this read
        found = {"orgs": 0, "hours": 0, "recorded_micros": 0, "meter": None}
        if self.stripe is not None:
            event_name = f"{self.settings.stripe_meter_prefix}_{meter_events.MONEY_METER}"
            found = await reconcile_meters(self.stripe, self.pool, event_name, since_us)
        found.setdefault("skipped", 0)
        released, needed = False, None
        async with self.pool.acquire() as conn:
            shadow = None if self.settings.stripe_meter_shadow else await meter_events.oldest_shadow_hour(conn)
            if shadow is not None and shadow < us_to_dt(since_us):  # shadow events from before: sent once off
                needed = shadow
            elif not found["skipped"]:  # an org skipped was not read back: the hold stays on
                released, needed = await holds.release(conn, holds.METERS, us_to_dt(since_us), started)
            found["meters_held"] = await holds.held(conn, holds.METERS) is not None
        found["meters_released"] = released
        found["read_back_from"] = None if needed is None else int(needed.timestamp())
        return found

    # ----- the jobs ------------------------------------------------------------------------

    async def _sweep(self, conn: asyncpg.Connection) -> dict:
        """Orgs whose due time has come get an Advance through their shard."""
        advanced, gone = 0, 0
        failed: list[str] = []  # left for the next run (a shard down); never asked again in this one
        for _ in range(SWEEP_ROUNDS):
            now = now_us()
            org_ids = await due.due_orgs(conn, now, SWEEP_BATCH, failed)
            if not org_ids:
                break
            results = await asyncio.gather(*(self.router.command(o, Advance()) for o in org_ids),
                                           return_exceptions=True)
            unknown = [o for o, r in zip(org_ids, results)
                       if isinstance(r, dict) and r.get("error", {}).get("code") == Refusal.UNKNOWN_ORG]
            if unknown:
                await due.forget(conn, unknown)
            done = [o for o, r in zip(org_ids, results) if isinstance(r, dict) and "error" not in r]
            # An org whose due time did not move (its Advance failed, or changed nothing it
            # tracks) is not asked again in this run.
            failed += await due.still_due(conn, org_ids, now)
            advanced += len(done)
            gone += len(unknown)
        return {"advanced": advanced, "unknown": gone, "left": len(failed)}

    async def _parity(self, conn: asyncpg.Connection) -> dict:
        """Each shard rebuilds a sample of its loaded orgs (METERGATE_PARITY_SAMPLE_ORGS, chosen
        anew each run) from the journal and compares them with memory."""
        sample = self.settings.parity_sample_orgs or None
        results = await asyncio.gather(*(h.parity.remote(sample) for h in self.router.handles))
        drift = sorted(org_id for r in results for org_id in r["drift"])
        self.runs["parity_drift"] = len(drift)  # the metric: orgs found drifted in the last run
        for org_id in drift:
            log.error("parity drift: org %s differs in memory from its journal", org_id)
        return {"checked": sum(r["checked"] for r in results), "drift": drift,
                "shards": {r["shard"]: {"checked": r["checked"], "drift": sorted(r["drift"])} for r in results}}

    async def _meter(self, conn: asyncpg.Connection) -> dict:
        """Postpaid usage per org, meter and closed hour → meter events (shadow unless turned off;
        an org in shadow keeps its own 'shadow' and one cut over sends only its hours from the
        cutover on: storage/enforcement.py). Nothing while a restore's `meters` hold is on
        (storage/holds.py)."""
        held = await holds.held(conn, holds.METERS)
        if held is not None:
            return {"held": held}
        settings = self.settings
        now = now_us()
        inserted = await meter_events.roll_up(
            conn, now - METER_GRACE_S * US_PER_S, now - METER_LOOKBACK_S * US_PER_S,
            settings.stripe_meter_bill_from, "shadow" if settings.stripe_meter_shadow else "pending")
        released = 0
        if not settings.stripe_meter_shadow:
            released = await meter_events.release_shadow(conn, settings.stripe_meter_bill_from)
        sent, deferred, dead = await self._send_meter_events(conn)
        return {"new": inserted, "released": released, "sent": sent, "deferred": deferred, "dead": dead}

    async def _send_meter_events(self, conn: asyncpg.Connection) -> tuple[int, int, int]:
        """Send pending meter events; a 429 backs off the whole run, other failures back off the event."""
        if self.settings.stripe_meter_shadow or self.stripe is None:
            return 0, 0, 0
        import stripe

        sent = deferred = dead = 0
        for event in await meter_events.due(conn, now_us(), METER_BATCH):
            error = None
            if event.customer_id is None:
                error = "org has no Stripe customer"
            else:
                params = {"event_name": f"{self.settings.stripe_meter_prefix}_{event.meter}",
                          "identifier": event.identifier, "timestamp": event.hour_us // US_PER_S,
                          "payload": {"stripe_customer_id": event.customer_id, "value": str(event.value)}}
                try:
                    await asyncio.to_thread(self.stripe.v1.billing.meter_events.create, params=params)
                except stripe.RateLimitError as exc:
                    metrics.stripe_failed("meter_events", exc)
                    error = "429"
                except stripe.StripeError as exc:
                    metrics.stripe_failed("meter_events", exc)
                    error = f"{type(exc).__name__}: {exc.user_message or exc}"
            if error is None:
                sent += 1
                await meter_events.mark_sent(conn, event.identifier, now_us())
                continue
            status, retry_at = self.meter_retry.after_failure(event.attempts + 1, now_us())
            if status == DEAD:
                dead += 1
                log.error("meter event %s (org %s) dead after %s attempts: %s", event.identifier, event.org_id,
                          event.attempts + 1, error)
            else:
                deferred += 1
            await meter_events.mark_failed(conn, event.identifier, error, status, retry_at)
            if error == "429":
                break  # Stripe asks us to slow down: the rest waits for the next run
        return sent, deferred, dead

    async def _outbox(self, conn: asyncpg.Connection) -> dict:
        """Deliver due outbound events to every URL; one statement marks the run."""
        if not self.urls or self.signer is None:  # not configured: events wait in the outbox, pending
            return {"delivered": 0, "failed": 0, "dead": 0, "configured": False}
        events = await outbox.due(conn, now_us(), OUTBOX_BATCH)
        counts = {"delivered": 0, "failed": 0, "dead": 0, "configured": True}
        if not events:
            return counts
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S) as client:
            outcomes = await asyncio.gather(*(self._deliver(client, event) for event in events))
        now = now_us()
        marks = []  # id, status, attempts, error, next attempt (or delivery) time
        for event, error in zip(events, outcomes):
            attempts = event.attempts + 1
            if error is None:
                status, at = "delivered", now
            else:
                status, at = self.outbox_retry.after_failure(attempts, now)
                if status == DEAD:
                    log.warning("outbox %s (%s) dead after %s attempts: %s", event.id, event.type, attempts, error)
            counts["failed" if status == PENDING else status] += 1
            marks.append((event.id, status, attempts, error, at))
        await outbox.mark(conn, marks)
        metrics.outbox_delivered(counts)
        return counts

    async def _outbox_count(self, conn: asyncpg.Connection) -> dict:
        """The outbox's gauges: events waiting, and dead letters (an operator retries those)."""
        pending, dead = await outbox.waiting_and_dead(conn)
        metrics.outbox_counted(pending, dead)
        return {"pending": pending, "dead": dead}

    async def _deliver(self, client: httpx.AsyncClient, event: outbox.OutboundEvent) -> str | None:
        """POST one event to every URL; None when all took it, else what went wrong."""
        message_id = event.message_id  # the same on every attempt (receivers dedupe on it), never on another event
        body = msgspec.json.encode({"id": message_id, "type": event.type,
                                    "created_at": us_to_rfc3339(event.created_us), "data": event.data}).decode()
        # The signature's timestamp is transport time, real UTC: receivers check it against
        # their own clock, which the test clock does not move.
        sent_at = datetime.now(timezone.utc)
        headers = {"content-type": "application/json", "svix-id": message_id,
                   "svix-timestamp": str(int(sent_at.timestamp())),
                   "svix-signature": self.signer.sign(message_id, sent_at, body)}
        errors = []
        for url in self.urls:  # one URL down does not keep the event from the others
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                errors.append(f"{redacted(url)}: {type(exc).__name__}")
                continue
            if not 200 <= response.status_code < 300:
                errors.append(f"{redacted(url)}: HTTP {response.status_code}")
        return "; ".join(errors) or None

    async def _prune_tick_ids(self, conn: asyncpg.Connection) -> dict:
        """Tick-id partitions wholly past the dedupe retention (at least 24 h) are dropped, and
        the next ones made ahead (storage/tick_ids.py); its own short transaction, DDL only."""
        async with conn.transaction():
            return await tick_ids.maintain(conn, now_us(), self.settings.tick_id_retention_s)

    async def _retention(self, conn: asyncpg.Connection) -> dict:
        """What nothing reads any more, a batch of each per run (docs/operations/retention.md)."""
        settings, now = self.settings, now_us()

        def before(retention_s: int):
            return us_to_dt(now - retention_s * US_PER_S)

        assert settings.meter_event_retention_s > METER_LOOKBACK_S, "the roll-up would make deleted hours again"
        return {
            "outbox": await retention.delete_finished_outbox(
                conn, before(settings.outbox_delivered_retention_s), before(settings.outbox_dead_retention_s),
                RETENTION_BATCH),
            "idempotency": await retention.delete_idempotency_answers(
                conn, before(settings.idempotency_retention_s), RETENTION_BATCH),
            "inbound_webhooks": await retention.delete_inbound_webhooks(
                conn, before(settings.inbound_webhook_retention_s), RETENTION_BATCH),
            "meter_events": await retention.delete_settled_meter_events(
                conn, before(settings.meter_event_retention_s), RETENTION_BATCH),
        }

    async def _fold_usage(self, conn: asyncpg.Connection) -> dict:
        """Usage rows per minute older than the fold age become one per org and hour."""
        assert self.settings.ledger_fold_after_s >= 2 * 86_400, "folding must stay far behind the minute written"
        before = us_to_dt(now_us() - self.settings.ledger_fold_after_s * US_PER_S)
        hours = deleted = folded = 0
        for _ in range(FOLD_HOURS_PER_RUN):
            done = await retention.fold_next_hour(conn, before)
            if done is None:
                break
            hours, deleted, folded = hours + 1, deleted + done[1], folded + done[2]
        return {"hours": hours, "deleted": deleted, "folded": folded}

    async def _fold_rollups(self, conn: asyncpg.Connection) -> dict:
        """usage_rollups per minute older than the detail age become one per org, lease and hour."""
        before = us_to_dt(now_us() - self.settings.usage_detail_days * 86_400 * US_PER_S)
        hours = deleted = folded = 0
        for _ in range(FOLD_HOURS_PER_RUN):
            done = await retention.fold_next_rollup_hour(conn, before)
            if done is None:
                break
            hours, deleted, folded = hours + 1, deleted + done[1], folded + done[2]
        return {"hours": hours, "deleted": deleted, "folded": folded}


def redacted(url: str) -> str:
    """A webhook URL as errors and logs show it: scheme, host and port only. Receivers often
    carry a secret in the path or the query (`.../hooks/<token>`, `?key=`)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/…" if parts.path.strip("/") or parts.query else \
        f"{parts.scheme}://{parts.hostname or '?'}{port}"


JOBS = (
    Job("parity", 300.0, 7_310_104, SchedulerActor._parity),
    Job("sweep", 10.0, 7_310_101, SchedulerActor._sweep),
    Job("meter", 60.0, meter_events.METER_LOCK, SchedulerActor._meter),  # also taken by a cutover's undo
    Job("outbox", 1.0, 7_310_102, SchedulerActor._outbox),
    Job("prune_tick_ids", 60.0, 7_310_105, SchedulerActor._prune_tick_ids),
    Job("outbox_count", 10.0, 7_310_106, SchedulerActor._outbox_count),
    Job("retention", 60.0, 7_310_120, SchedulerActor._retention),
    Job("fold_usage", 60.0, 7_310_121, SchedulerActor._fold_usage),
    Job("fold_rollups", 60.0, 7_310_122, SchedulerActor._fold_rollups),
)
JOB = {job.name: job for job in JOBS}
assert len(JOB) == len(JOBS) and len({job.lock for job in JOBS}) == len(JOBS), "job names and locks are unique"
