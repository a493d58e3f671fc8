"""The Serve deployment that hosts the HTTP app in each ingress replica, and the application
builder that `serve deploy serve_config.yaml` imports on a Ray cluster."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from actors.routing import ShardRouter
from config.catalog import load_catalog
from config.settings import Settings
from serve_app.app import build_app, build_feed_app
from serve_app.context import Context
from serve_app.hot_path import HotPath


@serve.deployment(
    # Many requests in flight per replica is what lets the per-shard batchers fill.
    max_ongoing_requests=2000,
    ray_actor_options={"num_cpus": 0.1},
    # No log line per request on the hot path; errors are still logged by the handlers.
    logging_config={"enable_access_log": False},
    # A stop waits for requests in flight, not for Serve's default 2 s idle loop; feed
    # streams (which never end by themselves) are cut after 3 s, and their clients resume.
    graceful_shutdown_wait_loop_s=0.2,
    graceful_shutdown_timeout_s=3,
)
@serve.ingress()
class Ingress:
    def __init__(self, settings_json: str, slot_map: list[int]) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.context = Context(settings, load_catalog(settings.catalog), ShardRouter(slot_map))

    def __serve_build_asgi_app__(self):
        return HotPath(build_app(self.context), self.context)


@serve.deployment(
    max_ongoing_requests=2000,  # streams: each is one request for as long as its client reads
    ray_actor_options={"num_cpus": 0.05},
    logging_config={"enable_access_log": False},
    graceful_shutdown_wait_loop_s=0.2,
    graceful_shutdown_timeout_s=3,  # streams are cut after 3 s; their clients resume from their cursor
)
@serve.ingress()
class FeedIngress:
    """GET /v1/gate/feed on a process of its own, deployed as the application FEED_APP_NAME
    under the route prefix FEED_ROUTE (HAProxy and Serve's proxy send the longest prefix that
    matches to its app): a feed line no longer waits behind the usage bodies the ingress
    decodes on its one event loop (issue 18; docs/internals/benchmarks.md). Its router keeps
    no views: it only relays each shard's feed."""

    def __init__(self, settings_json: str, slot_map: list[int]) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.context = Context(settings, load_catalog(settings.catalog), ShardRouter(slot_map, project_views=False))

    def __serve_build_asgi_app__(self):
        return build_feed_app(self.context)


def app(args: dict) -> Application:
    """The application `serve deploy serve_config.yaml` builds (import_path
    `serve_app.deployment:app`), in a Ray task on the cluster.

    Settings come from the METERGATE_* environment of the cluster's Ray processes (cluster.yaml
    loads ~/metergate.env before `ray start`): an external Postgres and explicit tokens. Before
    the ingress, it migrates the database, maps the slots, and starts the shards and the
    scheduler, or finds them running (named, detached): a deploy is one command, and a
    redeploy keeps them. Takes no arguments."""
    from serve_app import launch  # launch imports this module lazily too

    if args:
        raise ValueError(f"serve_app.deployment:app takes no args (got {sorted(args)}); "
                         "set METERGATE_* environment variables instead")
    settings = launch.cluster_settings()
    slot_map = launch.start_backend(settings)
    return Ingress.bind(settings.model_dump_json(), slot_map)


def feed_app(args: dict) -> Application:
    """The gate-feed application `serve deploy serve_config.yaml` builds (import_path
    `serve_app.deployment:feed_app`, route_prefix FEED_ROUTE), beside `app`. It starts what
    `app` starts, or finds it running (both builds may run at once: migrations take a lock,
    the shards and the scheduler are named)."""
    from serve_app import launch

    if args:
        raise ValueError(f"serve_app.deployment:feed_app takes no args (got {sorted(args)})")
    settings = launch.cluster_settings()
    slot_map = launch.start_backend(settings)
    return FeedIngress.bind(settings.model_dump_json(), slot_map)
