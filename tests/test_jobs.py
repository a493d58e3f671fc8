"""The scheduler's table of jobs: every job runs through the one path the loop uses."""

from __future__ import annotations

import asyncio

from actors.jobs import JOB, JOBS, SchedulerActor


def test_every_periodic_job_is_in_the_table_with_a_cadence():
    # (unique names and locks are asserted when actors.jobs is imported)
    assert all(job.every_s > 0 for job in JOBS)
    assert {"sweep", "outbox", "meter", "parity", "prune_tick_ids"} <= set(JOB)


def test_without_webhook_urls_the_outbox_job_sends_nothing_and_marks_nothing(service, admin, sql, new_org):
    """Regression: the loop ran the outbox job without the 'configured' check that only the
    public method had, so with a secret and no URL every event was marked delivered."""
    org = new_org()
    admin.post(f"/v1/orgs/{org}/halt")  # an org.halted event in the outbox
    settings = service.settings.model_copy(update={"jobs_enabled": False, "webhook_urls": ""})
    scheduler = SchedulerActor(settings.model_dump_json(), service.slot_map)  # the plain object, not an actor

    async def run_like_the_loop() -> dict | None:
        try:
            for _ in range(50):  # the service's own scheduler may hold the job's lock for a moment
                result = await scheduler._run(JOB["outbox"])
                if result is not None:
                    return result
                await asyncio.sleep(0.1)
            return None
        finally:
            await scheduler.pool.close()

    result = asyncio.run(run_like_the_loop())
    assert result == {"delivered": 0, "failed": 0, "dead": 0, "configured": False}
