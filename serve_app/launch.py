"""Start and stop the whole service: Postgres, migrations, Ray, shards, Serve."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
import ray
from ray import serve

from actors.jobs import JOBS_NAME, SchedulerActor
from actors.placement import NAMESPACE, shard_name
from actors.shard import ShardActor
from config.catalog import load_catalog
from config.settings import Settings, SettingsError, load_settings, with_generated_tokens
from storage import slots
from storage.db import migrate, start_embedded_postgres, stop_embedded_postgres, stop_postgres_now

log = logging.getLogger("metergate.launch")
APP_NAME = "metergate"
SHARD_CPUS = 0.1
JOBS_CPUS = 0.05


SERVING_WAIT_S = 60.0  # a start waits at most this for its HTTP port to answer (wait_serving)
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
    dashboard_url: str | None = None  # the Ray dashboard; None: off, or a Ray started elsewhere
    dashboard_needs_token: bool = False
    metrics_port: int | None = None  # Ray's Prometheus endpoint on this node
    made_haproxy_files: bool = False  # this run wrote Serve's HAProxy folder (haproxy_dir)

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

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
    """Start the shard actors (or find the running ones). SPREAD: on a cluster they go to
    different nodes, so one node lost takes few shards with it; Ray restarts those on the
    nodes left (max_restarts=-1), and each recovers its orgs from Postgres."""
    remote = ray.remote(ShardActor)
    handles = []
    for k in range(settings.shards):
        handles.append(remote.options(
            name=shard_name(k), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=0, num_cpus=SHARD_CPUS, max_concurrency=10_000,
            scheduling_strategy="SPREAD",
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


# What a deploy onto a shared Ray cluster cannot make up on one machine: the database every
# node reaches, and the secrets every ingress replica must agree on.
CLUSTER_REQUIRED = ("database_url", "service_token", "admin_token", "org_token_secret")


def cluster_settings() -> Settings:
    """Settings for metergate on a Ray cluster (`serve deploy serve_config.yaml`), from the
    METERGATE_* environment of the cluster's Ray processes.

    No embedded Postgres and no generated tokens: the process that reads these may run on any
    node, and again on another one at the next deploy."""
    settings = load_settings()
    missing = [name for name in CLUSTER_REQUIRED if getattr(settings, name) is None]
    if missing:
        names = ", ".join(f"METERGATE_{name.upper()}" for name in missing)
        raise SettingsError(f"on a Ray cluster, set {names} in the environment of `ray start` on every node "
                            "(cluster.yaml loads ~/metergate.env)")
    load_catalog(settings.catalog)  # fail fast on a bad catalog
    return settings


def start_backend(settings: Settings) -> list[int]:
    """On the Ray cluster this process is connected to: migrate, map the slots, start the
    shards and the scheduler, or find them running (named, detached). Returns the slot map.

    Only for an external Postgres (cluster_settings): nothing is left running here."""
    if settings.database_url is None:
        raise SettingsError("METERGATE_DATABASE_URL: required on a Ray cluster (no embedded Postgres there)")
    running = Running(settings)
    prepare_database(settings, running)
    start_shards(settings)
    start_jobs(settings, running.slot_map)
    return running.slot_map


def start(settings: Settings, ray_init_kwargs: dict | None = None, running: Running | None = None) -> Running:
    """Bring the service up, recording in `running` what is up so far.

    If anything fails or a stop signal interrupts it, what was already started is stopped
    again before the exception goes on."""
    load_catalog(settings.catalog)  # fail fast on a bad catalog
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_ray_ports(settings)
    settings = with_generated_tokens(settings)
    running = running or Running(settings)
    running.settings = settings
    try:
        running.settings = settings = prepare_database(settings, running)
        if not ray.is_initialized():
            if settings.serve_haproxy:
                stop_haproxy(settings)  # one a killed run left behind holds the port
                os.environ.update(lean_serve_env(settings))  # Ray's processes inherit it
                running.made_haproxy_files = True
            # ray.init puts in a SIGTERM handler of its own (sys.exit); the caller's stays.
            caller_sigterm = signal.getsignal(signal.SIGTERM)
            # "local": a cluster of our own, never one that another process happens to run.
            address = os.environ.get("RAY_ADDRESS") or "local"
            options = {**(ray_node_options(settings) if address == "local" else {}), **(ray_init_kwargs or {})}
            ray_context = ray.init(address=address, namespace=NAMESPACE, **options)
            running.started_ray = True
            running.dashboard_url = _with_scheme(ray_context.dashboard_url)
            # A Ray started by ray.init turns on its token auth unless RAY_AUTH_MODE says otherwise:
            # the dashboard then asks for the token (`ray get-auth-token` prints it).
            running.dashboard_needs_token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            if threading.current_thread() is threading.main_thread() and caller_sigterm is not None:
                signal.signal(signal.SIGTERM, caller_sigterm)
        running.metrics_port = metrics_export_port()
        start_shards(settings)
        start_jobs(settings, running.slot_map)
        running.started_serve = True
        serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
        deploy_ingress(running)
        if running.started_ray:
            wait_serving(running)
    except BaseException:
        log.warning("start-up did not complete; stopping what it started")
        stop(running, drain=False)
        raise
    return running


def wait_serving(running: Running, timeout_s: float = SERVING_WAIT_S) -> bool:
    """Wait until the HTTP port answers the app: Serve calls the app ready before its HAProxy
    has the routes, and until then every request is 503 `service_unavailable`. A start is
    announced once callers are served, not before. Past timeout_s it goes on, with a warning."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(running.settings.http_host, running.settings.http_host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{running.settings.http_port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an HTTP_PROXY's
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with direct.open(url, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (OSError, ValueError):  # refused, reset, 503 (HTTPError is an OSError), timed out
            pass
        time.sleep(0.1)
    log.warning("%s does not answer yet after %.0f s; going on", url, timeout_s)
    return False


def ray_node_options(settings: Settings) -> dict:
    """ray.init options for a Ray this process starts: the dashboard on 127.0.0.1 or none (it
    runs jobs and code on the cluster for whoever reaches it), and a known Prometheus port,
    so a scrape config can name it."""
    options: dict = {"include_dashboard": settings.dashboard, "_metrics_export_port": settings.metrics_port or None}
    if settings.dashboard:
        options.update(dashboard_host="127.0.0.1", dashboard_port=settings.dashboard_port)
    return options


def check_ray_ports(settings: Settings) -> None:
    """Refuse a taken dashboard or metrics port before starting Ray, naming the setting: Ray
    itself stops with a ValueError on the first, and on the second its raylet times out after
    30 s with no word of the port."""
    wanted = [("METERGATE_METRICS_PORT", "", settings.metrics_port)] if settings.metrics_port else []
    if settings.dashboard:
        wanted.append(("METERGATE_DASHBOARD_PORT", "127.0.0.1", settings.dashboard_port))
    for variable, host, port in wanted:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind it
            try:
                sock.bind((host, port))
            except OSError:
                raise SettingsError(f"{variable}: port {port} is in use (another metergate or Ray?); set another "
                                    "port, or METERGATE_DASHBOARD=false / METERGATE_METRICS_PORT=0") from None


def _with_scheme(url: str | None) -> str | None:
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def metrics_export_port() -> int | None:
    """The port of Ray's Prometheus endpoint on the node this process runs on."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return node.get("MetricsExportPort") or None
    return None


def haproxy_dir(settings: Settings) -> Path:
    """Where Serve's HAProxy keeps its config, admin socket and state for this data folder.

    Short, in /tmp: Serve puts them one 56-character folder further down, and HAProxy takes
    an admin socket path of at most 97 bytes. Named by the data folder, so a later start finds
    what an earlier, killed one left."""
    key = zlib.crc32(str(Path(settings.data_dir).resolve()).encode())
    return Path(tempfile.gettempdir()) / f"mg-haproxy-{key:08x}"


# A client silent this long mid-request (a body that never ends) is dropped: an hour by
# Serve's default. Gate feed streams are not silent (a heartbeat every 0.5 s).
CLIENT_SILENT_AT_MOST_S = 30


def lean_serve_env(settings: Settings) -> dict[str, str]:
    """Environment for the fast Serve path: HTTP through HAProxy straight to the ingress
    replicas, Serve's throughput-oriented defaults, and HAProxy's files our own (its default,
    /tmp/haproxy-serve, collides between two services). Its stats and metrics listeners take
    no port: the front puts them on Unix sockets in the same folder."""
    run = haproxy_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    front = run / "haproxy"  # HAProxy with metergate's outage answers (serve_app/haproxy_front.py)
    front.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m serve_app.haproxy_front "$@"\n')
    front.chmod(0o755)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(front),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run / "server-state"),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),
        # HAProxy's own metrics make Serve's manager actor parse a log line per request
        # (~20 % of a core at 3k req/s here); metergate exports its own (README, Metrics).
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # A dead HAProxy is replaced once its proxy fails 3 health checks: 3 x 10 s by
        # default, half a minute with the HTTP port closed; 3 x 2 s instead.
        "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(CLIENT_SILENT_AT_MOST_S),
    }


def stop_haproxy(settings: Settings) -> int:
    """Kill the HAProxy processes of this data folder. Ray's proxy actor starts HAProxy as a
    child; when Ray kills that actor, HAProxy lives on and keeps the HTTP port."""
    killed = 0
    for proc in haproxy_processes(settings):
        try:
            proc.kill()
            killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed


def haproxy_processes(settings: Settings) -> list[psutil.Process]:
    """The HAProxy processes of this data folder: their command lines name its files."""
    ours = str(haproxy_dir(settings)) + os.sep
    return [proc for proc in psutil.process_iter(["cmdline"])
            if any(arg.startswith(ours) for arg in proc.info["cmdline"] or ())]


def deploy_ingress(running: Running) -> None:
    """Deploy (or deploy again) the HTTP ingress on the started Serve."""
    from serve_app.deployment import Ingress

    app = Ingress.options(num_replicas=running.settings.ingress_replicas).bind(running.settings.model_dump_json(),
                                                                               running.slot_map)
    serve.run(app, name=APP_NAME, route_prefix="/")


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
    if running.made_haproxy_files:  # (before ray.init, which a stop may have cut short)
        stop_haproxy(running.settings)
        shutil.rmtree(haproxy_dir(running.settings), ignore_errors=True)
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
    if settings is not None and settings.serve_haproxy:
        stop_haproxy(settings)
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
