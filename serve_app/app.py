"""The HTTP app of one ingress replica: error mapping, OpenAPI, body limits, and the routes
(one module per resource under serve_app/routes/); and the app of a gate-feed replica."""

from __future__ import annotations

from fastapi import FastAPI

from serve_app import openapi
from serve_app.context import Context
from serve_app.errors import install_error_handlers
from serve_app.limits import BodyLimit
from serve_app.request_metrics import RequestMetrics
from serve_app.routes import clock, gate, gate_feed, keys, ops, orgs, parity, reports, self_serve, webhooks
from serve_app.routes import billing, docs, imports


def build_app(ctx: Context) -> FastAPI:
    # docs_url/redoc_url None: FastAPI's pages fetch their assets from a CDN; routes/docs.py serves them.
    # redirect_slashes off: Starlette's redirect to the other spelling of a path is built from
    # the request's Host (a caller's choice) and keeps its query string (a `?token=`).
    app = FastAPI(title="metergate", version="1", description="Usage billing and entitlements",
                  docs_url=None, redoc_url=None, redirect_slashes=False)
    install_error_handlers(app)
    openapi.install(app)
    app.add_middleware(BodyLimit, ctx=ctx)
    for module in (ops, keys, gate, webhooks, orgs, reports, parity, imports, self_serve):
        app.include_router(module.routes(ctx))
    app.include_router(gate_feed.routes(ctx, serves_feed=not ctx.settings.feed_replicas))
    for module in (billing, docs):  # pages for people: the billing page and its forms, the API docs
        app.include_router(module.routes(ctx))
    if ctx.settings.test_clock:
        app.include_router(clock.routes(ctx))
    return app


def build_feed_app(ctx: Context):
    """The ASGI app of a feed replica: GET /v1/gate/feed alone, the same route as the ingress
    has, on a process of its own (serve_app/deployment.py FeedIngress): its lines do not wait
    behind the usage bodies an ingress decodes on its one event loop. Its requests are counted
    like the ingress's (serve_app/request_metrics.py)."""
    app = FastAPI(title="metergate gate feed", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    install_error_handlers(app)
    app.include_router(gate_feed.routes(ctx))
    return FullPath(RequestMetrics(app.routes).timed(app))


class FullPath:
    """Serve hands an app deployed under a route prefix its requests with `root_path` set to
    that prefix; the feed's routes are written with their full paths, as in the ingress."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("root_path"):
            root, path = scope["root_path"], scope["path"]
            scope = {**scope, "root_path": "", "path": path if path.startswith(root + "/") or path == root
                     else root + path}
        await self.app(scope, receive, send)
