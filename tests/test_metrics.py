"""metergate's metrics on Ray's Prometheus endpoint: after gates, leases, usage, a feed and
refused webhooks, every series is there with its tags, the counters moved by at least what
was done, and no series names an org. Ray exports every few seconds, so the checks poll.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Self

import httpx
import pytest
import ray
from svix.webhooks import Webhook

from actors.placement import NAMESPACE, shard_name, slot_of
from config.settings import Settings, SettingsError
from serve_app import launch, main
from serve_app.errors import ApiError
from serve_app.stripe_gateway import StripeGateway
from tests.helpers import (
    OUTBOUND_SECRET,
    SERVICE_TOKEN,
    free_port,
    hour_tick,
    stripe_deliver,
    stripe_event,
    wait_for,
)

EXPORT_WAIT_S = 90  # Ray exports about every 10 s; a loaded 2-core host takes longer
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \S+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
SPENDING_TICKS = 40  # hour ticks of 165,600 µUSD: past the 5 USD signup grant, so the org halts


class Scrape:
    """One read of the metrics endpoint: samples as (name, labels, value)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            match = SAMPLE.match(line)
            if match and not line.startswith("#"):
                labels = dict(LABEL.findall(match.group(2) or ""))
                self.samples.append((match.group(1), labels, float(match.group(3))))

    def total(self, name: str, **tags: str) -> float:
        """The sum over every process's series of `name` whose tags include `tags`."""
        return sum(value for sample, labels, value in self.samples
                   if sample == name and all(labels.get(k) == v for k, v in tags.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [labels for sample, labels, _ in self.samples if sample == name]

    def metergate(self) -> list[tuple[str, dict[str, str], float]]:
        return [s for s in self.samples if s[0].startswith("ray_metergate_")]


def scrape(service) -> Scrape:
    response = httpx.get(service.metrics_url, timeout=10)
    assert response.status_code == 200, response.text[:300]
    return Scrape(response.text)


def shard_of(service, org_id: str) -> str:
    return str(service.slot_map[slot_of(org_id)])


class FeedReader:
    """GET /v1/gate/feed read in a thread for as long as the `with` lasts, as a gateway reads it."""

    def __init__(self, service) -> None:
        self.service = service
        self.heartbeats = 0
        self.ended: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="feed-reader", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
        try:
            with httpx.Client(base_url=self.service.base_url, headers=headers, timeout=30) as client, \
                    client.stream("GET", "/v1/gate/feed", params={"heartbeat_s": 0.5}) as feed:
                for line in feed.iter_lines():
                    self.heartbeats += '"heartbeat"' in line
                    if self.stop.is_set():
                        return
            self.ended = "the server ended the stream"
        except httpx.HTTPError as exc:
            self.ended = f"the stream failed: {exc!r}"


def bad_svix_delivery(compute) -> httpx.Response:
    """A Svix delivery signed with another secret than the service's."""
    body, message_id, at = b'{"type": "sandbox.stopped", "data": {}}', f"msg_{uuid.uuid4().hex}", datetime.now(UTC)
    headers = {"svix-id": message_id, "svix-timestamp": str(int(at.timestamp())),
               "svix-signature": Webhook(OUTBOUND_SECRET).sign(message_id, at, body.decode()),
               "content-type": "application/json"}
    return compute.post("/webhooks/svix", content=body, headers=headers)


def test_the_metrics_endpoint_serves_metergate_series_that_move_and_never_name_an_org(service, compute, new_org):
    assert service.metrics_port == service.settings.metrics_port  # the port a scrape config names
    before = scrape(service)
    paying, spending = new_org(), new_org()
    paying_shard, spending_shard = shard_of(service, paying), shard_of(service, spending)

    # Gates: answered from the projection or by the shard, ok while credit lasts.
    for _ in range(3):
        response = compute.post("/v1/gate", json={"org_id": paying, "action": "create"})
        assert response.status_code == 200 and response.json()["reason"] == "ok", response.text
    batch = compute.post("/v1/gate/batch", json={"checks": [{"org_id": paying, "action": "wake"}] * 2})
    assert [d["reason"] for d in batch.json()["decisions"]] == ["ok", "ok"], batch.text
    assert compute.post("/v1/gate", json={"org_id": f"ghost_{uuid.uuid4().hex[:8]}", "action": "create"}) \
        .status_code == 404
    lease = compute.post("/v1/leases", json={"org_id": paying, "lease_id": "sbx_metrics", "ttl_s": 3600})
    assert lease.status_code == 201, lease.text

    # Usage: billed, then sent again (duplicates), and one tick of an org that does not exist.
    ticks = {"ticks": [hour_tick(spending, f"t{n}") for n in range(SPENDING_TICKS)]}
    assert compute.post("/v1/usage", json=ticks).json()["accepted"] == SPENDING_TICKS
    assert compute.post("/v1/usage", json=ticks).json()["duplicates"] == SPENDING_TICKS
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    assert compute.post("/v1/usage", json={"ticks": [hour_tick(ghost, "t0")]}).json()["rejected"]
    denied = compute.post("/v1/gate", json={"org_id": spending, "action": "create"}).json()
    assert denied["allowed"] is False, denied

    # Refused webhooks, and a Stripe call that fails (from this process: the driver's metrics
    # go out through the same Ray agent as the replicas').
    assert bad_svix_delivery(compute).json()["error"]["code"] == "invalid_signature"
    ignored = stripe_deliver(compute, stripe_event("customer.created", {"id": "cus_x"}))
    assert ignored.json()["outcome"] == "ignored"
    refused = stripe_deliver(compute, stripe_event("customer.created", {"id": "cus_x"}), secret="whsec_not_the_secret")
    assert refused.json()["error"]["code"] == "invalid_signature"
    unreachable = Settings(**{**service.settings.model_dump(), "stripe_api_base": f"http://127.0.0.1:{free_port()}"})
    gateway = StripeGateway(unreachable)
    with pytest.raises(ApiError) as failed:
        asyncio.run(gateway.call(gateway.client.v1.customers.create, {"email": "x@example.com"}))
    assert failed.value.code == "stripe_error"

    def expectations(now: Scrape) -> list[str]:
        """What the scrape does not show yet (empty: everything)."""
        def grew(name: str, by: float, **tags: str) -> str | None:
            moved = now.total(name, **tags) - before.total(name, **tags)
            return None if moved >= by else f"{name}{tags} grew by {moved}, want >= {by}"

        def present(name: str, **tags: str) -> str | None:
            found = [labels for labels in now.series(name) if all(labels.get(k) == v for k, v in tags.items())]
            return None if found else f"no {name}{tags}"

        def at_least(name: str, value: float, **tags: str) -> str | None:
            return None if now.total(name, **tags) >= value else f"{name}{tags} = {now.total(name, **tags)}"

        checks = [
            grew("ray_metergate_gate_decisions_total", 5, reason="ok"),
            grew("ray_metergate_gate_decisions_total", 3, reason="ok", action="create"),
            grew("ray_metergate_gate_decisions_total", 2, reason="ok", action="wake"),
            grew("ray_metergate_gate_decisions_total", 1, reason="unknown_org", source="shard"),
            grew("ray_metergate_gate_decisions_total", 1, reason=denied["reason"], action="create"),
            grew("ray_metergate_ticks_total", SPENDING_TICKS, shard=spending_shard, outcome="accepted"),
            grew("ray_metergate_ticks_total", SPENDING_TICKS, shard=spending_shard, outcome="duplicate"),
            grew("ray_metergate_ticks_total", 1, outcome="rejected"),
            grew("ray_metergate_commit_items_count", 3, shard=spending_shard),
            grew("ray_metergate_commit_ticks_count", 2, shard=spending_shard),
            grew("ray_metergate_commit_latency_ms_count", 3, shard=paying_shard),
            grew("ray_metergate_views_published_total", 1, shard=paying_shard),
            at_least("ray_metergate_orgs_loaded", 1, shard=paying_shard),
            at_least("ray_metergate_leases_active", 1, shard=paying_shard),
            present("ray_metergate_snapshot_lag_orgs", shard=spending_shard),
            present("ray_metergate_snapshot_lag_entries", shard=spending_shard),
            grew("ray_metergate_outbox_deliveries_total", 1, outcome="delivered"),  # org.halted, to the receiver
            present("ray_metergate_outbox_backlog"),
            present("ray_metergate_outbox_dead"),
            grew("ray_metergate_webhook_verification_failures_total", 1, source="svix"),
            grew("ray_metergate_webhook_verification_failures_total", 1, source="stripe"),
            grew("ray_metergate_stripe_errors_total", 1, call="self_serve", error="APIConnectionError"),
            grew("ray_metergate_stripe_events_total", 1, outcome="ignored"),
            at_least("ray_metergate_feed_streams", 1),
            grew("ray_metergate_feed_lag_ms_count", 1, shard="0"),
            grew("ray_metergate_feed_lag_ms_count", 1, shard="1"),
        ]
        return [missing for missing in checks if missing]

    # A gateway reads its feed all along; the lease is renewed on every poll, which keeps its
    # org in memory (idle orgs leave after 1 s in this session).
    with FeedReader(service) as feed:
        wait_for("two heartbeats of the feed", lambda: feed.heartbeats >= 2, 30)
        deadline = time.monotonic() + EXPORT_WAIT_S
        while True:
            assert compute.post(f"/v1/leases/{paying}/sbx_metrics/renew").status_code == 200
            now = scrape(service)
            missing = expectations(now)
            if not missing:
                break
            assert time.monotonic() < deadline, (
                f"not exported within {EXPORT_WAIT_S} s:\n  " + "\n  ".join(missing)
                + f"\nfeed: {feed.heartbeats} heartbeats, {feed.ended or 'still open'}; its gauge: "
                + str([s for s in now.samples if s[0] == "ray_metergate_feed_streams"]))
            time.sleep(1.0)

    for name, labels, _ in now.metergate():
        assert not {"org", "org_id"} & set(labels), (name, labels)
    for org_id in (paying, spending, ghost):
        assert org_id not in now.text, f"{org_id} appears on the metrics endpoint"


def test_a_shards_running_totals_match_a_count_over_its_orgs(service, compute, new_org):
    """The leases and journal tails behind the gauges are kept as orgs load, commit, snapshot
    and leave; counted afresh over the orgs in memory, they are the same."""
    orgs = [new_org() for _ in range(4)]
    for n, org_id in enumerate(orgs):
        response = compute.post("/v1/leases", json={"org_id": org_id, "lease_id": f"sbx_{n}", "ttl_s": 3600,
                                                    "resources": {"quantity": 1 + n % 2}})
        assert response.status_code == 201, response.text
    compute.post("/v1/usage", json={"ticks": [hour_tick(orgs[0], f"t{n}") for n in range(3)]})
    compute.delete(f"/v1/leases/{orgs[1]}/sbx_1")
    handles = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(service.settings.shards)]

    def totals_agree() -> bool:
        for stats in ray.get([h.stats.remote() for h in handles], timeout=30):
            totals, recounted = stats["totals"], stats["recounted"]
            if (totals["leases_held"], totals["tail_orgs"], totals["tail_entries"]) != (
                    recounted["leases_held"], recounted["tail_orgs"], recounted["tail_entries"]):
                raise AssertionError(f"shard {stats['shard']}: running totals {totals} != recount {recounted}")
            if recounted["leases_in_orgs"] != totals["leases_held"]:
                return False  # a commit in flight (a sweep): its orgs are counted after it
        return True

    wait_for("the totals to settle", totals_agree, 10)
    time.sleep(3)  # idle orgs snapshot (2 s) and leave memory (1 s in this session): the totals follow
    wait_for("the totals to settle after passivation", totals_agree, 10)


def test_make_up_starts_the_dashboard_on_loopback_and_prints_it_with_the_metrics_port():
    settings = Settings(dashboard_port=free_port(), metrics_port=free_port())
    options = launch.ray_node_options(settings)
    assert options == {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                       "dashboard_port": settings.dashboard_port, "_metrics_export_port": settings.metrics_port}
    off = launch.ray_node_options(Settings(dashboard=False, metrics_port=0))
    assert off == {"include_dashboard": False, "_metrics_export_port": None}  # 0: Ray picks a free port

    running = launch.Running(settings, dashboard_url=f"http://127.0.0.1:{settings.dashboard_port}",
                             dashboard_needs_token=True, metrics_port=settings.metrics_port)
    printed = main.banner(running)
    assert f"dashboard    http://127.0.0.1:{settings.dashboard_port}" in printed
    assert "ray get-auth-token" in printed
    assert f"metrics      http://127.0.0.1:{settings.metrics_port}/metrics" in printed
    assert "dashboard    off" in main.banner(launch.Running(settings))


@pytest.mark.parametrize("variable", ["METERGATE_DASHBOARD_PORT", "METERGATE_METRICS_PORT"])
def test_a_taken_dashboard_or_metrics_port_stops_the_start_naming_its_setting(variable):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        field = variable.removeprefix("METERGATE_").lower()
        settings = Settings(**{"dashboard_port": free_port(), "metrics_port": free_port(), field: port})
        with pytest.raises(SettingsError, match=f"{variable}: port {port} is in use"):
            launch.check_ray_ports(settings)
    launch.check_ray_ports(settings)  # free again


HTTP_REQUESTS = "ray_metergate_http_requests_total"
HTTP_LATENCY = "ray_metergate_http_request_latency_ms"
STATUS_CLASSES = {"1xx", "2xx", "3xx", "4xx", "5xx"}


def test_requests_are_counted_and_timed_by_route_template_and_status_class_never_by_org(
        service, admin, compute, new_org):
    """Answers of the gate's hot path and of the app, a refusal before routing, a path no route
    has, and a 503 from Postgres going away under a request: each is counted under its route's
    template with its status class, and timed; neither an org id nor a raw path is a tag."""
    before = scrape(service)
    org = new_org()
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    key = f"metrics-cut-{uuid.uuid4().hex[:8]}"  # in the Idempotency-Key claim's INSERT only

    for _ in range(3):  # the hot path's own answers
        assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).status_code == 200
    assert compute.post("/v1/gate", json={"org_id": ghost, "action": "create"}).status_code == 404
    assert admin.get(f"/v1/orgs/{org}").status_code == 200
    assert admin.get(f"/v1/orgs/{ghost}").status_code == 404
    assert httpx.get(f"{service.base_url}/v1/orgs/{org}", timeout=30).status_code == 401  # before routing
    assert admin.get(f"/v1/no-such-route/{org}").status_code == 404
    # The claim of the key loses its connection before Postgres sees it: 503 database_unavailable.
    cut = service.pg_proxy.cut(key, "statement")
    failed = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000},
                        headers={"Idempotency-Key": key})
    assert (failed.status_code, failed.json()["error"]["code"]) == (503, "database_unavailable"), failed.text
    assert [c["done"] for c in service.pg_proxy.status()["cuts"] if c["id"] == cut] == [True]

    wanted = [  # (route, method, status class, at least this many more requests)
        ("/v1/gate", "POST", "2xx", 3),
        ("/v1/gate", "POST", "4xx", 1),
        ("/v1/orgs/{org_id}", "GET", "2xx", 1),
        ("/v1/orgs/{org_id}", "GET", "4xx", 2),
        ("unmatched", "GET", "4xx", 1),
        ("/v1/orgs/{org_id}/credits", "POST", "5xx", 1),
    ]

    def missing(now: Scrape) -> list[str]:
        gaps = []
        for route, method, status_class, count in wanted:
            tags = {"route": route, "method": method, "status_class": status_class}
            for name in (HTTP_REQUESTS, f"{HTTP_LATENCY}_count"):
                moved = now.total(name, **tags) - before.total(name, **tags)
                if moved < count:
                    gaps.append(f"{name}{tags} grew by {moved}, want >= {count}")
        return gaps

    deadline = time.monotonic() + EXPORT_WAIT_S
    while gaps := missing(now := scrape(service)):
        assert time.monotonic() < deadline, f"not exported within {EXPORT_WAIT_S} s:\n  " + "\n  ".join(gaps)
        time.sleep(1.0)

    fast = now.total(f"{HTTP_LATENCY}_bucket", route="/v1/gate", method="POST", status_class="2xx", le="+Inf")
    assert fast == now.total(f"{HTTP_LATENCY}_count", route="/v1/gate", method="POST", status_class="2xx")
    for name in (HTTP_REQUESTS, f"{HTTP_LATENCY}_count", f"{HTTP_LATENCY}_bucket", f"{HTTP_LATENCY}_sum"):
        for labels in now.series(name):
            assert labels["status_class"] in STATUS_CLASSES, (name, labels)
            assert labels["route"] == "unmatched" or labels["route"].startswith("/"), (name, labels)
            assert not {"org", "org_id", "path"} & set(labels), (name, labels)
            assert not any(value.startswith(("org_", "ghost_")) or "/org_" in value or "/ghost_" in value
                           for value in labels.values()), (name, labels)
    assert org not in now.text and ghost not in now.text


