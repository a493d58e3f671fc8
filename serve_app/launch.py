"""Start and stop the whole service: Postgres, migrations, Ray, shards, Serve."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import asyncpg
import ray
from ray import serve

from actors.jobs import JOBS_NAME, SchedulerActor
from actors.placement import NAMESPACE, shard_name
from actors.shard import ShardActor
from config.catalog import load_catalog
from config.settings import Settings, with_generated_tokens
from storage import slots
from storage.db import migrate, start_embedded_postgres, stop_embedded_postgres, stop_postgres_now

log = logging.getLogger("metergate.launch")
APP_NAME = "metergate"
SHARD_CPUS = 0.1
JOBS_CPUS = 0.05


STOP_BUDGET_S = 9.0  # a stop ends within this, whatever state Ray and Postgres are in


@dataclass
class Running:
    """What a start has brought up so far: a stop takes down exactly that, even mid-start."""

    settings: Settings
    slot_map: list[int] = field(default_factory=list)
    pg_server: object | None = None
    started_ray: bool = False
    started_serve: bool = False
    stopped: bool = False

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"


def prepare_database(settings: Settings, running: Running) -> Settings:
    """Resolve the database (embedded unless METERGATE_DATABASE_URL), migrate, map slots."""
    if settings.database_url is None:
        url, running.pg_server = start_embedded_postgres(settings.data_dir)
        settings = settings.model_copy(update={"database_url": url})

    async def setup() -> list[int]:
        await migrate(settings.database_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await slots.ensure_slots(conn, settings.shards)
            return await slots.slot_map(conn)
        finally:
            await conn.close()

    running.slot_map = asyncio.run(setup())
    return settings


def start_shards(settings: Settings) -> list:
    remote = ray.remote(ShardActor)
    handles = []
    for k in range(settings.shards):
        handles.append(remote.options(
            name=shard_name(k), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=0, num_cpus=SHARD_CPUS, max_concurrency=10_000,
        ).remote(k, settings.model_dump_json()))
    ray.get([h.ready.remote() for h in handles])
    return handles


def start_jobs(settings: Settings, slot_map: list[int]):
    handle = ray.remote(SchedulerActor).options(
        name=JOBS_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, num_cpus=JOBS_CPUS, max_concurrency=100,
    ).remote(settings.model_dump_json(), slot_map)
    ray.get(handle.ready.remote())
    return handle


def start(settings: Settings, ray_init_kwargs: dict | None = None, running: Running | None = None) -> Running:
    """Bring the service up, recording in `running` what is up so far.

    If anything fails or a stop signal interrupts it, what was already started is stopped
    again before the exception goes on."""
    load_catalog(settings.catalog)  # fail fast on a bad catalog
    settings = with_generated_tokens(settings)
    running = running or Running(settings)
    running.settings = settings
    try:
        running.settings = settings = prepare_database(settings, running)
        if not ray.is_initialized():
            # ray.init puts in a SIGTERM handler of its own (sys.exit); the caller's stays.
            caller_sigterm = signal.getsignal(signal.SIGTERM)
            # "local": a cluster of our own, never one that another process happens to run.
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", namespace=NAMESPACE,
                     include_dashboard=False, **(ray_init_kwargs or {}))
            running.started_ray = True
            if threading.current_thread() is threading.main_thread() and caller_sigterm is not None:
                signal.signal(signal.SIGTERM, caller_sigterm)
        start_shards(settings)
        start_jobs(settings, running.slot_map)
        from serve_app.deployment import Ingress

        running.started_serve = True
        serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
        app = Ingress.options(num_replicas=settings.ingress_replicas).bind(settings.model_dump_json(),
                                                                           running.slot_map)
        serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        log.warning("start-up did not complete; stopping what it started")
        stop(running, drain=False)
        raise
    return running


def _bounded(what: str, step, timeout_s: float) -> bool:
    """Run a stop step in a thread for at most timeout_s: a dead cluster must not hang a stop."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"stop-{what}", daemon=True).start()
    if not done.wait(max(timeout_s, 0.1)):
        log.warning("stop: %s did not finish within %.1f s; going on", what, timeout_s)
        return False
    if failure:
        log.warning("stop: %s failed: %r", what, failure[0])
        return False
    return True


def stop(running: Running, drain: bool = True, budget_s: float = STOP_BUDGET_S) -> None:
    """Stop what `running` holds, within budget_s.

    First the ingress (no new work), then the scheduler, then every shard drains (queued
    work commits, dirty orgs snapshot) and is killed, then Ray and the embedded Postgres.
    Draining is an optimisation: every acknowledged change is already in Postgres, so when
    Ray is gone already (its processes killed with ours) the steps time out and the stop
    goes on.
    """
    if running.stopped:
        return
    running.stopped = True
    deadline = time.monotonic() + budget_s

    def left(share: float) -> float:
        return (deadline - time.monotonic()) * share

    if ray.is_initialized():
        if running.started_serve:
            _bounded("serve.delete", lambda: serve.delete(APP_NAME), left(0.25))
        _bounded("scheduler", lambda: ray.kill(ray.get_actor(JOBS_NAME, namespace=NAMESPACE), no_restart=True),
                 left(0.1))
        if drain:
            _bounded("drain", lambda: _drain_shards(running.settings.shards), left(0.5))
        _bounded("shards", lambda: _kill_shards(running.settings.shards), left(0.2))
        if running.started_serve:
            _bounded("serve.shutdown", serve.shutdown, left(0.3))
        if running.started_ray:
            _bounded("ray.shutdown", ray.shutdown, left(0.8))
    if running.pg_server is not None:
        # pgserver's own stop (pg_ctl -w stop) may wait a long time; past the budget, a fast
        # shutdown of the postmaster does it.
        if not _bounded("postgres", lambda: stop_embedded_postgres(running.pg_server), max(left(1.0), 1.0)):
            stop_postgres_now(running.settings.data_dir)


def kill_now(settings: Settings | None) -> None:
    """The last resort of a stop that hangs: a fast shutdown of the embedded Postgres (it
    lives in a session of its own), then SIGKILL to this process group: Ray's processes,
    started by this process, and this process itself. `settings` as loaded: with no
    database URL, the Postgres is ours."""
    kill_postgres_of(settings)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def kill_postgres_of(settings: Settings | None) -> None:
    """Fast shutdown of the embedded Postgres these settings (as loaded) would use, if it runs."""
    if settings is not None and settings.database_url is None:
        stop_postgres_now(settings.data_dir)


def _drain_shards(shards: int) -> None:
    handles = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(shards)]
    ray.get([h.drain.remote() for h in handles])


def _kill_shards(shards: int) -> None:
    for k in range(shards):
        try:
            ray.kill(ray.get_actor(shard_name(k), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # not running
