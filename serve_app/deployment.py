"""The Serve deployment that hosts the HTTP app in each ingress replica."""

from __future__ import annotations

from ray import serve

from actors.routing import ShardRouter
from config.catalog import load_catalog
from config.settings import Settings
from serve_app.app import build_app
from serve_app.context import Context


@serve.deployment(
    # Many requests in flight per replica is what lets the per-shard batchers fill.
    max_ongoing_requests=2000,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress()
class Ingress:
    def __init__(self, settings_json: str, slot_map: list[int]) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.context = Context(settings, load_catalog(settings.catalog), ShardRouter(slot_map))

    def __serve_build_asgi_app__(self):
        return build_app(self.context)
