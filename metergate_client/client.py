"""GateClient: gate decisions in the gateway's own process, from a live projection.

A background thread loads every org's gate view (GET /v1/gate/views) and follows the feed
(GET /v1/gate/feed), reconnecting with backoff. `check()` decides from the org's view with
the same pure function the server uses, so a current view gives exactly the server's answer.
A view is current while the feed has proved, within `max_staleness_s`, that nothing newer
exists, and while the server's clock is before the view's `valid_until_us`. Otherwise the
action's Policy says what to do: ask the server, fail closed, or fail open.

Leases and usage always go to the server (a lease is atomic at the org's shard); a lease
answer carries the org's new view, which is applied at once.

Sync and asyncio: `check` never blocks unless the policy asks the server; `acheck`,
`alease`, `arenew`, `arelease` and `areport` are the asyncio forms. Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from enum import StrEnum

import httpx
import msgspec

from metergate_client.decision import ACTIONS, Decision, Resources, decide
from metergate_client.projection import (
    FEED_DECODER,
    PAGE_DECODER,
    Heartbeat,
    Projection,
    ViewRecord,
    parse_cursor,
)

log = logging.getLogger("metergate_client")
NO_RESOURCES = Resources()
BACKOFF_S = (0.1, 5.0)  # reconnect backoff: first, at most


class Policy(StrEnum):
    """What check() does when it cannot decide locally (no current view of the org)."""

    SERVER = "server"  # ask POST /v1/gate; if the server cannot answer either, deny
    CLOSED = "closed"  # deny at once
    OPEN = "open"  # allow at once


class Source(StrEnum):
    LOCAL = "local"  # decided from the org's current view
    SERVER = "server"  # the server's answer
    POLICY = "policy"  # no current view and no server answer: the action's policy decided


class Answer(msgspec.Struct, frozen=True, gc=False):
    """A gate answer and where it came from. `age_s`: how old the view was when decided from
    it (local), 0 for the server's answer, inf when there was no view. `decision`: the full
    decision (None when the policy decided); `reason` is its reason, or "unavailable"."""

    allowed: bool
    reason: str
    source: Source
    age_s: float
    decision: Decision | None = None


class GateClient:
    def __init__(self, url: str, token: str, max_staleness_s: float = 1.0,
                 policies: dict[str, Policy | str] | None = None, default_policy: Policy | str = Policy.SERVER,
                 timeout_s: float = 5.0, heartbeat_s: float = 0.25, page_size: int = 1000,
                 start: bool = True) -> None:
        """policies: per action ("create", "wake", "ingest", "purchase"); the others get
        default_policy. E.g. {"ingest": "open", "create": "closed"}."""
        unknown = set(policies or ()) - set(ACTIONS)
        if unknown:
            raise ValueError(f"no such action: {sorted(unknown)}; actions are {ACTIONS}")
        self.url = url.rstrip("/")
        self.max_staleness_s = max_staleness_s
        self.policies = {action: Policy((policies or {}).get(action, default_policy)) for action in ACTIONS}
        self.heartbeat_s = heartbeat_s
        self.page_size = page_size
        self.projection = Projection()
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout_s
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout_s)
        self._ahttp: httpx.AsyncClient | None = None
        self._alock = threading.Lock()
        self._stop = threading.Event()
        self._cursor: str | None = None  # where the feed resumes; None: load a snapshot first
        self._beats = 0  # heartbeats read, ever
        self._synced = threading.Event()
        self._counts = {name: itertools.count() for name in (
            "local", "server", "policy_open", "policy_closed", "stale", "feed_lines", "feed_errors", "resyncs",
            "reconnects")}
        self._thread = threading.Thread(target=self._follow, name="metergate-feed", daemon=True)
        if start:
            self._thread.start()

    # ----- gate checks ------------------------------------------------------------------

    def check(self, org_id: str, action: str, resources: Resources | None = None) -> Answer:
        """May the org do `action` now? Decided locally when its view is current, else by the
        action's policy (which may ask the server: then this call blocks for that request)."""
        answer = self._local(org_id, action, resources or NO_RESOURCES)
        if answer is not None:
            return answer
        if self.policies[action] is Policy.SERVER:
            try:
                return self._server_answer(self._http.post("/v1/gate", json=_gate_body(org_id, action, resources)))
            except httpx.HTTPError:
                pass
        return self._by_policy(org_id, action)

    async def acheck(self, org_id: str, action: str, resources: Resources | None = None) -> Answer:
        answer = self._local(org_id, action, resources or NO_RESOURCES)
        if answer is not None:
            return answer
        if self.policies[action] is Policy.SERVER:
            try:
                return self._server_answer(await self._async_http().post(
                    "/v1/gate", json=_gate_body(org_id, action, resources)))
            except httpx.HTTPError:
                pass
        return self._by_policy(org_id, action)

    def _local(self, org_id: str, action: str, resources: Resources) -> Answer | None:
        projection = self.projection
        record = projection.get(org_id)
        if record is None:
            return None
        age = projection.age_s(record.shard)
        until = record.valid_until_us
        if age > self.max_staleness_s or (until is not None and projection.server_now_us() >= until):
            next(self._counts["stale"])
            return None
        decision = decide(action, resources, record.view)
        next(self._counts["local"])
        return Answer(decision.allowed, decision.reason, Source.LOCAL, age, decision)

    def _server_answer(self, response: httpx.Response) -> Answer:
        """The server's decision, or its refusal of this check (unknown org, bad request) as
        a deny. Raises httpx.HTTPError when there is no such answer: 5xx, a bad token, or a
        response that is not metergate's (a proxy with no route)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        refused = isinstance(body, dict) and isinstance(body.get("error"), dict)
        if response.status_code >= 500 or response.status_code == 401 or not (
                isinstance(body, dict) and ("allowed" in body or refused)):
            raise httpx.HTTPError(f"no gate answer from the server (status {response.status_code})")
        if "allowed" not in body:
            next(self._counts["server"])
            return Answer(False, str(body["error"].get("code", "error")), Source.SERVER, 0.0)
        fields = {name: body[name] for name in Decision.__struct_fields__ if name in body}
        decision = msgspec.convert(fields, Decision)
        next(self._counts["server"])
        return Answer(decision.allowed, decision.reason, Source.SERVER, 0.0, decision)

    def _by_policy(self, org_id: str, action: str) -> Answer:
        record = self.projection.get(org_id)
        age = self.projection.age_s(record.shard) if record is not None else float("inf")
        allowed = self.policies[action] is Policy.OPEN
        next(self._counts["policy_open" if allowed else "policy_closed"])
        return Answer(allowed, "unavailable", Source.POLICY, age)

    # ----- leases and usage (always the server) --------------------------------------------

    def lease(self, org_id: str, lease_id: str, resources: Resources | None = None, ttl_s: int = 60) -> dict:
        """POST /v1/leases: the lease (201 new, 200 the same again) or the deny, as JSON, with
        "status". The org's view in the answer is applied at once."""
        return self._leased(self._http.post("/v1/leases", json=_lease_body(org_id, lease_id, resources, ttl_s)))

    async def alease(self, org_id: str, lease_id: str, resources: Resources | None = None, ttl_s: int = 60) -> dict:
        return self._leased(await self._async_http().post(
            "/v1/leases", json=_lease_body(org_id, lease_id, resources, ttl_s)))

    def renew(self, org_id: str, lease_id: str) -> dict:
        return self._leased(self._http.post(f"/v1/leases/{org_id}/{lease_id}/renew"))

    async def arenew(self, org_id: str, lease_id: str) -> dict:
        return self._leased(await self._async_http().post(f"/v1/leases/{org_id}/{lease_id}/renew"))

    def release(self, org_id: str, lease_id: str) -> dict:
        return self._leased(self._http.delete(f"/v1/leases/{org_id}/{lease_id}"))

    async def arelease(self, org_id: str, lease_id: str) -> dict:
        return self._leased(await self._async_http().delete(f"/v1/leases/{org_id}/{lease_id}"))

    def report(self, ticks: list[dict]) -> dict:
        """POST /v1/usage: {accepted, duplicates, rejected} once the ticks are durable."""
        return self._json(self._http.post("/v1/usage", json={"ticks": ticks}))

    async def areport(self, ticks: list[dict]) -> dict:
        return self._json(await self._async_http().post("/v1/usage", json={"ticks": ticks}))

    def _leased(self, response: httpx.Response) -> dict:
        body = self._json(response)
        view = body.get("gate_view")
        if view is not None:
            self.projection.apply(msgspec.convert(view, ViewRecord))
        return body

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        body = response.json() if response.content else {}
        return {"status": response.status_code, **body} if isinstance(body, dict) else {"status": response.status_code}

    def _async_http(self) -> httpx.AsyncClient:
        # One per client, made on first use; httpx's async client may be shared by tasks of one loop.
        with self._alock:
            if self._ahttp is None:
                self._ahttp = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout)
            return self._ahttp

    # ----- the feed ---------------------------------------------------------------------

    def wait_synced(self, timeout_s: float = 30.0) -> bool:
        """Until the first snapshot is loaded and the feed has sent a heartbeat."""
        return self._synced.wait(timeout_s)

    def counters(self) -> dict[str, int]:
        """How many checks were answered locally, by the server and by policy (and why), and
        how the feed went: lines read, errors, resyncs and reconnects."""
        # itertools.count has no peek: its repr holds the next value.
        counts = {name: int(repr(counter)[6:-1]) for name, counter in self._counts.items()}
        counts["views"] = len(self.projection)
        return counts

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + self.heartbeat_s * 4 + 1)
        self._http.close()

    async def aclose(self) -> None:
        self.close()
        if self._ahttp is not None:
            await self._ahttp.aclose()

    def __enter__(self) -> GateClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _follow(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            beats = self._beats
            try:
                if self._cursor is None:
                    self._cursor = self._load_snapshot()
                if not self._read_feed():  # the server said resync
                    self._cursor = None
                    next(self._counts["resyncs"])
                    backoff = BACKOFF_S[0]
                    continue
            except (httpx.HTTPError, OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                if self._stop.is_set():
                    break
                if self._beats != beats:  # the stream worked before it broke: start over at 0.1 s
                    backoff = BACKOFF_S[0]
                next(self._counts["feed_errors"])
                log.info("metergate feed: %r; reconnecting in %.1f s", exc, backoff)
            next(self._counts["reconnects"])
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    def _load_snapshot(self) -> str:
        """Every org's view into a new projection, swapped in whole; returns the feed cursor."""
        fresh = Projection()
        page, cursor = None, None
        while True:
            response = self._http.get("/v1/gate/views", params={"limit": self.page_size,
                                                               **({"page": page} if page else {})})
            response.raise_for_status()
            body = PAGE_DECODER.decode(response.content)
            cursor = cursor or body.cursor
            for record in body.views:
                fresh.apply(record)
            if body.next is None:
                break
            page = body.next
        positions = parse_cursor(cursor)
        for shard, (epoch, seq) in enumerate(positions):
            fresh.advance(shard, epoch, seq, [])
        self.projection = fresh
        return cursor

    def _read_feed(self) -> bool:
        """Follow the feed from the cursor until it breaks (raises), the client closes (True)
        or the server says resync (False). Each heartbeat moves the cursor to resume from."""
        timeout = httpx.Timeout(self._timeout, read=max(self.heartbeat_s * 4, 1.0))
        params = {"after": self._cursor, "heartbeat_s": self.heartbeat_s}
        with self._http.stream("GET", "/v1/gate/feed", params=params, timeout=timeout) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if self._stop.is_set():
                    return True
                if not line:
                    continue
                message = FEED_DECODER.decode(line)
                next(self._counts["feed_lines"])
                projection = self.projection
                if isinstance(message, ViewRecord):
                    projection.advance(message.shard, message.epoch, message.seq, [message])
                elif isinstance(message, Heartbeat):
                    received = time.monotonic()
                    for shard, age_ms in enumerate(message.age_ms):
                        projection.heard(shard, received - age_ms / 1000, message.now_us)
                    self._cursor = message.cursor
                    self._beats += 1
                    self._synced.set()
                else:  # Resync
                    return False
        raise httpx.ReadError("the feed ended")


def _gate_body(org_id: str, action: str, resources: Resources | None) -> dict:
    body = {"org_id": org_id, "action": action}
    if resources is not None:
        body["resources"] = msgspec.to_builtins(resources)
    return body


def _lease_body(org_id: str, lease_id: str, resources: Resources | None, ttl_s: int) -> dict:
    body = _gate_body(org_id, "create", resources)
    del body["action"]
    return {**body, "lease_id": lease_id, "ttl_s": ttl_s}
