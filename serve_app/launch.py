"""Start and stop the whole service: Postgres, migrations, Ray, shards, Serve."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import asyncpg
import ray
from ray import serve

from actors.jobs import JOBS_NAME, SchedulerActor
from actors.placement import NAMESPACE, shard_name
from actors.shard import ShardActor
from config.catalog import load_catalog
from config.settings import Settings, with_generated_tokens
from storage import journal as store
from storage.db import migrate, start_embedded_postgres

log = logging.getLogger("metergate.launch")
APP_NAME = "metergate"
SHARD_CPUS = 0.1
JOBS_CPUS = 0.05


@dataclass
class Running:
    settings: Settings
    slot_map: list[int]
    pg_server: object | None
    started_ray: bool

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"


def prepare_database(settings: Settings) -> tuple[Settings, object | None, list[int]]:
    """Resolve the database (embedded unless METERGATE_DATABASE_URL), migrate, map slots."""
    server = None
    if settings.database_url is None:
        url, server = start_embedded_postgres(settings.data_dir)
        settings = settings.model_copy(update={"database_url": url})

    async def setup() -> list[int]:
        await migrate(settings.database_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await store.ensure_slots(conn, settings.shards)
            return await store.slot_map(conn)
        finally:
            await conn.close()

    return settings, server, asyncio.run(setup())


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


def start(settings: Settings, ray_init_kwargs: dict | None = None) -> Running:
    load_catalog(settings.catalog)  # fail fast on a bad catalog
    settings = with_generated_tokens(settings)
    settings, server, slot_map = prepare_database(settings)
    started_ray = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, namespace=NAMESPACE,
                 include_dashboard=False, **(ray_init_kwargs or {}))
        started_ray = True
    start_shards(settings)
    start_jobs(settings, slot_map)
    from serve_app.deployment import Ingress

    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    app = Ingress.options(num_replicas=settings.ingress_replicas).bind(settings.model_dump_json(), slot_map)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return Running(settings, slot_map, server, started_ray)


def stop(running: Running) -> None:
    """Drain every shard (all queued work commits, dirty orgs snapshot), then shut down."""
    handles = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(running.settings.shards)]
    try:
        serve.delete(APP_NAME)
    except Exception:  # noqa: BLE001 - stopping anyway
        log.exception("serve.delete failed")
    try:
        ray.kill(ray.get_actor(JOBS_NAME, namespace=NAMESPACE), no_restart=True)
    except Exception:  # noqa: BLE001 - not running
        log.exception("stopping the scheduler failed")
    for handle in handles:
        try:
            ray.get(handle.drain.remote(), timeout=60)
        except Exception:  # noqa: BLE001
            log.exception("drain failed")
        ray.kill(handle, no_restart=True)
    serve.shutdown()
    if running.started_ray:
        ray.shutdown()
    if running.pg_server is not None:
        running.pg_server.cleanup()
