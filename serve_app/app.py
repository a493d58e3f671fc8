"""The HTTP app of one ingress replica: error mapping, OpenAPI, body limits, and the routes
(one module per resource under serve_app/routes/)."""

from __future__ import annotations

from fastapi import FastAPI

from serve_app import openapi
from serve_app.context import Context
from serve_app.errors import install_error_handlers
from serve_app.limits import BodyLimit
from serve_app.routes import clock, gate, gate_feed, ops, orgs, reports, self_serve, webhooks
from serve_app.routes import billing, docs


def build_app(ctx: Context) -> FastAPI:
    # docs_url/redoc_url None: FastAPI's pages fetch their assets from a CDN; routes/docs.py serves them.
    # redirect_slashes off: Starlette's redirect to the other spelling of a path is built from
    # the request's Host (a caller's choice) and keeps its query string (a `?token=`).
    app = FastAPI(title="metergate", version="1", description="Usage billing and entitlements",
                  docs_url=None, redoc_url=None, redirect_slashes=False)
    install_error_handlers(app)
    openapi.install(app)
    app.add_middleware(BodyLimit, ctx=ctx)
    for module in (ops, gate, gate_feed, webhooks, orgs, reports, self_serve):
        app.include_router(module.routes(ctx))
    for module in (billing, docs):  # pages for people: the billing page and its forms, the API docs
        app.include_router(module.routes(ctx))
    if ctx.settings.test_clock:
        app.include_router(clock.routes(ctx))
    return app
