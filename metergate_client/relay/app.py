"""The relay's ASGI app: POST /v1/gate and /v1/gate/batch answered from a GateClient's
projection, GET /metrics from its counters, every other request forwarded to the server.

A gate check is answered `local` only when GateClient would answer it locally: the org's
view is current (its shard proved within the bound, in the shard's own time, that nothing
newer exists, and the view's valid_until_us is ahead). Otherwise the action's policy decides,
as GateClient's does: ask the server (with the bound, so the server does not answer from an
older view of its own), or deny or allow at once; with the server unreachable (or answering
5xx, or not metergate's answer) a `server` policy denies.

A check asking for a capability token (`"token": true`) is always asked of the server, which
alone holds the signing key; with no server answer it gets the relay's answer, without a token.

A gate request the relay does not answer itself (another token than the relay's, or none) is
forwarded unread, so the server's own refusals (401, 403) come back as they are. Forwarding
streams both ways and keeps the status, the body and every end-to-end header (Authorization,
Idempotency-Key, Prefer, Content-Type, ...); the GET /v1/gate/feed stream included.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import time
from http.cookiejar import CookieJar

import httpx
import msgspec

from metergate_client.client import Answer, GateClient, Policy
from metergate_client.relay.bodies import (
    BATCH_BODY_LIMIT_BYTES,
    GATE_BODY_LIMIT_BYTES,
    GATE_DECODER,
    UNAVAILABLE,
    GateBody,
    Refused,
    decision_fields,
    decode,
    decode_checks,
    resources_of,
    too_large,
)

log = logging.getLogger("metergate_client.relay")
ENCODE = msgspec.json.Encoder().encode
JSON = b"application/json"
LIMITS = {"/v1/gate": GATE_BODY_LIMIT_BYTES, "/v1/gate/batch": BATCH_BODY_LIMIT_BYTES}
# Hop-by-hop headers (RFC 9110 7.6.1) and those the relay's HTTP client sets itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host"})
RETRY_AFTER_S = b"1"
MAX_ENCODED = 100_000  # decisions whose encoding is kept (then all are dropped, and kept again)
FORWARD_TIMEOUT = httpx.Timeout(10.0, read=60.0)  # read: longer than any feed heartbeat


class NoCookies(CookieJar):
    """The forwarding client's cookie jar, which keeps nothing: one client forwards for every
    caller, and a cookie the server sets for one (the billing page's session) must never go
    with another's request. Each caller's own Cookie header is forwarded as it came."""

    def extract_cookies(self, response, request) -> None:
        return None

    def set_cookie(self, cookie) -> None:
        return None


def _end_to_end(headers) -> list[tuple[bytes, bytes]]:
    """The headers without the hop-by-hop ones: the fixed set, and those a Connection header
    names (RFC 9110 7.6.1)."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP and name.lower() not in named]


class Relay:
    def __init__(self, client: GateClient, token: str) -> None:
        """client: the GateClient whose projection and policies answer (its feed followed by
        itself, or a projection filled by hand in tests); token: the service token it holds,
        which a caller must also send for the relay to answer a gate check itself."""
        self.client = client
        self.url = client.url
        self.token = token
        self._accepted = f"Bearer {token}".encode()
        self._http: httpx.AsyncClient | None = None
        self._encoded: dict = {}  # Decision → its answer's encoded fields but the age ones
        self._counts = {name: itertools.count() for name in (
            "gate_requests", "gate_batch_requests", "refused", "forwarded", "forward_errors", "internal_errors")}

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            declared = self._gate_request(scope) if scope["method"] == "POST" and path in LIMITS else None
            if declared is not None:
                await self._gate(receive, send, path, declared)
            elif path == "/metrics" and scope["method"] == "GET":
                await _answer(send, 200, self.metrics().encode(), b"text/plain; version=0.0.4; charset=utf-8")
            else:
                await self._forward(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # ----- gate checks --------------------------------------------------------------------

    def _gate_request(self, scope) -> int | None:
        """A gate request the relay answers itself (with the relay's token, once): its declared
        body size (-1: none declared); else None (the server answers it, and its refusal)."""
        found, declared = None, -1
        for name, value in scope["headers"]:
            if name == b"authorization":
                if found is not None:
                    return None  # more than one: the server's 401 says so
                found = value
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        return declared if found is not None and hmac.compare_digest(found, self._accepted) else None

    async def _gate(self, receive, send, path: str, declared: int) -> None:
        try:
            body = await _read_body(receive, LIMITS[path], declared)
            if path == "/v1/gate":
                next(self._counts["gate_requests"])
                status, answer = await self._check(body)
            else:
                next(self._counts["gate_batch_requests"])
                status, answer = await self._batch(body)
        except Refused as exc:
            next(self._counts["refused"])
            await _answer(send, exc.status, ENCODE(exc.body()))
            return
        except Exception:  # noqa: BLE001 - a bug: logged whole, the caller gets the error shape
            next(self._counts["internal_errors"])
            log.exception("relay: %s", path)
            await _answer(send, 500, ENCODE({"error": {"code": "internal_error",
                                                       "message": "internal error in the relay; it has been logged"}}))
            return
        await _answer(send, status, answer if type(answer) is bytes else ENCODE(answer))

    async def _check(self, raw: bytes) -> tuple[int, dict | bytes]:
        check: GateBody = decode(GATE_DECODER, raw)
        answer, own = self._local(check)
        if answer is not None and not check.token:
            return 200, self._local_bytes(answer)
        if check.token or own is not None or self.client.policies[check.action] is Policy.SERVER:
            asked = await self._ask(check)
            if asked is not None:
                return asked
        # No server: the view the relay's bound (or its own) holds, never a looser policy; a
        # check that asked for a capability token gets none (only the server signs): cells refuse.
        kept = answer if answer is not None else own
        if kept is not None:
            return 200, self._local_bytes(kept)
        return 200, _policy_fields(self.client._by_policy(check.org_id, check.action))

    async def _batch(self, raw: bytes) -> tuple[int, dict]:
        checks = decode_checks(raw)
        decisions: list[dict | None] = [None] * len(checks)
        to_ask: list[tuple[int, GateBody]] = []
        for index, check in enumerate(checks):
            if isinstance(check, Refused):
                decisions[index] = check.item()
                continue
            answer, own = self._local(check)
            kept = answer if answer is not None else own
            if answer is not None and not check.token:
                decisions[index] = _local_fields(answer)
            elif check.token or own is not None or self.client.policies[check.action] is Policy.SERVER:
                to_ask.append((index, check))
                if kept is not None:
                    decisions[index] = _local_fields(kept)  # kept if the server does not answer
            else:
                decisions[index] = _policy_fields(self.client._by_policy(check.org_id, check.action))
        if to_ask:
            asked = await self._ask_batch([check for _, check in to_ask])
            for (index, check), decision in zip(to_ask, asked):
                if decision is not None:
                    decisions[index] = decision
                elif decisions[index] is None:
                    decisions[index] = _policy_fields(self.client._by_policy(check.org_id, check.action))
        return 200, {"decisions": decisions}

    def _local_bytes(self, answer: Answer) -> bytes:
        """_local_fields(answer), encoded: the decision's part once per decision (GateClient
        keeps one Decision object per org while its view, action and resources hold)."""
        decision = answer.decision
        prefix = self._encoded.get(decision)
        if prefix is None:
            if len(self._encoded) >= MAX_ENCODED:
                self._encoded.clear()
            fields = decision_fields(decision, 0.0)
            del fields["age_ms"]
            prefix = self._encoded[decision] = ENCODE(fields)[:-1]
        age_s = answer.age_s
        return b"%s,\"age_ms\":%d,\"source\":\"local\",\"age_s\":%s}" % (
            prefix, math.ceil(age_s * 1000), ENCODE(age_s))

    def _local(self, check: GateBody) -> tuple[Answer | None, Answer | None]:
        """(GateClient's local answer under the caller's bound too when it is the tighter, or
        None; the answer under the relay's own bound when only the caller's failed, else None).
        A caller asking for a fresher view gets the server's answer, or, without a server, the
        relay's own: never the policy's, which could allow what the view denies."""
        client = self.client
        if check.max_age_ms is not None and check.max_age_ms < client.max_staleness_s * 1000:
            if client.projection.current(check.org_id, check.max_age_ms / 1000) is None:
                next(client._counts["stale"])
                return None, client._local(check.org_id, check.action, resources_of(check))
        return client._local(check.org_id, check.action, resources_of(check)), None

    def _server_body(self, check: GateBody) -> dict:
        """The check as the server is asked it: with the tighter of the two bounds."""
        bound_ms = int(self.client.max_staleness_s * 1000)
        body = {"org_id": check.org_id, "action": check.action,
                "max_age_ms": bound_ms if check.max_age_ms is None else min(bound_ms, check.max_age_ms)}
        if check.resources is not None:
            body["resources"] = msgspec.to_builtins(check.resources)
        if check.token:
            body["token"] = True
        return body

    async def _ask(self, check: GateBody) -> tuple[int, dict] | None:
        """The server's answer (status, body), or None when there is none (GateClient's rule:
        unreachable, 5xx, 401, or not metergate's JSON)."""
        sent = time.monotonic()
        try:
            response = await self.http().post(self.url + "/v1/gate", content=ENCODE(self._server_body(check)),
                                              headers=self._headers(), timeout=self.client._timeout)
            answer = self.client._server_answer(response, sent)
        except (httpx.HTTPError, ValueError):  # ValueError: a decision this client cannot read
            return None
        body = response.json()
        if "allowed" not in body:
            return response.status_code, body  # a refusal of this check (unknown org): the server's
        return response.status_code, {**body, "source": "server", "age_s": answer.age_s}

    async def _ask_batch(self, checks: list[GateBody]) -> list[dict | None]:
        """Each check's server answer as a batch item, None where there is none."""
        sent = time.monotonic()
        nothing: list[dict | None] = [None] * len(checks)
        try:
            response = await self.http().post(
                self.url + "/v1/gate/batch", content=ENCODE({"checks": [self._server_body(c) for c in checks]}),
                headers=self._headers(), timeout=self.client._timeout)
            decisions = response.json().get("decisions") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return nothing
        if not isinstance(decisions, list) or len(decisions) != len(checks):
            return nothing
        round_trip_s = time.monotonic() - sent
        answers: list[dict | None] = []
        for decision in decisions:
            error = decision.get("error") if isinstance(decision, dict) else None
            if isinstance(decision, dict) and "allowed" in decision:
                stated = decision.get("age_ms")
                age_s = round_trip_s + (stated / 1000 if isinstance(stated, int) else 0.0)
                answers.append({**decision, "source": "server", "age_s": age_s})
            elif isinstance(error, dict) and isinstance(error.get("status"), int) and error["status"] < 500:
                answers.append(decision)
            else:
                answers.append(None)
                continue
            next(self.client._counts["server"])
        return answers

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    # ----- everything else: forwarded ------------------------------------------------------

    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            # The jar itself: httpx would copy a Cookies object's cookies into a plain jar.
            self._http = httpx.AsyncClient(timeout=FORWARD_TIMEOUT, follow_redirects=False, cookies=NoCookies(),
                                           limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        return self._http

    async def _forward(self, scope, receive, send) -> None:
        next(self._counts["forwarded"])
        headers = _end_to_end(scope["headers"])
        names = {name for name, _ in scope["headers"]}
        has_body = b"transfer-encoding" in names or any(
            name == b"content-length" and value != b"0" for name, value in scope["headers"])
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        # Only a path on metergate: a request line `GET @host/x` (which a pure-Python HTTP
        # parser lets through) would otherwise make the URL's authority another host's.
        if not target.startswith("/"):
            next(self._counts["refused"])
            await _answer(send, 400, ENCODE({"error": {"code": "invalid_request",
                                                       "message": "the request target must be a path"}}))
            return
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        http = self.http()
        try:
            request = http.build_request(scope["method"], self.url + target, headers=headers,
                                         content=_body_of(receive) if has_body else None)
        except httpx.InvalidURL as exc:
            next(self._counts["refused"])
            await _answer(send, 400, ENCODE({"error": {"code": "invalid_request", "message": f"bad target: {exc}"}}))
            return
        try:
            response = await http.send(request, stream=True)
        except httpx.HTTPError as exc:
            next(self._counts["forward_errors"])
            payload = ENCODE({"error": {"code": "server_unreachable",
                                        "message": f"the relay could not reach metergate at {self.url}: {exc!r}"}})
            await _answer(send, 503, payload, extra=[(b"retry-after", RETRY_AFTER_S)])
            return
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _end_to_end(response.headers.raw)})
            try:
                async for chunk in response.aiter_raw():
                    if watch.done():  # the caller went away: stop following (a feed never ends)
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError:
                next(self._counts["forward_errors"])  # the server broke off: so does this answer
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.cancel()
            await response.aclose()

    # ----- lifespan and metrics ---------------------------------------------------------

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.http()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._http is not None:
                    await self._http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def counters(self) -> dict[str, int]:
        """The relay's own counts (requests, refusals, forwards) and its GateClient's."""
        own = {name: int(repr(counter)[6:-1]) for name, counter in self._counts.items()}
        return {**self.client.counters(), **own}

    def metrics(self) -> str:
        """The counters in Prometheus' text format (version 0.0.4)."""
        counts = self.counters()
        lines = ["# HELP metergate_relay_checks_total Gate checks answered, by where the answer came from.",
                 "# TYPE metergate_relay_checks_total counter"]
        for source in ("local", "server", "policy_open", "policy_closed"):
            lines.append(f'metergate_relay_checks_total{{source="{source}"}} {counts[source]}')
        for name, help_text in (
                ("stale", "Checks that found no current view of the org."),
                ("gate_requests", "POST /v1/gate requests the relay answered itself."),
                ("gate_batch_requests", "POST /v1/gate/batch requests the relay answered itself."),
                ("refused", "Gate requests refused as the server would (bad JSON, bad fields, too large)."),
                ("forwarded", "Requests forwarded to the server."),
                ("forward_errors", "Forwarded requests the server could not be reached for, or broke off."),
                ("internal_errors", "Gate requests that met a bug of the relay (logged)."),
                ("feed_lines", "Feed lines read."), ("feed_errors", "Feed connections that failed."),
                ("resyncs", "Resyncs the feed asked for."), ("reconnects", "Feed reconnections."),
                ("snapshots", "Shard snapshots loaded."), ("snapshot_errors", "Shard snapshot loads that failed.")):
            lines += [f"# HELP metergate_relay_{name}_total {help_text}", f"# TYPE metergate_relay_{name}_total counter",
                      f"metergate_relay_{name}_total {counts[name]}"]
        lines += ["# HELP metergate_relay_views Org views held.", "# TYPE metergate_relay_views gauge",
                  f"metergate_relay_views {counts['views']}",
                  "# HELP metergate_relay_max_staleness_seconds The bound past which no answer is local.",
                  "# TYPE metergate_relay_max_staleness_seconds gauge",
                  f"metergate_relay_max_staleness_seconds {self.client.max_staleness_s}",
                  "# HELP metergate_relay_shard_age_seconds How old the relay's knowledge of each shard's views is "
                  "(+Inf: none current).", "# TYPE metergate_relay_shard_age_seconds gauge"]
        projection = self.client.projection
        for shard in sorted(set(projection.positions()) | set(projection._clocks)):
            age = projection.age_s(shard)
            lines.append(f'metergate_relay_shard_age_seconds{{shard="{shard}"}} '
                         f'{"+Inf" if math.isinf(age) else f"{age:.6f}"}')
        return "\n".join(lines) + "\n"


def _local_fields(answer: Answer) -> dict:
    fields = decision_fields(answer.decision, answer.age_s)
    fields["source"] = "local"
    fields["age_s"] = answer.age_s
    return fields


def _policy_fields(answer: Answer) -> dict:
    """No decision: the action's policy's. `age_s` of the view held, null when none."""
    return {"allowed": answer.allowed, "reason": UNAVAILABLE, "status": 200 if answer.allowed else 503,
            "source": "policy", "age_s": None if math.isinf(answer.age_s) else answer.age_s}


async def _read_body(receive, limit: int, declared: int) -> bytes:
    """The whole body, refused (413) as soon as its declared or read size passes `limit`."""
    if declared > limit:
        raise too_large(limit)
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] != "http.request":
            raise Refused(400, "invalid_json", "the request body ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _body_of(receive):
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
        if message.get("body"):
            yield message["body"]


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send, status: int, body: bytes, content_type: bytes = JSON, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
