"""GateClient: gate decisions in the gateway's own process, from a live projection.

A background thread follows the feed (GET /v1/gate/feed), reconnecting with backoff, and a
second one loads a shard's views (GET /v1/gate/views?shard=) whenever the feed says that shard
must be loaded (at the start, after the shard restarted): a shard that is down or reloading
leaves every other shard's orgs decided locally. `check()` decides from the org's view with
the same pure function the server uses, so a current view gives exactly the server's answer.
A view is current while its shard's feed has proved, within `max_staleness_s` of the shard's
own time now, that nothing newer exists, and while that time is before the view's
`valid_until_us` (a shard's time is read through a per-shard estimate of its clock, never
this host's wall clock: docs/gate-protocol.md). Otherwise the action's Policy says what to
do: ask the server (with the same bound), fail closed, or fail open.

Leases and usage always go to the server (a lease is atomic at the org's shard); a lease
answer, a release's included, carries the org's new view, which is applied at once.

Sync and asyncio: `check` never blocks unless the policy asks the server; `acheck`,
`alease`, `arenew`, `arelease` and `areport` are the asyncio forms. Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from enum import StrEnum

import httpx
import msgspec

from metergate_client.decision import ACTIONS, NO_RESOURCES, Decision, Resources, decide, resources_from
from metergate_client.projection import (
    Heartbeat,
    Position,
    Projection,
    Resync,
    ViewRecord,
    mono_us,
    parse_cursor,
    read_feed_line,
    read_page,
    read_record,
)

log = logging.getLogger("metergate_client")
WITH_VIEW = {"Prefer": "return=representation"}  # a release answers 200 with the org's view, not 204
BACKOFF_S = (0.1, 5.0)  # reconnect backoff: first, at most
CLOCK_PROBE_S = 2.0  # how often the shards' clocks are timed by a round trip


class ClockAnswer(msgspec.Struct):
    now_us: list[int | None]


CLOCK_DECODER = msgspec.json.Decoder(ClockAnswer)


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
    it: locally, in the shard's time; for the server's answer, the age the server stated plus
    the request's round trip; inf when there was no view. `decision`: the full decision (None
    when the policy decided); `reason` is its reason, or "unavailable"."""

    allowed: bool
    reason: str
    source: Source
    age_s: float
    decision: Decision | None = None