def test_a_replica_tallies_each_answer_once_under_a_template_a_known_method_and_a_status_class():
    """The ingress's ASGI app (hot path, body limit, routes) without Ray Serve: what it tallies
    for the counter. An answer that raised after it went out (a bug, 500) is counted once; an
    unknown method is OTHER; a path no route has is `unmatched`."""
    from config.catalog import load_catalog
    from serve_app.app import build_app
    from serve_app.context import Context
    from serve_app.hot_path import HotPath

    settings = Settings(service_token=SERVICE_TOKEN, admin_token="admin-token-for-the-tally-test-0123",
                        org_token_secret="org-token-secret-for-the-tally-test-0123456789")
    ctx = Context(settings, load_catalog(settings.catalog), router=None)  # no shards: a replay is a bug
    replica = HotPath(build_app(ctx), ctx)
    admin_auth = {"Authorization": f"Bearer {settings.admin_token}"}

    async def requests() -> list[int]:
        transport = httpx.ASGITransport(app=replica, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://metergate") as client:
            return [(await call).status_code for call in (
                client.get("/healthz"),
                client.request("BREW", "/healthz"),
                client.get("/v1/orgs/org_tally_1/replay", headers=admin_auth),
                client.get("/v1/orgs/org_tally_2"),
                client.post("/v1/orgs/org_tally_3/credits", content=b"x" * 10, headers={"content-length": "99999999"}),
                client.get("/v1/no-such-route/org_tally_4"),
                client.post("/v1/gate", content=b"{}", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}),
            )]

    assert asyncio.run(requests()) == [200, 405, 500, 401, 401, 404, 422]
    assert replica.metrics.tally == {
        ("/healthz", "GET", "2xx"): 1,
        ("/healthz", "OTHER", "4xx"): 1,
        ("/v1/orgs/{org_id}/replay", "GET", "5xx"): 1,
        ("/v1/orgs/{org_id}", "GET", "4xx"): 1,
        ("/v1/orgs/{org_id}/credits", "POST", "4xx"): 1,
        ("unmatched", "GET", "4xx"): 1,
        ("/v1/gate", "POST", "4xx"): 1,
    }
