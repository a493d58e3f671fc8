"""Requests of one ingress replica by route family: how many, how long, how many failed.

Two series, tagged by the route's template (`/v1/orgs/{org_id}`, never the path a caller
sent: one series per org, or per made-up path, would swamp Prometheus and show whoever can
scrape who the customers are), the method and the status class (2xx, 4xx, 5xx):

- `metergate_http_requests` (counter): requests answered;
- `metergate_http_request_latency_ms` (histogram): from the replica's first look at the
  request to the start of its answer (the status line and headers). A feed stream is timed to
  its headers, not to its end; the time in HAProxy and Serve's router is not in it.

A request no route matches is `unmatched`; a method outside METHODS is `OTHER`: the tag
values are a fixed, small set whatever callers send. Answers HAProxy gives by itself
(serve_app/haproxy_front.py: no replica up, one that died holding the request) never reach a
replica and are not counted here.

The gate is answered in microseconds, so the cost per request matters: the latency is one
`observe` (Ray's client batches the export, a few µs), and the count is tallied in the
replica's memory and added to the counter at most once a second (FLUSH_S), one `inc` per
route family that moved.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from functools import cache

from ray.util.metrics import Counter, Histogram
from starlette.routing import compile_path

# Sub-millisecond first: a gate check answered from the replica's views takes well under 1 ms.
LATENCY_MS_BOUNDS = [0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000]
TAG_KEYS = ("route", "method", "status_class")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
UNMATCHED = "unmatched"
FLUSH_S = 1.0

log = logging.getLogger("metergate.requests")


class RequestSeries:
    """The two series, as this process records them (one instance: request_series())."""

    def __init__(self) -> None:
        self.requests = Counter(
            "metergate_http_requests", "HTTP requests an ingress replica answered, by route template, "
            "method and status class (2xx, 3xx, 4xx, 5xx)", tag_keys=TAG_KEYS)
        self.latency_ms = Histogram(
            "metergate_http_request_latency_ms", "From an ingress replica's first look at a request to the "
            "start of its answer, in ms, by route template, method and status class",
            boundaries=LATENCY_MS_BOUNDS, tag_keys=TAG_KEYS)


@cache
def request_series() -> RequestSeries:
    """This process's series, made on first use (Ray registers a metric with the process that
    makes it: an ingress replica, never the driver that imports this module)."""
    return RequestSeries()


def status_class(status: int) -> str:
    """200 → "2xx". A status outside 100-599 is no answer a client can act on: "5xx"."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "5xx"


def flat_templates(routes: list, prefix: str = "") -> list[tuple[re.Pattern, set[str] | None, str]]:
    """Every route of the app in the router's order, as (path regex, methods, template).
    FastAPI keeps an included router whole (`original_router`, under its include's prefix)."""
    flat = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            flat += flat_templates(included.routes, prefix + route.include_context.prefix)
        elif getattr(route, "path", None) is not None:
            regex, template, _ = compile_path(prefix + route.path)
            flat.append((regex, getattr(route, "methods", None), template))
    return flat


class RequestMetrics:
    """One replica's requests. `routes`: the app's, to name the template of a request refused
    before the router saw it (401, 413 from the body limit)."""

    def __init__(self, routes: list) -> None:
        self.templates = flat_templates(routes)
        self.tags: dict[tuple[str, str, str], dict[str, str]] = {}  # at most templates × methods × classes
        self.tally: dict[tuple[str, str, str], int] = {}
        self.flush_pending = False
        self.overflowed = False  # logged once

    def answered(self, route: str, method: str, status: int, started_s: float) -> None:
        """One answer started `started_s` (time.perf_counter) ago. `route` is a template."""
        key = (route, method if method in METHODS else OTHER_METHOD, status_class(status))
        tags = self.tags.get(key)
        if tags is None:
            # The tags come from fixed sets whatever callers send: a series per path would grow
            # here. Past the bound (a bug), the answer goes out uncounted; a metric never fails it.
            if len(self.tags) >= (len(self.templates) + 1) * (len(METHODS) + 1) * 5:
                if not self.overflowed:
                    self.overflowed = True
                    log.error("request metrics: more tag sets than routes x methods x classes (%s); "
                              "answers with new ones go uncounted", key)
                return
            tags = self.tags[key] = dict(zip(TAG_KEYS, key))
        request_series().latency_ms.observe((time.perf_counter() - started_s) * 1_000, tags)
        self.tally[key] = self.tally.get(key, 0) + 1
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """The tallied counts onto the counter: one record per route family that moved."""
        tally, self.tally, self.flush_pending = self.tally, {}, False
        counter = request_series().requests
        for key, count in tally.items():
            counter.inc(count, self.tags[key])

    def template(self, scope: dict) -> str:
        """The template of the route that answered (the router leaves it in the scope), or of
        the one that would have; never the request's own path."""
        template = getattr(scope.get("route"), "path_format", None)
        return template or self._match(scope["path"], scope["method"])

    def _match(self, path: str, method: str) -> str:
        """A request refused before the router saw it (401, 413, 429 from the body limit):
        the template its path and method would have reached, as the router orders them."""
        other_method = None
        for regex, methods, template in self.templates:
            if regex.match(path):
                if methods is None or method in methods:
                    return template
                other_method = other_method or template  # the router's 405
        return other_method or UNMATCHED

    def timed(self, app):
        """`app` as an ASGI app whose every HTTP answer is counted and timed."""

        async def timed_app(scope, receive, send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started_s = time.perf_counter()
            started = False

            async def timed_send(message: dict) -> None:
                nonlocal started
                if not started and message["type"] == "http.response.start":
                    started = True
                    self.answered(self.template(scope), scope["method"], message["status"], started_s)
                await send(message)

            try:
                await app(scope, receive, timed_send)
            except Exception:
                if not started:  # nothing went out: Serve answers 500 for it
                    self.answered(self.template(scope), scope["method"], 500, started_s)
                raise

        return timed_app