class GateClient:
    def __init__(self, url: str, token: str, max_staleness_s: float = 1.0,
                 policies: dict[str, Policy | str] | None = None, default_policy: Policy | str = Policy.SERVER,
                 timeout_s: float = 5.0, heartbeat_s: float = 0.25, page_size: int = 1000,
                 orgs: str | Collection[str] | Callable[[str], bool] | None = None, start: bool = True) -> None:
        """policies: per action ("create", "wake", "ingest", "purchase"); the others get
        default_policy. E.g. {"ingest": "open", "create": "closed"}. heartbeat_s: how often
        the feed proves itself current; keep it well under max_staleness_s. orgs: which orgs
        to follow (None: all): a string is an org id prefix, filtered by the server (only
        those views are sent); a collection of org ids or a predicate on the org id is
        applied here (every view is sent, only those are kept). An org not followed is
        answered by its action's policy."""
        unknown = set(policies or ()) - set(ACTIONS)
        if unknown:
            raise ValueError(f"no such action: {sorted(unknown)}; actions are {ACTIONS}")
        self.url = url.rstrip("/")
        self.max_staleness_s = max_staleness_s
        self.policies = {action: Policy((policies or {}).get(action, default_policy)) for action in ACTIONS}
        self.heartbeat_s = heartbeat_s
        self.page_size = page_size
        self._prefix = orgs if isinstance(orgs, str) else ""
        self.projection = Projection(_wanted(orgs))
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout_s
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout_s)
        self._ahttp: httpx.AsyncClient | None = None
        self._alock = threading.Lock()
        self._stop = threading.Event()
        self._cursor: str | None = None  # where the feed resumes (None: from now, every shard to load)
        self._beats = 0  # heartbeats read, ever
        self._synced = threading.Event()
        # shard → the feed position its loaded snapshot holds (written by the loader thread,
        # read by the feed thread): a shard is current only from a heartbeat past it.
        self._loaded: dict[int, tuple[int, int]] = {}
        # shard → the number of its latest load: a load that finishes after a newer one was
        # asked for (the shard resynced meanwhile) leaves no mark. One thread per shard loading.
        self._generation: dict[int, int] = {}
        self._loaders: dict[int, threading.Thread] = {}
        self._load_lock = threading.Lock()
        self._loading: set[int] = set()
        self._counts = {name: itertools.count() for name in (
            "local", "server", "policy_open", "policy_closed", "stale", "feed_lines", "feed_errors", "resyncs",
            "reconnects", "snapshots", "snapshot_errors")}
        self._local_count = self._counts["local"]
        self._decided: dict[str, tuple] = {}  # org → (record, action, resources, decision): the last one
        self._thread = threading.Thread(target=self._follow, name="metergate-feed", daemon=True)
        self._clock_thread = threading.Thread(target=self._time_clocks, name="metergate-clock", daemon=True)
        if start:
            self._clock_thread.start()
            self._thread.start()

    # ----- gate checks ------------------------------------------------------------------

    def check(self, org_id: str, action: str, resources: Resources | Mapping | None = None) -> Answer:
        """May the org do `action` now? Decided locally when its view is current, else by the
        action's policy (which may ask the server: then this call blocks for that request).
        `resources`: a Resources, or a mapping with the HTTP body's field names."""
        if type(resources) is not Resources:
            resources = _resources(resources)
        answer = self._local(org_id, action, resources)
        if answer is not None:
            return answer
        if not _is_checked(resources):  # no policy answers what no request could ask (BadResources)
            _check(resources)
        if self.policies[action] is Policy.SERVER:
            sent = time.monotonic()
            try:
                return self._server_answer(
                    self._http.post("/v1/gate", json=self._gate_body(org_id, action, resources)), sent)
            except httpx.HTTPError:
                pass
        return self._by_policy(org_id, action)

    async def acheck(self, org_id: str, action: str, resources: Resources | Mapping | None = None) -> Answer:
        resources = _resources(resources)
        answer = self._local(org_id, action, resources)
        if answer is not None:
            return answer
        if not _is_checked(resources):
            _check(resources)
        if self.policies[action] is Policy.SERVER:
            sent = time.monotonic()
            try:
                return self._server_answer(await self._async_http().post(
                    "/v1/gate", json=self._gate_body(org_id, action, resources)), sent)
            except httpx.HTTPError:
                pass
        return self._by_policy(org_id, action)

    def _local(self, org_id: str, action: str, resources: Resources) -> Answer | None:
        # Projection.current(), inlined: this runs before every action of every gateway.
        projection = self.projection
        record = projection._records.get(org_id)
        if record is not None:
            fresh = projection._fresh.get(record.shard)
            if fresh is not None:
                heard, offset = fresh
                now = time.monotonic_ns() // 1000 + offset
                age = (now - heard) / 1e6
                until = record.valid_until_us
                if age <= self.max_staleness_s and (until is None or now < until):
                    # A decision is a pure function of the record, the action and the
                    # resources: the last one per org is kept while all three are the same.
                    known = self._decided.get(org_id)
                    if known is not None and known[0] is record and known[1] == action and (
                            known[2] is resources or _same(known[2], resources)):
                        decision = known[3]
                    else:
                        if action not in self.policies:
                            raise ValueError(f"no such action: {action!r}; actions are {ACTIONS}")
                        if not _is_checked(resources):  # refused as the server would: BadResources
                            _check(resources)
                        decision = decide(action, resources, record.view)
                        self._decided[org_id] = (record, action, resources, decision)
                    next(self._local_count)
                    return Answer(decision.allowed, decision.reason, Source.LOCAL, age if age > 0 else 0.0, decision)
            next(self._counts["stale"])
        if action not in self.policies:
            raise ValueError(f"no such action: {action!r}; actions are {ACTIONS}")
        return None

    def _gate_body(self, org_id: str, action: str, resources: Resources) -> dict:
        # The server decides from its own views only while they are within our bound.
        return {**_gate_body(org_id, action, resources), "max_age_ms": int(self.max_staleness_s * 1000)}

    def _server_answer(self, response: httpx.Response, sent: float) -> Answer:
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
        stated = body.get("age_ms")
        age = time.monotonic() - sent + (stated / 1000 if isinstance(stated, int) else 0.0)
        next(self._counts["server"])
        if "allowed" not in body:
            return Answer(False, str(body["error"].get("code", "error")), Source.SERVER, age)
        fields = {name: body[name] for name in Decision.__struct_fields__ if name in body}
        decision = msgspec.convert(fields, Decision)
        return Answer(decision.allowed, decision.reason, Source.SERVER, age, decision)

    def _by_policy(self, org_id: str, action: str) -> Answer:
        record = self.projection.get(org_id)
        age = self.projection.age_s(record.shard) if record is not None else float("inf")
        allowed = self.policies[action] is Policy.OPEN
        next(self._counts["policy_open" if allowed else "policy_closed"])
        return Answer(allowed, "unavailable", Source.POLICY, age)

    # ----- leases and usage (always the server) --------------------------------------------

    def lease(self, org_id: str, lease_id: str, resources: Resources | Mapping | None = None, ttl_s: int = 60) -> dict:
        """POST /v1/leases: the lease (201 new, 200 the same again) or the deny, as JSON, with
        "status". The org's view in the answer is applied at once."""
        return self._leased(self._http.post("/v1/leases", json=_lease_body(org_id, lease_id, _resources(resources),
                                                                            ttl_s)))

    async def alease(self, org_id: str, lease_id: str, resources: Resources | Mapping | None = None,
                     ttl_s: int = 60) -> dict:
        return self._leased(await self._async_http().post(
            "/v1/leases", json=_lease_body(org_id, lease_id, _resources(resources), ttl_s)))

    def renew(self, org_id: str, lease_id: str) -> dict:
        return self._leased(self._http.post(f"/v1/leases/{org_id}/{lease_id}/renew"))

    async def arenew(self, org_id: str, lease_id: str) -> dict:
        return self._leased(await self._async_http().post(f"/v1/leases/{org_id}/{lease_id}/renew"))

    def release(self, org_id: str, lease_id: str) -> dict:
        """DELETE /v1/leases/...: {"status": 200, "gate_view": ...}; the view is applied at once."""
        return self._leased(self._http.delete(f"/v1/leases/{org_id}/{lease_id}", headers=WITH_VIEW))

    async def arelease(self, org_id: str, lease_id: str) -> dict:
        return self._leased(await self._async_http().delete(f"/v1/leases/{org_id}/{lease_id}", headers=WITH_VIEW))

    def report(self, ticks: list[dict]) -> dict:
        """POST /v1/usage: {accepted, duplicates, rejected} once the ticks are durable."""
        return self._json(self._http.post("/v1/usage", json={"ticks": ticks}))

    async def areport(self, ticks: list[dict]) -> dict:
        return self._json(await self._async_http().post("/v1/usage", json={"ticks": ticks}))

    def _leased(self, response: httpx.Response) -> dict:
        body = self._json(response)
        view = body.get("gate_view")
        if view is not None:
            record = read_record(view)  # one this client cannot read stands in the org's order (8.1)
            if record is not None:
                self.projection.apply(record)
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
        """Until every shard's views are loaded and current (a heartbeat past its snapshot,
        within the staleness bound), or timeout_s passed (False)."""
        return self._synced.wait(timeout_s)

    def counters(self) -> dict[str, int]:
        """How many checks were answered locally, by the server and by policy (and why), and
        how the feed went: lines read, errors, resyncs, reconnects and shard snapshots."""
        # itertools.count has no peek: its repr holds the next value.
        counts = {name: int(repr(counter)[6:-1]) for name, counter in self._counts.items()}
        counts["views"] = len(self.projection)
        return counts

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + self._timeout + self.heartbeat_s * 4 + 1
        with self._load_lock:
            loaders = list(self._loaders.values())
        for thread in (self._thread, self._clock_thread, *loaders):
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
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
                if not self._read_feed():  # the cursor is not one of this server's
                    self._cursor = None
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

    def _read_feed(self) -> bool:
        """Follow the feed from the cursor until it breaks (raises), the client closes (True)
        or the server says the cursor is not one of its own (False)."""
        timeout = httpx.Timeout(self._timeout, read=max(self.heartbeat_s * 4, 1.0))
        params = {"heartbeat_s": self.heartbeat_s, **({"after": self._cursor} if self._cursor else {}),
                  **({"prefix": self._prefix} if self._prefix else {})}
        with self._http.stream("GET", "/v1/gate/feed", params=params, timeout=timeout) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if self._stop.is_set():
                    return True
                if not line:
                    continue
                message = read_feed_line(line)
                next(self._counts["feed_lines"])
                if isinstance(message, ViewRecord):
                    self.projection.advance(message.shard, message.epoch, message.seq, [message])
                elif isinstance(message, Heartbeat):
                    self._heartbeat(message)
                elif message.shard is None:  # a resync of the whole stream
                    next(self._counts["resyncs"])
                    return False
                else:
                    self._resync(message)
        raise httpx.ReadError("the feed ended")

    def _heartbeat(self, beat: Heartbeat) -> None:
        """Each shard's clock, and each loaded shard proved current as of the time it states.
        A shard without a snapshot (a resumed stream after this client lost it) is loaded."""
        received = mono_us()
        projection = self.projection
        positions = parse_cursor(beat.cursor)
        current = 0
        for shard, (position, shard_now, as_of) in enumerate(zip(positions, beat.now_us, beat.as_of_us)):
            if shard_now is not None:
                projection.clock(shard, shard_now, received)
            loaded = self._loaded.get(shard)
            if as_of is not None and _covers(position, loaded):
                projection.heard(shard, as_of)
                current += projection.age_s(shard) <= self.max_staleness_s
            elif position is not None and shard not in self._loading and (loaded is None or position[0] != loaded[0]):
                # None loaded (a resumed stream), or of an incarnation the feed is past. (A
                # shard with no position yet gets its own resync line: nothing to do here.)
                self._load(shard)
        self._cursor = beat.cursor
        self._beats += 1
        if positions and current == len(positions):
            self._synced.set()

    def _resync(self, message: Resync) -> None:
        """The shard's views must be loaded again; the stream goes on with its new records."""
        shard = message.shard
        next(self._counts["resyncs"])
        if message.epoch is not None:
            # Every record of the shard goes: what was missed is unknown (a restart, or records
            # the server's log dropped), and a record kept could win over the snapshot's.
            self.projection.reset(shard, message.epoch, 0, every=True)
        else:
            self.projection.forget_heard(shard)
        self._load(shard)  # also when a load is on the way: it may be of what is gone

    def _load(self, shard: int) -> None:
        """Load the shard's views (again), on a thread of its own: a shard that cannot be
        reached holds up no other's. A newer load makes an older one's result void; until one
        is done the shard has no loaded snapshot, so no heartbeat makes it current."""
        with self._load_lock:
            self._generation[shard] = self._generation.get(shard, 0) + 1
            self._loaded.pop(shard, None)
            self._loading.add(shard)
            if shard not in self._loaders:
                self._loaders[shard] = loader = threading.Thread(
                    target=self._load_shard, args=(shard,), name=f"metergate-views-{shard}", daemon=True)
                loader.start()

    def _load_shard(self, shard: int) -> None:
        """A loader thread: the shard's views, until a load of its latest generation is done
        (with backoff while the shard cannot answer). However it ends, it leaves no mark that
        would keep another from starting."""
        backoff = BACKOFF_S[0]
        try:
            while not self._stop.is_set():
                generation = self._generation[shard]
                try:
                    position = self._load_snapshot(shard, generation)
                except _Superseded:
                    continue
                except Exception as exc:  # noqa: BLE001 - a loader must go on (or the shard is never loaded)
                    if self._stop.is_set():
                        return
                    next(self._counts["snapshot_errors"])
                    log.info("metergate views of shard %s: %r; again in %.1f s", shard, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_S[1])
                    continue
                next(self._counts["snapshots"])
                with self._load_lock:
                    if self._generation[shard] == generation:  # (else asked again meanwhile: load again)
                        self._loaded[shard] = position
                        self._loading.discard(shard)
                        # Unregistered in the same hold of the lock: a load asked for once it is
                        # released starts a loader of its own (else it would wait for this one).
                        self._loaders.pop(shard, None)
                        return
        finally:
            with self._load_lock:
                if self._loaders.get(shard) is threading.current_thread():
                    del self._loaders[shard]

    def _time_clocks(self) -> None:
        """The clock thread: a timed GET /v1/gate/clock every CLOCK_PROBE_S (see ShardClock);
        a shard whose clock no round trip bounded lately is not current."""
        while True:
            self._probe_clocks()
            self.projection.expire_clocks()
            if self._stop.wait(CLOCK_PROBE_S):
                return

    def _probe_clocks(self) -> None:
        sent = mono_us()
        try:
            response = self._http.get("/v1/gate/clock")
            response.raise_for_status()
            stated = CLOCK_DECODER.decode(response.content).now_us
        except (httpx.HTTPError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.info("metergate clock probe: %r", exc)
            return
        received = mono_us()
        for shard, shard_us in enumerate(stated):
            if shard_us is not None:
                self.projection.clock(shard, shard_us, received, sent)

    def _load_snapshot(self, shard: int, generation: int) -> tuple[int, int]:
        """One shard's views into the projection, page by page; the feed position they hold.
        _Superseded when a newer load was asked for meanwhile (or the client closes)."""
        page, cursor = None, None
        while True:
            if self._stop.is_set() or self._generation[shard] != generation:
                raise _Superseded
            response = self._http.get("/v1/gate/views", params={
                "shard": shard, "limit": self.page_size, **({"page": page} if page else {}),
                **({"prefix": self._prefix} if self._prefix else {})})
            response.raise_for_status()
            body = read_page(response.content)
            cursor = cursor or body.cursor
            self.projection.apply_all(body.views)
            if body.next is None:
                break
            page = body.next
        (position,) = parse_cursor(cursor)
        if position is None:
            raise ValueError(f"shard {shard}'s snapshot has no position")
        return position


def _wanted(orgs: str | Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    if orgs is None:
        return None
    if isinstance(orgs, str):
        return lambda org_id: org_id.startswith(orgs)
    if callable(orgs):
        return orgs
    return frozenset(orgs).__contains__


class _Superseded(Exception):
    """A load of a shard's views that a newer one (or the client's close) made void."""


def _covers(position: Position, loaded: tuple[int, int] | None) -> bool:
    """Has the feed reached the shard's loaded snapshot (the same incarnation, not behind)?"""
    return position is not None and loaded is not None and position[0] == loaded[0] and position[1] >= loaded[1]


def _resources(resources: Resources | Mapping | None) -> Resources:
    """The resources a check or lease sends: a Resources instance is taken as it is (it is
    checked when a decision is first made from it, `_local`), anything else is converted."""
    if resources is None or type(resources) is Resources:
        return NO_RESOURCES if resources is None else resources
    return resources_from(resources)


# Resources instances already checked. Bounded: a gateway uses a few shapes; one that uses
# many starts over now and then (clear() is one step under the GIL, safe across threads).
# Keyed by value, the instance checked kept: `True == 1 == 1.0` in Python, so an equal
# instance counts only with the same types in every field (a hand-made quantity=True is
# checked, and refused, on its own).
_checked: dict[Resources, Resources] = {}
_CHECKED_MAX = 4096


def _same(known: Resources, resources: Resources) -> bool:
    """Equal, and equal in type field by field (so never True standing for 1)."""
    return known == resources and all(
        type(a) is type(b) for a, b in zip(msgspec.structs.astuple(known), msgspec.structs.astuple(resources)))


def _is_checked(resources: Resources) -> bool:
    known = _checked.get(resources)
    return known is resources or (known is not None and _same(known, resources))


def _check(resources: Resources) -> None:
    resources_from(resources)
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    _checked[resources] = resources


def _gate_body(org_id: str, action: str, resources: Resources) -> dict:
    body = {"org_id": org_id, "action": action}
    if resources is not NO_RESOURCES:
        body["resources"] = msgspec.to_builtins(resources)
    return body


def _lease_body(org_id: str, lease_id: str, resources: Resources, ttl_s: int) -> dict:
    body = _gate_body(org_id, "create", resources)
    del body["action"]
    return {**body, "lease_id": lease_id, "ttl_s": ttl_s}
