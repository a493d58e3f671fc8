"""The scheduler: time-driven work for every org, one Ray actor (`metergate-jobs`).

Each job runs inside a transaction holding a Postgres advisory lock, so a second scheduler
(or a re-run) finds the lock taken and skips; and each job's effects are idempotent anyway:
- sweep: orgs whose `org_due` time has come get an Advance command through their shard,
  which applies what time changed (a new period with its usage archived, grant and pack
  expiry, lease expiry, dunning steps) from the org's own state, so a second Advance at the
  same time changes nothing;
- outbox: events are delivered to METERGATE_WEBHOOK_URLS, signed with the svix library, with
  the same message id on every attempt, exponential backoff and a dead-letter state.

Jobs read the time from actors.clock. With METERGATE_TEST_CLOCK=1, `advance_clock` moves it
(in Postgres and in every shard) and then runs the jobs at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

import httpx
import msgspec
from svix.webhooks import Webhook

from actors import clock
from actors.clock import now_us
from actors.commands import Advance
from config.settings import Settings, stripe_client
from storage import journal as store
from storage.db import create_pool

log = logging.getLogger("metergate.jobs")

JOBS_NAME = "metergate-jobs"
LOCK_SWEEP = 7_310_101
LOCK_OUTBOX = 7_310_102
LOCK_METER = 7_310_103
LOCK_PARITY = 7_310_104
PARITY_EVERY_S = 300.0
METER_GRACE_S = 120  # an hour is rolled up this long after it ends (late ticks land first)
METER_BATCH = 500
METER_LOOKBACK_S = 35 * 86_400  # Stripe takes meter events up to 35 days old
METER_EVERY_S = 60.0
# Usage meters: (meter, rollup column). A meter event carries the hour's quantity.
METERS = (("memory_mb_ms", "memory_mb_ms"), ("cpu_ms", "cpu_ms"), ("disk_mb_ms", "disk_mb_ms"))
SWEEP_BATCH = 2_000
SWEEP_ROUNDS = 50  # per run; what is left is taken by the next run
OUTBOX_BATCH = 200
OUTBOX_EVERY_S = 1.0
SWEEP_EVERY_S = 10.0
DELIVERY_TIMEOUT_S = 10.0


def backoff_s(attempts: int, base_s: int) -> int:
    """Seconds before attempt n+1: base, 2·base, 4·base, … at most an hour."""
    return min(base_s * 2 ** max(attempts - 1, 0), 3_600)


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
        self.runs = {"sweep": 0, "outbox": 0, "skipped_locked": 0, "errors": 0, "parity_drift": 0}

    async def _ensure_started(self) -> None:
        if self.started is None or (self.started.done() and self.started.exception() is not None):
            self.started = asyncio.ensure_future(self._start())
        await asyncio.shield(self.started)

    async def _start(self) -> None:
        from serve_app.routing import ShardRouter  # the ingress's router: batched calls per shard

        self.pool = await create_pool(self.settings.database_url, min_size=1, max_size=4)
        self.router = ShardRouter(self.slot_map)
        if self.settings.test_clock:
            async with self.pool.acquire() as conn:
                clock.set_offset_us(await clock.load_offset_us(conn))
        if self.settings.jobs_enabled:
            self.loop_task = asyncio.ensure_future(self._loop())

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"runs": self.runs, "offset_us": clock.offset_us()}

    async def _loop(self) -> None:
        last_sweep = last_parity = last_meter = 0.0
        while True:
            try:
                if time.monotonic() - last_parity >= PARITY_EVERY_S:
                    last_parity = time.monotonic()
                    await self.parity()
                if time.monotonic() - last_sweep >= SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    await self.sweep()
                if time.monotonic() - last_meter >= METER_EVERY_S:
                    last_meter = time.monotonic()
                    await self.meter_rollup()
                await self.deliver_outbox()
            except Exception:  # noqa: BLE001 - a failed run is retried at the next tick
                self.runs["errors"] += 1
                log.exception("scheduler run failed")
            await asyncio.sleep(OUTBOX_EVERY_S)

    async def run_due(self) -> dict:
        """Run every job once now (the test clock does this after moving time)."""
        await self._ensure_started()
        return {"sweep": await self.sweep(), "meter": await self.meter_rollup(),
                "outbox": await self.deliver_outbox()}

    async def advance_clock(self, seconds: int) -> dict:
        """Test clock only: move time forward for the whole service, then run what became due."""
        await self._ensure_started()
        assert self.settings.test_clock, "the test clock is off"
        async with self.pool.acquire() as conn:
            offset = await conn.fetchval(
                "INSERT INTO test_clock (id, offset_us) VALUES (1, $1) ON CONFLICT (id)"
                " DO UPDATE SET offset_us = test_clock.offset_us + $1 RETURNING offset_us", seconds * 1_000_000)
        clock.set_offset_us(offset)
        await asyncio.gather(*(h.set_clock.remote(offset) for h in self.router.handles))
        ran = await self.run_due()
        return {"offset_us": offset, "now_us": now_us(), "ran": ran}

    # ----- jobs ---------------------------------------------------------------------------

    async def _locked(self, key: int, job):
        """Run job(conn) holding advisory lock `key` for its transaction; None if another holds it."""
        await self._ensure_started()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key):
                    self.runs["skipped_locked"] += 1
                    return None
                return await job(conn)

    async def sweep(self) -> dict | None:
        async def job(conn) -> dict:
            advanced, gone = 0, 0
            failed: list[str] = []  # left for the next run (a shard down); never asked again in this one
            for _ in range(SWEEP_ROUNDS):
                now = store.us_to_dt(now_us())
                org_ids = [r["org_id"] for r in await conn.fetch(
                    "SELECT org_id FROM org_due WHERE due_at <= $1 AND org_id <> ALL($3::text[])"
                    " ORDER BY due_at LIMIT $2", now, SWEEP_BATCH, failed)]
                if not org_ids:
                    break
                results = await asyncio.gather(*(self.router.command(o, Advance()) for o in org_ids),
                                               return_exceptions=True)
                unknown = [o for o, r in zip(org_ids, results)
                           if isinstance(r, dict) and r.get("error", {}).get("code") == "unknown_org"]
                if unknown:
                    await conn.execute("DELETE FROM org_due WHERE org_id = ANY($1::text[])", unknown)
                done = [o for o, r in zip(org_ids, results) if isinstance(r, dict) and "state" in r]
                # An org whose due time did not move (its Advance failed, or changed nothing it
                # tracks) is not asked again in this run.
                still = await conn.fetch("SELECT org_id FROM org_due WHERE org_id = ANY($1::text[]) AND due_at <= $2",
                                         org_ids, now)
                failed += [r["org_id"] for r in still]
                advanced += len(done)
                gone += len(unknown)
            self.runs["sweep"] += 1
            return {"advanced": advanced, "unknown": gone, "left": len(failed)}

        return await self._locked(LOCK_SWEEP, job)

    async def parity(self) -> dict | None:
        """Each shard rebuilds its loaded orgs from the journal and compares them with memory."""
        async def job(conn) -> dict:
            results = await asyncio.gather(*(h.parity.remote() for h in self.router.handles))
            drift = sorted(org_id for r in results for org_id in r["drift"])
            self.runs["parity_drift"] = len(drift)  # the metric: orgs found drifted in the last run
            for org_id in drift:
                log.error("parity drift: org %s differs in memory from its journal", org_id)
            return {"checked": sum(r["checked"] for r in results), "drift": drift}

        return await self._locked(LOCK_PARITY, job)

    async def meter_rollup(self) -> dict | None:
        """Postpaid usage per org, meter and closed hour → meter events (shadow unless turned off)."""
        settings = self.settings

        async def job(conn) -> dict:
            closed_before = store.us_to_dt(now_us() - METER_GRACE_S * 1_000_000)  # hours ended before this
            bill_from = settings.stripe_meter_bill_from
            status = "shadow" if settings.stripe_meter_shadow else "pending"
            # Each (org, meter, hour) bucket is compared with what meter events already carry:
            # usage that lands late (a retried batch) becomes one more event with the
            # difference, numbered after the ones before it, so its identifier is fixed too.
            selects = " UNION ALL ".join(f"SELECT o, h, '{meter}' AS meter, {column} AS v FROM hours"
                                         for meter, column in METERS)
            inserted = await conn.fetchval(
                "WITH hours AS (SELECT r.org_id AS o, date_trunc('hour', r.minute) AS h,"
                " sum(r.memory_mb_ms)::int8 AS memory_mb_ms, sum(r.cpu_ms)::int8 AS cpu_ms,"
                " sum(r.disk_mb_ms)::int8 AS disk_mb_ms"
                " FROM usage_rollups r JOIN orgs USING (org_id) WHERE orgs.billing_mode = 'postpaid'"
                " AND r.minute < date_trunc('hour', $1::timestamptz) AND r.minute >= $4 GROUP BY 1, 2),"
                f" buckets AS ({selects}),"
                " known AS (SELECT org_id AS o, meter, hour AS h, sum(value)::int8 AS v, count(*) AS n"
                " FROM meter_events WHERE hour >= date_trunc('hour', $4::timestamptz) GROUP BY 1, 2, 3),"
                " ins AS (INSERT INTO meter_events (identifier, org_id, meter, hour, value, status)"
                " SELECT 'mg_' || md5(b.o || '|' || b.meter || '|' || extract(epoch FROM b.h)::bigint"
                " || '|' || coalesce(k.n, 0)), b.o, b.meter, b.h, b.v - coalesce(k.v, 0),"
                " CASE WHEN $2::timestamptz IS NOT NULL AND b.h < $2 THEN 'consumed' ELSE $3 END"
                " FROM buckets b LEFT JOIN known k ON k.o = b.o AND k.meter = b.meter AND k.h = b.h"
                " WHERE b.v > coalesce(k.v, 0) ON CONFLICT (identifier) DO NOTHING RETURNING 1)"
                " SELECT count(*) FROM ins", closed_before, bill_from, status,
                store.us_to_dt(now_us() - METER_LOOKBACK_S * 1_000_000))
            moved = 0
            if not settings.stripe_meter_shadow:  # shadow turned off: what it computed is billed from BILL_FROM
                moved = int((await conn.execute(
                    "UPDATE meter_events SET status = CASE WHEN $1::timestamptz IS NOT NULL AND hour < $1"
                    " THEN 'consumed' ELSE 'pending' END WHERE status = 'shadow'", bill_from)).split()[-1])
            sent, deferred = await self._send_meter_events(conn)
            return {"new": inserted, "released": moved, "sent": sent, "deferred": deferred}

        return await self._locked(LOCK_METER, job)

    async def _send_meter_events(self, conn) -> tuple[int, int]:
        """Send pending meter events; a 429 backs off the whole run, other failures back off the event."""
        if self.settings.stripe_meter_shadow or self.stripe is None:
            return 0, 0
        import stripe

        rows = await conn.fetch(
            "SELECT m.identifier, m.org_id, m.meter, m.hour, m.value, m.attempts, c.customer_id FROM meter_events m"
            " LEFT JOIN stripe_customers c USING (org_id) WHERE m.status = 'pending' AND m.next_attempt_at <= $1"
            " ORDER BY m.hour LIMIT $2", store.us_to_dt(now_us()), METER_BATCH)
        client = self.stripe
        sent = deferred = 0
        for row in rows:
            error = None
            if row["customer_id"] is None:
                error = "org has no Stripe customer"
            else:
                params = {"event_name": f"{self.settings.stripe_meter_prefix}_{row['meter']}",
                          "identifier": row["identifier"], "timestamp": int(row["hour"].timestamp()),
                          "payload": {"stripe_customer_id": row["customer_id"], "value": str(row["value"])}}
                try:
                    await asyncio.to_thread(client.v1.billing.meter_events.create, params=params)
                except stripe.RateLimitError:
                    error = "429"
                except stripe.StripeError as exc:
                    error = f"{type(exc).__name__}: {exc.user_message or exc}"
            if error is None:
                sent += 1
                await conn.execute("UPDATE meter_events SET status = 'sent', attempts = attempts + 1, sent_at = $2,"
                                   " last_error = NULL WHERE identifier = $1", row["identifier"], store.us_to_dt(now_us()))
                continue
            deferred += 1
            retry_at = now_us() + backoff_s(row["attempts"] + 1, self.settings.webhook_backoff_s) * 1_000_000
            await conn.execute("UPDATE meter_events SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3"
                               " WHERE identifier = $1", row["identifier"], error, store.us_to_dt(retry_at))
            if error == "429":
                break  # Stripe asks us to slow down: the rest waits for the next run
        return sent, deferred

    async def deliver_outbox(self) -> dict | None:
        if not self.urls or self.signer is None:
            return {"delivered": 0, "failed": 0, "dead": 0, "configured": False}

        async def job(conn) -> dict:
            rows = await conn.fetch(
                "SELECT id, org_id, type, payload, created_at, attempts FROM outbox"
                " WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
                store.us_to_dt(now_us()), OUTBOX_BATCH)
            counts = {"delivered": 0, "failed": 0, "dead": 0, "configured": True}
            if not rows:
                return counts
            async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S) as client:
                outcomes = await asyncio.gather(*(self._deliver(client, row) for row in rows))
            now = now_us()
            marks = []  # id, status, attempts, error, next attempt
            for row, error in zip(rows, outcomes):
                attempts = row["attempts"] + 1
                if error is None:
                    status, retry_at = "delivered", now
                elif attempts >= self.settings.webhook_max_attempts:
                    status, retry_at = "dead", now
                    log.warning("outbox %s (%s) dead after %s attempts: %s", row["id"], row["type"], attempts, error)
                else:
                    status = "pending"
                    retry_at = now + backoff_s(attempts, self.settings.webhook_backoff_s) * 1_000_000
                counts["failed" if status == "pending" else status] += 1
                marks.append((row["id"], status, attempts, error, store.us_to_dt(retry_at)))
            await conn.execute(
                "UPDATE outbox o SET status = m.status, attempts = m.attempts, last_error = m.error,"
                " next_attempt_at = m.retry_at,"
                " delivered_at = CASE WHEN m.status = 'delivered' THEN m.retry_at ELSE o.delivered_at END"
                " FROM unnest($1::int8[], $2::text[], $3::int[], $4::text[], $5::timestamptz[])"
                " AS m(id, status, attempts, error, retry_at) WHERE o.id = m.id",
                *(list(column) for column in zip(*marks)))
            self.runs["outbox"] += 1
            return counts

        return await self._locked(LOCK_OUTBOX, job)

    async def _deliver(self, client: httpx.AsyncClient, row) -> str | None:
        """POST one event to every URL; None when all took it, else what went wrong."""
        message_id = f"msg_{row['id']}"  # the same on every attempt: receivers dedupe on it
        body = msgspec.json.encode({
            "id": message_id, "type": row["type"], "created_at": row["created_at"].isoformat(),
            "data": msgspec.json.decode(row["payload"]) if isinstance(row["payload"], (str, bytes)) else row["payload"],
        }).decode()
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
                errors.append(f"{url}: {type(exc).__name__}")
                continue
            if not 200 <= response.status_code < 300:
                errors.append(f"{url}: HTTP {response.status_code}")
        return "; ".join(errors) or None
