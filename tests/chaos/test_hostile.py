"""Hostile input against the running service (issue 11, part 4): whatever a caller, a forger or
a broken client sends, the answer is never a 5xx nor a trace, a refused request changes
nothing (footprint() and the org's state, for the org it names and for a bystander org), and
no answer carries another org's data.

Not repeated here (see those files): malformed JSON, wrong types, first bounds and the
10,001-tick batch (test_bad_input), invalid UTF-8, deep nesting, NUL in stored text and
signed checkouts with impossible amounts (test_hostile_input), random bodies
(test_fuzz_http), schema-driven cases (test_openapi_fuzz), the plain bad deliveries of each
webhook (test_webhooks_*), org A's token on most of org B's JSON routes (test_org_tokens).

Here: every signature header of both webhooks bent, valid signatures over hostile bodies of
every handled event type, JSON number extremes on every route that takes a number, epochs
in the wrong unit and RFC 3339 oddities, unicode and control characters in ids (bodies and
paths), body sizes at and past each limit and lying Content-Lengths, 100,000- and
10,000-tick batches, slow clients that never finish, and org tokens on every org-scoped
route of the OpenAPI document. Each test counts the inputs it sent; run with -s to read
the counts. The shared test clock is never moved here.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import httpx
import pytest
import stripe

from serve_app.auth import OrgTokens
from serve_app.haproxy_front import HEADERS_WITHIN_S
from serve_app.launch import CLIENT_SILENT_AT_MOST_S
from tests.helpers import (
    ADMIN_TOKEN,
    STRIPE_WEBHOOK_SECRET,
    TICK_MICROS,
    clock_us,
    footprint,
    ledger_sum,
    mint,
    stripe_event,
    svix_headers,
)

TRIED: Counter = Counter()  # inputs sent, per test: the closing note of the issue quotes them
OTHER_SVIX_SECRET = "whsec_" + "b3RoZXItc2VjcmV0LW9mLWVub3VnaC1sZW5ndGgh"
S_MIN, S_MAX = 946_684_800, 4_102_444_800  # the plausible window (2000 .. 2100), actors/timeutil.py
MIB = 1024 * 1024
UNIT_SCALES = (1, 1_000, 1_000_000, 1_000_000_000)  # an epoch in s, ms, µs, ns
BILLING_FORMS = ("topup", "setup", "tier", "portal", "auto-recharge")  # POST /billing/{org_id}/..., not in OpenAPI


# ----- the checks every answer passes ---------------------------------------------------------


@dataclass
class Guard:
    """Sends nothing itself: checks each answer and counts it, and proves that a block of
    refused requests changed nothing for the target org nor for the bystander."""

    sql: object
    admin: httpx.Client
    target: str
    bystander: str
    tried: int = 0

    def answer(self, response: httpx.Response, what: object) -> httpx.Response:
        self.tried += 1
        text = response.text
        assert response.status_code < 500, (what, response.status_code, text[:400])
        assert "Traceback" not in text and 'File "/' not in text, (what, text[:400])
        # The bystander is named by no request here: its id (and so its email) in an answer is a leak.
        assert self.bystander not in text, (what, "the bystander's data is in the answer", text[:400])
        if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/json"):
            error = response.json()["error"]
            assert isinstance(error["code"], str) and error["code"], (what, text[:400])
            assert isinstance(error["message"], str) and error["message"], (what, text[:400])
        return response

    def refused(self, response: httpx.Response, what: object, code: str | None = None, field: str | None = None,
                by_proxy: bool = False) -> httpx.Response:
        """A 4xx with the API's error shape (naming the field when a field was at fault). With
        by_proxy, the proxy in front (HAProxy) may refuse first, with its own 4xx page."""
        self.answer(response, what)
        assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:400])
        if by_proxy and not response.headers.get("content-type", "").startswith("application/json"):
            return response
        error = response.json()["error"]
        if code is not None:
            assert error["code"] == code, (what, response.text[:400])
        if field is not None and error["code"] == "invalid_request":
            assert field in response.text, (what, "the error does not name the field", response.text[:400])
        return response

    def snapshot(self, *orgs: str) -> dict:
        states = {org: self.admin.get(f"/v1/orgs/{org}") for org in (orgs or (self.target, self.bystander))}
        assert all(state.status_code == 200 for state in states.values()), states
        return {org: (footprint(self.sql, org), state.json()) for org, state in states.items()}

    @contextmanager
    def unchanged(self, *orgs: str):
        """Everything inside is refused: the ledger, outbox, usage rollups and state of the
        orgs (target and bystander by default) are what they were before."""
        before = self.snapshot(*orgs)
        yield
        assert self.snapshot(*orgs) == before


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    total = sum(TRIED.values())
    parts = ", ".join(f"{name} {count}" for name, count in TRIED.items())
    print(f"\nhostile: {total} inputs tried in {len(TRIED)} tests ({parts})")


@pytest.fixture
def guard(request, sql, admin, new_org):
    checks = Guard(sql, admin, new_org(), new_org())
    yield checks
    TRIED[request.node.name] += checks.tried
    print(f"\nhostile: {checks.tried} inputs in {request.node.name}")


@pytest.fixture(scope="module")
def anon(service):
    """No token: webhooks authenticate by signature."""
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(anon) -> dict:
    return anon.get("/openapi.json").json()


def small_tick(org: str, tick_id: str, **fields) -> dict:
    """1 GiB for 10 s: TICK_MICROS (45 µUSD) on payg, no remainder."""
    return {"tick_id": tick_id, "org_id": org, "started_at": int(time.time()), "duration_ms": 10_000,
            "memory_mb": 1024, **fields}


# ----- signing (the real stripe and svix libraries) and raw sockets ----------------------------


def stripe_header(payload: bytes, at: int | None = None, secret: str = STRIPE_WEBHOOK_SECRET) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload.decode(), secret,
                                                             timestamp=int(time.time()) if at is None else at)


def stripe_v1(payload: bytes, at: int, secret: str = STRIPE_WEBHOOK_SECRET) -> str:
    return stripe_header(payload, at, secret).split(",v1=")[1]


def address(service) -> tuple[str, int]:
    url = httpx.URL(service.base_url)
    return url.host, url.port


def raw_request(method: str, path: str, token: str, body: bytes = b"", headers: tuple[str, ...] = (),
                close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def raw_exchange(service, data: bytes, half_close: bool = False, wait_s: float = 5.0) -> bytes:
    """Send bytes as they are (no client library fixes them up) and read what comes back
    until the service closes or wait_s passes."""
    received = b""
    with socket.create_connection(address(service), timeout=wait_s) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return received


def statuses(received: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"^HTTP/1\.[01] (\d{3})", received, flags=re.M)]


def assert_raw_refused(received: bytes, what: object) -> None:
    """What a raw exchange got: a 4xx, or nothing at all (the service closed); never a 2xx or 5xx."""
    codes = statuses(received)
    assert all(400 <= code < 500 for code in codes), (what, received[:400])
    assert b"Traceback" not in received, (what, received[:400])


def with_value(obj: dict, path: tuple, value: object) -> dict:
    changed = copy.deepcopy(obj)
    holder = changed
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return changed


# ----- webhooks: the signature headers ---------------------------------------------------------


def test_stripe_signature_headers_missing_doubled_garbage_or_oversized_apply_nothing(guard, anon):
    org = guard.target
    session = {"id": f"cs_{uuid.uuid4().hex[:12]}", "object": "checkout.session", "mode": "payment",
               "payment_status": "paid", "amount_total": 100, "payment_intent": f"pi_{uuid.uuid4().hex[:12]}",
               "client_reference_id": org, "metadata": {"org_id": org}}
    payload = json.dumps(stripe_event("checkout.session.completed", session)).encode()
    now = int(time.time())
    good = stripe_v1(payload, now)
    year_s = 365 * 86_400
    single = {
        "empty": "", "garbage": "garbage", "only commas": ",,,,", "empty parts": "t=,v1=",
        "no timestamp": f"v1={good}", "no signature": f"t={now}", "other scheme": f"t={now},v0={good}",
        "wrong secret": stripe_header(payload, now, "whsec_someone_else_entirely"),
        "another body's": f"t={now},v1={stripe_v1(payload + b' ', now)}",
        "letters": f"t=abc,v1={good}", "float": f"t={now}.0,v1={good}", "exponent": f"t=1.7e9,v1={good}",
        "negative": f"t=-{now},v1={good}", "plus sign": f"t=+{now},v1={good}", "hex": f"t=0x1,v1={good}",
        "space": f"t= {now},v1={good}", "zero, signed": stripe_header(payload, 0),
        "ten years old, signed": stripe_header(payload, now - 10 * year_s),
        "ten years ahead, signed": stripe_header(payload, now + 10 * year_s),
        "10**30, signed": stripe_header(payload, 10**30), "-1, signed": stripe_header(payload, -1),
        "8 KB of wrong v1": f"t={now}," + ",".join(["v1=" + "0" * 64] * 120),
        # Latin-1 digits: str.isdigit() says yes, int() says no (a 500 until the check was ASCII-only).
        "superscript two": f"t=\xb2,v1={good}".encode("latin-1"),
        "superscripts": f"t=\xb9\xb2\xb3,v1={good}".encode("latin-1"),
        # hmac.compare_digest raises on text that is not ASCII (a 500 until the header was checked).
        "latin-1 signature": f"t={now},v1=\xe9\xe9".encode("latin-1"),
    }
    doubled = {"two garbage": ["garbage", "t=1,v1=00"],
               "wrong secret twice": [stripe_header(payload, now, "whsec_a"), stripe_header(payload, now, "whsec_b")]}
    with guard.unchanged():
        response = anon.post("/webhooks/stripe", content=payload, headers={"Content-Type": "application/json"})
        guard.refused(response, "no header", "invalid_signature")
        for case, header in single.items():
            response = anon.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": header})
            guard.refused(response, case, "invalid_signature")
        for case, headers in doubled.items():
            response = anon.post("/webhooks/stripe", content=payload,
                                 headers=[("Stripe-Signature", header) for header in headers])
            guard.refused(response, case, "invalid_signature")
        # Larger than the proxy's header buffer: refused there or by the service, never applied.
        huge = f"t={now},v1={good}," + "v1=" + "f" * 40_000
        guard.refused(anon.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": huge}),
                      "40 KB header", by_proxy=True)
    # After all of that, the real delivery is applied, once.
    before = footprint(guard.sql, org)
    response = guard.answer(anon.post("/webhooks/stripe", content=payload,
                                      headers={"Stripe-Signature": stripe_header(payload)}), "the real one")
    assert response.status_code == 200, response.text
    assert footprint(guard.sql, org)[:2] == (before[0] + 1, before[1] + 1_000_000)


def test_svix_signature_headers_missing_doubled_garbage_or_oversized_apply_nothing(guard, anon):
    org = guard.target
    body = json.dumps({"type": "usage.batch", "data": {"ticks": [small_tick(org, "svix-hdr")]}}).encode()
    now = int(time.time())
    good = svix_headers(body, now)
    valid = good["svix-signature"]
    year_s = 365 * 86_400
    other_body = svix_headers(body + b" ", now, message_id=good["svix-id"])["svix-signature"]
    cases = {
        "no id": {k: v for k, v in good.items() if k != "svix-id"},
        "no timestamp": {k: v for k, v in good.items() if k != "svix-timestamp"},
        "no signature": {k: v for k, v in good.items() if k != "svix-signature"},
        "empty id": {**good, "svix-id": ""}, "empty signature": {**good, "svix-signature": ""},
        "v1 and nothing": {**good, "svix-signature": "v1,"}, "bare v1": {**good, "svix-signature": "v1"},
        "short garbage": {**good, "svix-signature": "v1,AAAA"},
        "other version": {**good, "svix-signature": valid.replace("v1,", "v2,")},
        "space for comma": {**good, "svix-signature": valid.replace("v1,", "v1 ")},
        "three parts": {**good, "svix-signature": valid + ",v1"},
        "no version": {**good, "svix-signature": valid[3:]},
        "another body's": {**good, "svix-signature": other_body},
        "wrong secret": svix_headers(body, now, OTHER_SVIX_SECRET),
        "latin-1 signature": {**good, "svix-signature": "v1,\xe9\xe9".encode("latin-1")},
        "9 KB of wrong signatures": {**good, "svix-signature": " ".join(["v1," + "A" * 43 + "="] * 200)},
        "id of 256": svix_headers(body, now, message_id="m" * 256),
        "ten years old, signed": svix_headers(body, now - 10 * year_s),
        "ten years ahead, signed": svix_headers(body, now + 10 * year_s),
        "zero, signed": svix_headers(body, 0), "-1, signed": svix_headers(body, -1),
    }
    for stamp in ("abc", "-1", "1e400", "nan", "inf", "-inf", "99999999999999999999", str(10**30), "1.7e9",
                  "0x6560", "1 7", "\xb2"):
        cases[f"timestamp {stamp!r}"] = {**good, "svix-timestamp": stamp.encode("latin-1")}
    with guard.unchanged():
        for case, headers in cases.items():
            response = anon.post("/webhooks/svix", content=body, headers=headers)
            guard.refused(response, case, field="svix-id" if case == "id of 256" else None)
            assert response.json()["error"]["code"] in ("invalid_signature", "invalid_request"), (case, response.text)
        for name, values in (("svix-signature", ["v1,AAAA", other_body]), ("svix-timestamp", ["abc", "-1"])):
            headers = [(k, v) for k, v in good.items() if k != name] + [(name, v) for v in values]
            guard.refused(anon.post("/webhooks/svix", content=body, headers=headers), f"two {name}",
                          "invalid_signature")
        huge = {**good, "svix-signature": valid + " v1," + "A" * 40_000}
        guard.refused(anon.post("/webhooks/svix", content=body, headers=huge), "40 KB header", by_proxy=True)
    before = footprint(guard.sql, org)
    response = guard.answer(anon.post("/webhooks/svix", content=body, headers=svix_headers(body)), "the real one")
    assert response.json()["result"]["accepted"] == 1, response.text
    assert footprint(guard.sql, org)[1] == before[1] - TICK_MICROS


# ----- webhooks: valid signatures over hostile bodies ------------------------------------------

# A money or time field of a Stripe event is a JSON integer, or (metadata) a string of ASCII
# digits. Every value below is neither, or out of range: the event is refused whole (422),
# never rounded, truncated or read as another number.
NOT_AN_AMOUNT = ["lots", "", "12.5", "\u0661\u0662\u0663", " 12", "1_000", "+5", True, False, 12.7, 1.0, -5, 0,
                 10**30, 2**63, -(2**63) - 1, [], {}, None]
NOT_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400"]


def stripe_bases(org: str) -> dict[str, tuple[str, dict]]:
    now = int(time.time())

    def ids(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:12]}"

    return {
        "checkout": ("checkout.session.completed",
                     {"id": ids("cs"), "object": "checkout.session", "mode": "payment", "payment_status": "paid",
                      "amount_total": 100, "payment_intent": ids("pi"), "client_reference_id": org,
                      "metadata": {"org_id": org, "credit_expires_at": str(now + 86_400)}}),
        "checkout by metadata": ("checkout.session.completed",
                                 {"id": ids("cs"), "object": "checkout.session", "mode": "payment",
                                  "payment_status": "paid", "amount_total": 100, "payment_intent": ids("pi"),
                                  "client_reference_id": org, "metadata": {"org_id": org, "credit_micros": "1000000"}}),
        "subscription": ("customer.subscription.created",
                         {"id": ids("sub"), "object": "subscription", "status": "active",
                          "metadata": {"org_id": org, "tier": "pro"},
                          "current_period_start": now - 60, "current_period_end": now + 30 * 86_400}),
        "subscription items": ("customer.subscription.updated",
                               {"id": ids("sub"), "object": "subscription", "status": "active",
                                "metadata": {"org_id": org, "tier": "pro"},
                                "items": {"data": [{"current_period_start": now - 60,
                                                    "current_period_end": now + 30 * 86_400}]}}),
        "invoice paid": ("invoice.paid", {"id": ids("in"), "object": "invoice", "metadata": {"org_id": org},
                                          "amount_paid": 500}),
        "invoice failed": ("invoice.payment_failed", {"id": ids("in"), "object": "invoice",
                                                      "billing_reason": "subscription_cycle",
                                                      "metadata": {"org_id": org}}),
        "refund": ("charge.refunded", {"id": ids("ch"), "object": "charge", "metadata": {"org_id": org},
                                       "refunds": {"data": [{"id": ids("re"), "amount": 50, "status": "succeeded"}]}}),
        "recharge": ("payment_intent.succeeded",
                     {"id": ids("pi"), "object": "payment_intent", "amount": 1000,
                      "metadata": {"org_id": org, "kind": "auto_recharge", "charge_id": ids("chg")}}),
    }


# (base, path in the object or ("event", "created"), which values the code reads as "absent")
AMOUNT_FIELDS = [
    ("checkout", ("amount_total",), ()), ("checkout by metadata", ("metadata", "credit_micros"), "falsy"),
    ("checkout", ("metadata", "credit_expires_at"), "falsy"),
    ("subscription", ("current_period_start",), "falsy"), ("subscription", ("current_period_end",), "falsy"),
    ("subscription items", ("items", "data", 0, "current_period_start"), "falsy"),
    ("invoice paid", ("amount_paid",), (None, 0)), ("invoice failed", ("event", "created"), (0,)),
    ("refund", ("refunds", "data", 0, "amount"), ()), ("recharge", ("amount",), ()),
]


def absent(value: object, skip) -> bool:
    if skip == "falsy":
        return not value
    return any(value is s or (type(value) is type(s) and value == s) for s in skip)


def signed_stripe(kind: str, obj: dict, created: object = ..., literal: str | None = None) -> tuple[bytes, dict]:
    evt = stripe_event(kind, obj)
    if created is not ...:  # None is a value to send here
        evt["created"] = created
    text = json.dumps(evt)
    if literal is not None:  # a number JSON cannot hold, written where the sentinel stands
        text = text.replace('"@literal@"', literal)
    payload = text.encode()
    return payload, {"Stripe-Signature": stripe_header(payload), "Content-Type": "application/json"}


def not_applied(guard, response, what: object) -> None:
    """A verified Stripe event metergate did not apply: 200, recorded as ignored or a dead letter."""
    guard.answer(response, what)
    assert response.status_code == 200, (what, response.status_code, response.text[:300])
    assert response.json()["outcome"] in ("ignored", "dead_letter"), (what, response.text[:300])
    assert response.json()["applied"] == [], (what, response.text[:300])


def test_signed_stripe_events_with_amounts_and_times_that_are_not_integers_are_refused_whole(guard, anon):
    """Regression: 12.7 cents was credited as 12, `true` as 1 cent, "١٢٣" as 123 cents, " 12"
    and "+5" as numbers; a Stripe amount is an integer and nothing else is read as one."""
    bases = stripe_bases(guard.target)
    with guard.unchanged():
        for base, path, skip in AMOUNT_FIELDS:
            kind, obj = bases[base]
            values = [v for v in NOT_AN_AMOUNT if not absent(v, skip)]
            for value in values + [f"@literal@{n}" for n in NOT_JSON_NUMBERS]:
                literal = value[len("@literal@"):] if isinstance(value, str) and value.startswith("@literal@") else None
                sent = "@literal@" if literal else value
                if path == ("event", "created"):
                    payload, headers = signed_stripe(kind, obj, created=sent, literal=literal)
                else:
                    payload, headers = signed_stripe(kind, with_value(obj, path, sent), literal=literal)
                response = anon.post("/webhooks/stripe", content=payload, headers=headers)
                if literal:
                    guard.refused(response, (base, path, literal), "invalid_json")
                else:  # verified: answered 200 (a 4xx disables Stripe's endpoint), applied nothing
                    not_applied(guard, response, (base, path, value))


def test_signed_stripe_events_naming_no_real_org_change_no_org(guard, anon):
    """metadata.org_id that is unknown, near a real id, or full of control characters: a dead
    letter or ignored, never applied to the org it resembles, never a 500 (a NUL reaches
    Postgres, in the org id and in the reason recorded)."""
    org = guard.target
    kind, session = stripe_bases(org)["checkout"]
    session = {**session, "client_reference_id": None}  # no fallback: metadata alone names the org
    named = ["org_nobody_here", org + "\n", "\n" + org, org.upper(), org + "\x00", "\x00", "\u202e" + org,
             org + "\u0301", org + "\u2028", "\U0001f642", " " + org, org + " ", "x" * 129, "x" * 20_000,
             org + "/../" + org, 5, True, [org], {"id": org}, ""]
    with guard.unchanged():
        for org_id in named:
            obj = {**session, "metadata": {**session["metadata"], "org_id": org_id}}
            payload, headers = signed_stripe(kind, obj)
            response = guard.answer(anon.post("/webhooks/stripe", content=payload, headers=headers), repr(org_id)[:40])
            not_applied(guard, response, repr(org_id)[:40])


def test_signed_stripe_events_of_the_wrong_shape_change_nothing(guard, anon):
    """The skeleton of an event (data, data.object, metadata, refunds, items, the error of a
    payment) holding a list, a string or a number where an object goes: 4xx or ignored,
    never a 500. Regression: `refunds: 12345` and `data: [1]` were 500s."""
    bases = stripe_bases(guard.target)
    wrong = [[1], "x", 5, True]
    cases = [(base, ("event", "data"), value) for base in ("checkout", "refund")
             for value in wrong + [{"object": v} for v in wrong]]
    holders = (("checkout", ("metadata",)), ("recharge", ("metadata",)), ("recharge", ("last_payment_error",)),
               ("subscription items", ("items",)), ("refund", ("refunds",)), ("refund", ("refunds", "data")),
               ("refund", ("refunds", "data", 0)))
    cases += [(base, path, value) for base, path in holders for value in wrong]
    cases += [("refund", path, {"data": 1}) for path in (("refunds",), ("refunds", "data"), ("refunds", "data", 0))]
    cases += [("checkout", ("event", field), value) for field in ("id", "type") for value in (5, None, [], {})]
    with guard.unchanged():
        for base, path, value in cases:
            kind, obj = bases[base]
            evt = stripe_event(kind, obj)
            if path[0] == "event":
                evt[path[1]] = value
            else:
                evt = stripe_event(kind, with_value(obj, path, value))
            payload = json.dumps(evt).encode()
            headers = {"Stripe-Signature": stripe_header(payload)}
            what = (base, path, value)
            response = guard.answer(anon.post("/webhooks/stripe", content=payload, headers=headers), what)
            if response.status_code == 200:
                assert response.json()["applied"] == [], (what, response.text[:300])
            else:
                guard.refused(response, what)
        for whole in (b"[]", b'"evt"', b"5", b"null", b"{}"):
            headers = {"Stripe-Signature": stripe_header(whole)}
            guard.refused(anon.post("/webhooks/stripe", content=whole, headers=headers), whole, "invalid_json")


def test_a_signed_event_naming_another_org_in_metadata_moves_that_org_only(guard, anon, new_org):
    """Stripe is trusted to name the org (metergate set the metadata itself): the org named by
    metadata gets the credit, the org of client_reference_id nothing, the answer no balance."""
    named = new_org()
    kind, session = stripe_bases(named)["checkout"]
    session = {**session, "client_reference_id": guard.target}
    before = footprint(guard.sql, named)
    with guard.unchanged():
        payload, headers = signed_stripe(kind, session)
        response = guard.answer(anon.post("/webhooks/stripe", content=payload, headers=headers), "named org")
        assert [a["org_id"] for a in response.json()["applied"]] == [named], response.text
        assert "balance" not in response.text
    assert footprint(guard.sql, named)[:2] == (before[0] + 1, before[1] + 1_000_000)


def test_signed_stripe_events_with_odd_ids_and_states_never_500(guard, anon, new_org):
    """Ids, modes and statuses of the wrong type or with NUL: refused or applied as a Stripe
    object of that id would be, never a 500. A refused one changes nothing; these go to an
    org of their own, since an odd but harmless id may be accepted."""
    victim = new_org()
    bases = stripe_bases(victim)
    odd = [12345, [], {}, "\x00", "x" * 5_000, True, "", "id\nwith newline"]
    fields = [("checkout", ("id",)), ("checkout", ("payment_intent",)), ("checkout", ("mode",)),
              ("checkout", ("payment_status",)), ("subscription", ("status",)), ("subscription", ("metadata", "tier")),
              ("refund", ("refunds", "data", 0, "id")), ("refund", ("refunds", "data", 0, "status")),
              ("refund", ("refunds",)), ("recharge", ("metadata", "charge_id")), ("recharge", ("id",)),
              ("recharge", ("last_payment_error",)), ("invoice paid", ("id",))]
    with guard.unchanged():  # target and bystander: neither is named
        for base, path in fields:
            kind, obj = bases[base]
            for value in odd:
                if path == ("refunds",) and not value:
                    continue  # as if absent: the refunds are listed from Stripe, which knows no such charge (502)
                before = footprint(guard.sql, victim)
                payload, headers = signed_stripe(kind, with_value(obj, path, value))
                response = guard.answer(anon.post("/webhooks/stripe", content=payload, headers=headers),
                                        (base, path, repr(value)[:30]))
                if response.status_code >= 400:
                    assert footprint(guard.sql, victim) == before, (base, path, repr(value)[:30])


def test_signed_svix_events_with_hostile_bodies_change_nothing(guard, anon):
    org = guard.target
    lease = {"org_id": org, "lease_id": "svix-hostile", "ttl_s": 60}
    bodies: list[tuple[str, bytes]] = [
        ("list", b"[]"), ("string", b'"usage.batch"'), ("no type", b"{}"), ("type 5", b'{"type": 5}'),
        ("type null", b'{"type": null}'), ("type empty", b'{"type": ""}'),
        ("type 129", json.dumps({"type": "u" * 129}).encode()), ("type with NUL", b'{"type": "usage.batch\\u0000"}'),
        ("type with newline", b'{"type": "usage.batch\\n", "data": {"ticks": []}}'),
        ("no data", b'{"type": "usage.batch"}'), ("data list", b'{"type": "usage.batch", "data": []}'),
        ("data string", b'{"type": "sandbox.started", "data": "lease"}'),
        ("NaN ttl", json.dumps({"type": "sandbox.started", "data": {**lease, "ttl_s": float("nan")}}).encode()),
    ]
    for field, values in (("ttl_s", [0, -1, 2**63, 1.5, "60", 10**30, True]),
                          ("lease_id", ["l\n", "l\x00", "", "l" * 129, 7]),
                          ("org_id", [org + "\n", "org_nobody", org.upper(), "\u202e" + org])):
        for value in values:
            bodies.append((f"started {field}={value!r}"[:60],
                           json.dumps({"type": "sandbox.started", "data": {**lease, field: value}}).encode()))
    for resources in ({"quantity": 0}, {"quantity": 10**30}, {"quantity": 1.5}, {"memory_mb": -1},
                      {"region": "us\n"}, {"machine_type": "a3\x00"}, {"gpus": 8}):
        bodies.append((f"started {resources}", json.dumps({"type": "sandbox.started",
                                                           "data": {**lease, "resources": resources}}).encode()))
    for data in ({"org_id": org}, {"lease_id": "l"}, {"org_id": org, "lease_id": "l\x00"},
                 {"org_id": org, "lease_id": "l", "extra": 1}, {"org_id": [org], "lease_id": "l"}):
        bodies.append((f"stopped {data}", json.dumps({"type": "sandbox.stopped", "data": data}).encode()))
    for tick in (small_tick(org, "sv1", duration_ms=-1), small_tick(org, "sv2", started_at=10**30),
                 small_tick(org, "sv3\n"), small_tick(org, "sv4", memory_mb=1.5), small_tick(org + "\n", "sv5"),
                 small_tick(org, "sv6", units={"ingest_bytes": -1}), {"tick_id": "sv7"}):
        usage = {"type": "usage.batch", "data": {"ticks": [tick]}}
        bodies.append((f"usage {tick.get('tick_id')!r}", json.dumps(usage).encode()))
    many = {"type": "usage.batch", "data": {"ticks": [small_tick(org, f"m{n}") for n in range(10_001)]}}
    bodies.append(("10,001 ticks", json.dumps(many, separators=(",", ":")).encode()))
    with guard.unchanged():
        for case, body in bodies:
            response = guard.answer(anon.post("/webhooks/svix", content=body, headers=svix_headers(body)), case)
            if response.status_code == 200:  # acknowledged, and nothing in it took effect
                result = response.json()["result"]
                if result != {"ignored": True}:
                    assert (result["accepted"], len(result["rejected"])) == (0, 1), (case, result)
            else:
                guard.refused(response, case)


# ----- JSON numbers on every route that takes one -----------------------------------------------

# Integers past int64 and far past it, floats where integers go, NaN / Infinity (what Python's
# json.dumps writes with allow_nan), 1e400 (infinite once read), -0.0, negatives.
NUMBER_LITERALS = ["9223372036854775808", "1" + "0" * 30, "-9223372036854775809", "1.0", "1.5", "NaN", "Infinity",
                   "-Infinity", "1e400", "-0.0", "1e3", "-1", "-3600000"]


def number_cases(org: str) -> list[tuple[str, str, str, dict, str]]:
    """(method, path, caller, body with "@N@" where the number goes, how a refusal looks)."""
    gate = {"org_id": org, "action": "create"}
    tick = small_tick(org, "num")
    cases = [("POST", "/v1/gate", "compute", {**gate, "resources": {field: "@N@"}}, "whole")
             for field in ("memory_mb", "cpu_count", "disk_mb", "quantity")]
    cases += [("POST", "/v1/gate/batch", "compute", {"checks": [{**gate, "resources": {field: "@N@"}}, gate]}, "item")
              for field in ("memory_mb", "quantity")]
    lease = {"org_id": org, "lease_id": "num"}
    cases += [("POST", "/v1/leases", "compute", {**lease, "ttl_s": "@N@"}, "whole")]
    cases += [("POST", "/v1/leases", "compute", {**lease, "resources": {field: "@N@"}}, "whole")
              for field in ("quantity", "memory_mb")]
    cases += [("POST", "/v1/usage", "compute", {"ticks": [{**tick, field: "@N@"}]}, "tick")
              for field in ("duration_ms", "memory_mb", "cpu_count", "disk_mb", "started_at")]
    cases += [("POST", "/v1/usage", "compute", {"ticks": [{**tick, "units": {"ingest_bytes": "@N@"}}]}, "tick")]
    recharge = {"enabled": True, "threshold_micros": 1, "amount_micros": 1_000_000}
    admin = [(f"/v1/orgs/{org}/credits", "POST", {"kind": "grant", "amount_micros": "@N@"}),
             (f"/v1/orgs/{org}/credits", "POST", {"kind": "adjustment", "amount_micros": "@N@"}),
             (f"/v1/orgs/{org}/credits", "POST", {"kind": "grant", "amount_micros": 5, "expires_at": "@N@"}),
             (f"/v1/orgs/{org}/tier", "PUT", {"tier": "custom", "max_concurrent": "@N@"}),
             (f"/v1/orgs/{org}/limits", "PUT", {"max_disk_mb": "@N@"}),
             (f"/v1/orgs/{org}/limits", "PUT", {"machine_quotas": {"us-central1": {"a3-highgpu-8g": "@N@"}}}),
             (f"/v1/orgs/{org}/auto-recharge", "PUT", {**recharge, "threshold_micros": "@N@"}),
             (f"/v1/orgs/{org}/auto-recharge", "PUT", {**recharge, "amount_micros": "@N@"}),
             (f"/v1/orgs/{org}/auto-recharge", "PUT", {**recharge, "max_per_day": "@N@"}),
             (f"/v1/orgs/{org}/tokens", "POST", {"ttl_s": "@N@"}),
             (f"/v1/orgs/{org}/checkout/topup", "POST", {"amount_micros": "@N@"})]
    cases += [(method, path, "admin", body, "whole") for path, method, body in admin]
    return cases


def with_number(body: dict, literal: str) -> bytes:
    return json.dumps(body).replace('"@N@"', literal).encode()


def field_of(body: dict) -> str:
    """The name of the field that holds the number."""
    text = json.dumps(body)
    return re.findall(r'"([^"]+)": "@N@"', text)[0]


def test_json_number_extremes_are_refused_on_every_route_that_takes_a_number(guard, admin, compute):
    org = guard.target
    clients = {"admin": admin, "compute": compute}
    with guard.unchanged():
        for method, path, who, body, shape in number_cases(org):
            for literal in NUMBER_LITERALS:
                what = (method, path, field_of(body), literal)
                if literal.startswith("-") and body.get("kind") == "adjustment" and "." not in literal:
                    continue  # a negative adjustment is an ordinary one
                response = guard.answer(clients[who].request(method, path, content=with_number(body, literal)), what)
                if response.status_code == 400:
                    guard.refused(response, what, "invalid_json")  # NaN and Infinity are not JSON
                elif shape == "whole":
                    guard.refused(response, what, field=field_of(body))
                elif shape == "item":
                    assert response.status_code == 200, (what, response.text)
                    first, second = response.json()["decisions"]
                    assert first["error"]["status"] in (400, 422) and first["error"]["code"], (what, first)
                    assert second["allowed"] is True, (what, second)
                else:
                    answer = response.json()
                    assert (answer["accepted"], [r["index"] for r in answer["rejected"]]) == (0, [0]), (what, answer)
                    named = "units" if field_of(body) == "ingest_bytes" else field_of(body)  # msgspec: `$.units[...]`
                    assert named in answer["rejected"][0]["error"], (what, answer)
        # -0 is 0: refused where 0 is refused, and the same gate answer as 0 where 0 is fine.
        for method, path, who, body, shape in number_cases(org):
            if field_of(body) in ("ttl_s", "quantity", "amount_micros", "threshold_micros", "max_per_day"):
                response = clients[who].request(method, path, content=with_number(body, "-0"))
                if shape == "item":
                    assert guard.answer(response, (path, "-0")).json()["decisions"][0]["error"]["status"] == 422
                else:
                    guard.refused(response, (path, "-0"), field=field_of(body))
        for field in ("memory_mb", "cpu_count", "disk_mb"):
            body = {"org_id": org, "action": "create", "resources": {field: "@N@"}}
            zero = guard.answer(compute.post("/v1/gate", content=with_number(body, "0")), (field, "0"))
            minus_zero = guard.answer(compute.post("/v1/gate", content=with_number(body, "-0")), (field, "-0"))
            assert minus_zero.status_code == zero.status_code == 200
            ageless = [{k: v for k, v in r.json().items() if k != "age_ms"} for r in (zero, minus_zero)]
            assert ageless[0] == ageless[1]  # the view's age moves between two calls
        for path in (f"/v1/orgs/{org}/ledger", "/v1/orgs", "/v1/webhooks/outbox", "/v1/gate/views"):
            for literal in ("9223372036854775808", "1e3", "NaN", "-0", "1.5", "Infinity", "", "0x10", "\u0663", "-1"):
                guard.refused(admin.get(path, params={"limit": literal}), (path, literal), field="limit")


# ----- times ------------------------------------------------------------------------------------


def test_epochs_in_every_unit_and_rfc3339_oddities_are_read_right_or_refused(guard, admin, compute):
    """One batch: each plausible instant is billed once whatever its unit, each implausible
    one is rejected with its index, an instant older than tick ids are remembered is rejected
    `tick_too_old` in every unit (so it was read as that instant), and nothing else happens."""
    org = guard.target
    now_s = clock_us(admin) // 1_000_000  # the service's clock (the test clock may run ahead)
    yesterday = datetime.fromtimestamp(now_s - 86_400, tz=timezone.utc)
    day = yesterday.strftime("%Y-%m-%d")
    earlier = datetime.fromtimestamp(now_s - 12 * 3_600, tz=timezone.utc)  # within the tick age window
    at, at_plus_14 = earlier.strftime("%Y-%m-%dT%H:%M:00"), (earlier + timedelta(hours=14)).strftime("%Y-%m-%dT%H:%M:00")
    plausible = [now_s * scale for scale in UNIT_SCALES] + [
        now_s + 240, (now_s + 240) * 1_000_000_000, at.replace("T", "t") + "z", f"{at}-00:00",
        f"{at_plus_14}+14:00", f"{at}.123456789Z", f"{at}.5Z"]
    too_old = [S_MIN * scale for scale in UNIT_SCALES]  # 2000-01-01T00:00:00Z, four spellings
    implausible = [S_MIN * scale - 1 for scale in UNIT_SCALES] + [S_MAX * scale for scale in UNIT_SCALES] + [
        S_MAX - 1, S_MAX * 1_000_000_000 - 1, now_s + 360, (now_s + 360) * 1_000, 0, -1, -now_s, -(2**63), 2**63 - 1,
        "1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0000-01-01T00:00:00Z", f"{day}T10:00:00",
        f"{day}T23:59:60Z", f"{day}T10:00:00+25:00", "2026-02-30T10:00:00Z", "", "now", f" {day}T10:00:00Z",
        str(now_s), f"{day}", "2026-W10-1"]
    ticks = [small_tick(org, f"time-ok-{n}", started_at=at) for n, at in enumerate(plausible)]
    ticks += [small_tick(org, f"time-old-{n}", started_at=at) for n, at in enumerate(too_old)]
    ticks += [small_tick(org, f"time-bad-{n}", started_at=at) for n, at in enumerate(implausible)]
    ticks += [small_tick(org, "time-neg-1", duration_ms=-1), small_tick(org, "time-neg-2", duration_ms=-3_600_000)]
    ledger_before = ledger_sum(guard.sql, org)
    with guard.unchanged(guard.bystander):
        answer = guard.answer(compute.post("/v1/usage", json={"ticks": ticks}), "time batch").json()
        guard.tried += len(ticks) - 1
    assert answer["accepted"] == len(plausible), answer
    assert [r["index"] for r in answer["rejected"]] == list(range(len(plausible), len(ticks))), answer
    rejected_old = answer["rejected"][:len(too_old)]
    assert all(r["error"].startswith("tick_too_old:") for r in rejected_old), answer
    assert all("started_at" in r["error"] for r in answer["rejected"][:len(too_old) + len(implausible)]), answer
    assert ledger_sum(guard.sql, org) == ledger_before - TICK_MICROS * len(plausible)
    with guard.unchanged():
        for at in [S_MIN * scale for scale in UNIT_SCALES] + [S_MAX * 1_000, -1, 0, 10**30, f"{day}T10:00:00",
                                                              f"{day}T23:59:60Z", "0000-01-01T00:00:00Z", "1e400"]:
            body = {"kind": "grant", "amount_micros": 5, "expires_at": at}
            guard.refused(admin.post(f"/v1/orgs/{org}/credits", json=body), ("expires_at", at), field="expires_at")
        # Regression: "²" passed str.isdigit() and then failed int(): a 500 on the usage report.
        for value in ("\xb2", "\xb9\xb2", "\u0663" * 10, "-1", "1e3", str(10**30), str(S_MAX * 10**9),
                      f"{day}T10:00:00", f"{day}T23:59:60Z", "0000-01-01T00:00:00Z", "nan"):
            for name in ("from", "to"):
                guard.refused(admin.get(f"/v1/orgs/{org}/usage", params={name: value}), (name, value), field=name)
    # An expiry given in nanoseconds is the instant it names.
    expires_s = now_s + 2 * 86_400
    grant = admin.post(f"/v1/orgs/{org}/credits",
                       json={"kind": "grant", "amount_micros": 5, "expires_at": expires_s * 1_000_000_000})
    assert grant.status_code == 201, grant.text
    expected = datetime.fromtimestamp(expires_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert grant.json()["expires_at"] == expected, grant.text


# ----- ids ----------------------------------------------------------------------------------------

HOSTILE_IDS = ["a\x00b", "a\u2028b", "\u202eevil", "\U0001f642", "e\u0301", "x" * 129, "..%2F", "../x", "a/b", "x\n",
               "\nx", "x\t", " x", "x ", "", "%2e%2e", "\uff0e\uff0e", "x\r\n", "ab\u200b", "org\ufeff", "\u0130"]
# Names (region, machine type, unit) may hold any printable text; control characters never.
HOSTILE_NAMES = ["us\n", "\nus", "us\t", "u\x00s", "us\r\n", "us\x7f", "us\x1b[2J", "\n"]


def test_unicode_and_control_characters_in_ids_are_refused_in_bodies(guard, compute):
    """Regression: msgspec checks a pattern with re.search, where `$` also matches before a
    final newline: "l1\\n" was taken as a lease id (a lease no path can name again), "t\\n"
    as a tick id, "us\\n" as a region."""
    org = guard.target
    with guard.unchanged():
        for bad in HOSTILE_IDS:
            guard.refused(compute.post("/v1/gate", json={"org_id": bad, "action": "create"}), ("gate", bad),
                          "invalid_request", "org_id")
            for field in ("org_id", "lease_id"):
                body = {"org_id": org, "lease_id": "l-ids", field: bad}
                guard.refused(compute.post("/v1/leases", json=body), ("lease", field, bad), "invalid_request", field)
        for bad in HOSTILE_NAMES:
            for field in ("region", "machine_type"):
                resources = {"region": "us-central1", "machine_type": "a3-highgpu-8g", field: bad}
                gate = {"org_id": org, "action": "create", "resources": resources}
                guard.refused(compute.post("/v1/gate", json=gate), ("gate", field, bad), "invalid_request", field)
                lease = {"org_id": org, "lease_id": "l-names", "resources": resources}
                guard.refused(compute.post("/v1/leases", json=lease), ("lease", field, bad), "invalid_request", field)
        ticks = [small_tick(org, bad) for bad in HOSTILE_IDS]
        ticks += [small_tick(bad, f"o{n}") for n, bad in enumerate(HOSTILE_IDS)]
        ticks += [small_tick(org, f"l{n}", lease_id=bad) for n, bad in enumerate(HOSTILE_IDS)]
        ticks += [small_tick(org, f"u{n}", units={bad: 1}) for n, bad in enumerate(HOSTILE_NAMES)]
        answer = guard.answer(compute.post("/v1/usage", json={"ticks": ticks}), "id ticks").json()
        guard.tried += len(ticks) - 1
        assert answer["accepted"] == 0, answer
        assert [r["index"] for r in answer["rejected"]] == list(range(len(ticks))), answer


def test_unicode_dots_and_slashes_in_path_ids_reach_no_org(guard, service, admin, compute):
    """Percent-encoded and raw dot segments, slashes and control characters in path ids: a
    4xx (or the framework's redirect), never another org, never applied."""
    org, other = guard.target, guard.bystander
    token = mint(admin, org)
    paths = [("GET", "/v1/orgs/{id}", admin), ("GET", "/v1/orgs/{id}/ledger", admin),
             ("POST", "/v1/orgs/{id}/credits", admin), ("POST", "/v1/orgs/{id}/halt", admin),
             ("GET", "/billing/{id}", admin), ("POST", f"/v1/leases/{org}/{{id}}/renew", compute),
             ("DELETE", f"/v1/leases/{org}/{{id}}", compute)]
    with guard.unchanged():
        for method, template, client in paths:
            for bad in HOSTILE_IDS:
                url = template.replace("{id}", quote(bad, safe=""))
                body = {"kind": "grant", "amount_micros": 5} if url.endswith("/credits") else None
                response = guard.answer(client.request(method, url, json=body), (method, url))
                assert response.status_code in (307, 404, 405, 422), (method, url, response.text)
        # Raw (a client library would resolve the dots first): org's token walking to the bystander.
        for path in (f"/billing/{org}/../{other}", f"/billing/{org}/%2e%2e/{other}", f"/billing/{org}%2F..%2F{other}",
                     f"/billing/..%2F{other}", f"/v1/orgs/{org}/../{other}/auto-recharge",
                     f"/v1/orgs/{org}/%2E%2E/{other}"):
            received = raw_exchange(service, raw_request("GET", path, token, headers=("Accept: application/json",)))
            guard.tried += 1
            codes = statuses(received)
            assert codes and all(c < 500 and c not in (200, 201) for c in codes), (path, received[:300])
            assert other.encode() not in received.split(b"\r\n\r\n", 1)[-1], (path, received[:400])


# ----- body sizes and lying Content-Lengths ------------------------------------------------------


def post_routes(openapi: dict, org: str) -> list[tuple[str, str]]:
    """Every POST and PUT route of the document (the test clock's excepted: it moves the shared
    clock), with the billing page's forms, which the document leaves out."""
    filled = {"{org_id}": org, "{lease_id}": "l1", "{message_id}": "msg_1"}
    routes = [(method.upper(), re.sub(r"\{\w+\}", lambda name: filled[name.group(0)], path))
              for path, operations in openapi["paths"].items() for method in operations
              if method in ("post", "put") and not path.startswith("/v1/test-clock")]
    return routes + [("POST", f"/billing/{org}/{form}") for form in BILLING_FORMS]


def test_a_10_mb_body_is_413_on_every_post_route_and_limits_hold_to_the_byte(guard, service, admin, openapi):
    org = guard.target
    settings = service.settings
    big_paths = ("/v1/usage", "/v1/gate/batch", "/webhooks/svix")
    routes = post_routes(openapi, org)
    assert len(routes) >= 25, routes
    ten_mb = b'{"x": "' + b"y" * (10 * MIB) + b'"}'
    with guard.unchanged():
        # Webhooks authenticate by a signature over the body: headers that claim one come
        # first (without them a webhook is 400 from its headers alone, tests/test_security.py).
        signed = {"/webhooks/stripe": {"Stripe-Signature": "t=1,v1=00"},
                  "/webhooks/svix": {"svix-id": "msg_x", "svix-timestamp": "1", "svix-signature": "v1,AA=="}}
        for method, path in routes:
            response = guard.refused(admin.request(method, path, content=ten_mb, headers=signed.get(path, {})),
                                     (method, path), "payload_too_large")
            limit = settings.max_usage_body_bytes if path in big_paths else settings.max_body_bytes
            assert response.json()["error"]["limit_bytes"] == limit, (path, response.text)

        def streamed(size: int):  # no Content-Length: the limit holds on the bytes as they come
            sent = 0
            while sent < size:
                piece = min(MIB, size - sent)
                sent += piece
                yield b" " * piece

        for path in big_paths:
            guard.refused(admin.post(path, content=streamed(10 * MIB), headers=signed.get(path, {})),
                          ("streamed", path), "payload_too_large")
        # Exactly at each limit is read (and answered on its merits), one byte more is 413.
        default, usage = settings.max_body_bytes, settings.max_usage_body_bytes

        def padded(body: dict, size: int) -> bytes:
            raw = json.dumps(body).encode()
            return raw + b" " * (size - len(raw))

        gate = {"org_id": org, "action": "create"}
        at = guard.answer(admin.post("/v1/gate", content=padded(gate, default)), "gate at the limit")
        assert at.status_code == 200 and at.json()["allowed"] is True, at.text
        guard.refused(admin.post("/v1/gate", content=padded(gate, default + 1)), "gate over", "payload_too_large")
        gift = {"kind": "gift", "amount_micros": 5}  # read, then refused for what it says
        guard.refused(admin.post(f"/v1/orgs/{org}/credits", content=padded(gift, default)), "credit at", field="kind")
        guard.refused(admin.post(f"/v1/orgs/{org}/credits", content=padded(gift, default + 1)), "credit over",
                      "payload_too_large")
        empty = guard.answer(admin.post("/v1/usage", content=padded({"ticks": []}, usage)), "usage at the limit")
        assert empty.json() == {"accepted": 0, "duplicates": 0, "rejected": []}, empty.text
        over = padded({"ticks": []}, usage + 1)
        guard.refused(admin.post("/v1/usage", content=over), "usage over", "payload_too_large")
        at = guard.answer(admin.post("/v1/usage", content=streamed(usage)), "streamed usage at the limit")
        assert at.status_code == 400, at.text  # all blanks: read whole, then not JSON
        guard.refused(admin.post("/v1/usage", content=streamed(usage + 1)), "streamed over", "payload_too_large")
        svix = padded({"type": "usage.batch", "data": {"ticks": []}}, usage)
        at = guard.answer(admin.post("/webhooks/svix", content=svix, headers=svix_headers(svix)), "svix at the limit")
        assert at.status_code == 200 and at.json()["result"]["accepted"] == 0, at.text
        over = svix + b" "
        guard.refused(admin.post("/webhooks/svix", content=over, headers=svix_headers(over)), "svix over",
                      "payload_too_large")
        event = padded(stripe_event("customer.created", {"id": "cus_pad", "object": "customer"}), default)
        signed = {"Stripe-Signature": stripe_header(event)}
        at = guard.answer(admin.post("/webhooks/stripe", content=event, headers=signed), "stripe at the limit")
        assert at.status_code == 200 and at.json()["applied"] == [], at.text
        over = event + b" "
        guard.refused(admin.post("/webhooks/stripe", content=over, headers={"Stripe-Signature": stripe_header(over)}),
                      "stripe over", "payload_too_large")


def test_content_length_that_lies_applies_nothing(guard, service):
    """Raw sockets: a Content-Length larger or smaller than the body, negative, not a number,
    twice with two values, beside Transfer-Encoding. The bodies (but the one beside chunked)
    are credits that would apply if read as complete: a lie that got through would show in
    the ledger."""
    org = guard.target
    credit = json.dumps({"kind": "grant", "amount_micros": 1_000_000, "note": "content-length lie"}).encode()
    path = f"/v1/orgs/{org}/credits"
    json_type = "Content-Type: application/json"
    gift = json.dumps({"kind": "gift", "amount_micros": 1_000_000}).encode()
    gift_chunked = f"{len(gift):x}\r\n".encode() + gift + b"\r\n0\r\n\r\n"
    lies = {
        "larger, then the client closes": (raw_request("POST", path, ADMIN_TOKEN, credit,
                                                       (json_type, f"Content-Length: {len(credit) + 50}")), True),
        "smaller: the rest is garbage": (raw_request("POST", path, ADMIN_TOKEN, credit,
                                                     (json_type, f"Content-Length: {len(credit) - 5}")), False),
        "negative": (raw_request("POST", path, ADMIN_TOKEN, credit, (json_type, "Content-Length: -1")), False),
        "not a number": (raw_request("POST", path, ADMIN_TOKEN, credit, (json_type, "Content-Length: abc")), False),
        "huge": (raw_request("POST", path, ADMIN_TOKEN, credit, (json_type, "Content-Length: " + "9" * 25)), False),
        "two values": (raw_request("POST", path, ADMIN_TOKEN, credit, (json_type, f"Content-Length: {len(credit)}",
                                                                       f"Content-Length: {len(credit) - 5}")), False),
        # Both framings: RFC 9112 reads the chunked one (a refused body here); a proxy and a
        # server that disagreed would run what follows the first 4 bytes as a second request.
        "with chunked, smaller": (raw_request("POST", path, ADMIN_TOKEN, gift_chunked,
                                              (json_type, "Content-Length: 4", "Transfer-Encoding: chunked")), False),
        "chunked, size lies": (raw_request("POST", path, ADMIN_TOKEN,
                                           f"{len(credit) + 40:x}\r\n".encode() + credit + b"\r\n0\r\n\r\n",
                                           (json_type, "Transfer-Encoding: chunked")), True),
    }
    answers = {}
    with guard.unchanged():
        for case, (data, half_close) in lies.items():
            received = raw_exchange(service, data, half_close=half_close, wait_s=4.0)
            guard.tried += 1
            assert_raw_refused(received, case)
            answers[case] = statuses(received) or "closed"
    print(f"\nhostile: lying Content-Lengths were answered {answers}")


def test_a_100000_tick_batch_is_413_and_a_10000_tick_batch_is_billed_to_the_micro(guard, compute, new_org):
    # A short org id and compact ticks: 100,000 valid ticks fit under the 8 MiB body limit,
    # so it is the tick count that refuses them, not the size.
    short = new_org(org_id=f"h{uuid.uuid4().hex[:7]}")
    now_s = int(time.time())
    huge = {"ticks": [{"tick_id": str(n), "org_id": short, "started_at": now_s, "duration_ms": 1}
                      for n in range(100_000)]}
    body = json.dumps(huge, separators=(",", ":")).encode()
    assert len(body) < 8 * MIB
    with guard.unchanged(short, guard.bystander):
        started = time.monotonic()
        guard.refused(compute.post("/v1/usage", content=body), "100,000 ticks", "too_many_ticks")
        assert time.monotonic() - started < 15
    org = guard.target
    batch = {"ticks": [small_tick(org, f"k{n}", lease_id=f"sbx{n % 7}") for n in range(10_000)]}
    ledger_before = ledger_sum(guard.sql, org)
    with guard.unchanged(guard.bystander):
        started = time.monotonic()
        answer = guard.answer(compute.post("/v1/usage", json=batch), "10,000 ticks").json()
        assert time.monotonic() - started < 30
        assert answer == {"accepted": 10_000, "duplicates": 0, "rejected": []}
        assert ledger_sum(guard.sql, org) == ledger_before - 10_000 * TICK_MICROS
        again = guard.answer(compute.post("/v1/usage", json=batch), "the same 10,000 again").json()
        assert again == {"accepted": 0, "duplicates": 10_000, "rejected": []}
        assert ledger_sum(guard.sql, org) == ledger_before - 10_000 * TICK_MICROS
    state = guard.admin.get(f"/v1/orgs/{org}").json()
    assert state["balance_micros"] == ledger_sum(guard.sql, org)


# ----- slow clients ------------------------------------------------------------------------------

STALLED_SOCKETS = 8
STALL_S = HEADERS_WITHIN_S + 2.0  # past HAProxy's limit for headers: those sockets are answered 408


def test_slow_clients_that_never_finish_do_not_hold_up_others_and_change_nothing(guard, service, compute):
    """Slowloris: sockets that promise more body than they send (their partial body is a whole
    credit), or never end their headers. Others are answered quickly meanwhile; the stalled
    requests are never answered with a success, and once they give up nothing has changed."""
    org = guard.target
    credit = json.dumps({"kind": "grant", "amount_micros": 1_000_000, "note": "slowloris"}).encode()
    stalled: list[socket.socket] = []
    answered: list[bytes] = []
    with guard.unchanged():
        try:
            for n in range(STALLED_SOCKETS):
                sock = socket.create_connection(address(service), timeout=5)
                stalled.append(sock)
                if n % 4 == 3:  # headers that never end
                    sock.sendall(f"POST /v1/orgs/{org}/credits HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
                else:
                    head = raw_request("POST", f"/v1/orgs/{org}/credits" if n % 2 else "/v1/usage",
                                       ADMIN_TOKEN, headers=("Content-Type: application/json",
                                                             f"Content-Length: {len(credit) + 1000}"), close=False)
                    sock.sendall(head + credit)
                guard.tried += 1
            slowest = 0.0
            deadline = time.monotonic() + STALL_S
            while time.monotonic() < deadline:
                started = time.monotonic()
                response = compute.post("/v1/gate", json={"org_id": org, "action": "create"})
                slowest = max(slowest, time.monotonic() - started)
                assert response.status_code == 200 and response.json()["allowed"] is True, response.text
                time.sleep(0.2)
            assert slowest < 3.0, f"a gate check took {slowest:.1f} s while slow clients stalled"
            for sock in stalled:  # whatever the service said to them so far
                sock.setblocking(False)
                try:
                    answered.append(sock.recv(65536))
                except (BlockingIOError, ConnectionResetError):
                    answered.append(b"")
        finally:
            for sock in stalled:
                sock.close()
        for received in answered:
            assert_raw_refused(received, "stalled")
        headers_never_ended = answered[3::4]
        assert headers_never_ended and all(statuses(r) == [408] for r in headers_never_ended), headers_never_ended
        time.sleep(1.0)  # the service sees the closes; nothing may land after them either
    print(f"\nhostile: {sum(1 for r in answered if r)} of {STALLED_SOCKETS} stalled sockets were answered "
          f"within {STALL_S:.0f} s (408 to headers that never ended; a body that never ends is dropped after "
          f"HAProxy's 30 s client timeout)")


def test_a_body_that_never_ends_holds_its_connection_only_until_the_client_timeout(guard, service):
    """HAProxy drops a client silent mid-body after CLIENT_SILENT_AT_MOST_S (an hour by Serve's
    default): a caller cannot hold connections for long by starting bodies it never finishes,
    and the partial body, a whole credit, never lands."""
    credit = json.dumps({"kind": "grant", "amount_micros": 1_000_000, "note": "stalled-body"}).encode()
    head = raw_request("POST", f"/v1/orgs/{guard.target}/credits", ADMIN_TOKEN, close=False,
                       headers=("Content-Type: application/json", f"Content-Length: {len(credit) + 1000}"))
    received = b""
    with guard.unchanged():
        with socket.create_connection(address(service), timeout=CLIENT_SILENT_AT_MOST_S + 15) as sock:
            sock.sendall(head + credit)
            guard.tried += 1
            started = time.monotonic()
            try:
                while chunk := sock.recv(65536):  # until the service closes (a timeout fails the test)
                    received += chunk
            except ConnectionResetError:
                pass
            held = time.monotonic() - started
    assert_raw_refused(received, "a body that never ended")
    assert CLIENT_SILENT_AT_MOST_S - 2 <= held < CLIENT_SILENT_AT_MOST_S + 10, held
    # HAProxy's own answer, in metergate's error shape (its HTML page until issue 18)
    head, _, body = received.partition(b"\r\n\r\n")
    assert statuses(received) == [400] and b"\r\ncontent-type: application/json" in head.lower(), received[:300]
    assert json.loads(body)["error"]["code"] == "bad_request", body


# ----- org tokens -------------------------------------------------------------------------------

ORG_BODIES = {"/credits": {"kind": "grant", "amount_micros": 1}, "/plan": {"plan_id": "payg"},
              "/tier": {"tier": "pro"}, "/limits": {"max_disk_mb": 1},
              "/auto-recharge": {"enabled": True, "threshold_micros": 1, "amount_micros": 1_000_000},
              "/tokens": {"ttl_s": 3600}, "/checkout/topup": {"amount_micros": 1_000_000},
              "/checkout/tier": {"tier": "pro"}}


def org_routes(openapi: dict, org: str) -> list[tuple[str, str, dict | None]]:
    """Every route of the document that names an org in its path, the billing forms, and the
    compute plane's routes that name it in their body."""
    routes = []
    for path, operations in openapi["paths"].items():
        if "{org_id}" not in path:
            continue
        for method in operations:
            filled = path.replace("{org_id}", org).replace("{lease_id}", "l1")
            body = None if method == "get" else next((b for end, b in ORG_BODIES.items() if path.endswith(end)), {})
            routes.append((method.upper(), filled, body))
    routes += [("POST", f"/billing/{org}/{form}", None) for form in BILLING_FORMS]
    gate = {"org_id": org, "action": "create"}
    routes += [("POST", "/v1/gate", gate), ("POST", "/v1/gate/batch", {"checks": [gate]}),
               ("POST", "/v1/leases", {"org_id": org, "lease_id": "l1"}),
               ("POST", "/v1/usage", {"ticks": [small_tick(org, "tok")]})]
    return routes


def test_org_tokens_open_only_their_org_on_every_org_scoped_route(guard, service, admin, openapi):
    """Org A's valid token on each of B's routes: 403 and nothing of B in the answer. An
    expired token of A, and A's token with any one byte flipped, on A's own routes: 401."""
    org_a, org_b = guard.target, guard.bystander
    token_a = mint(admin, org_a)
    expired, _ = OrgTokens(service.settings.org_token_secret).mint(org_a, int(time.time() - 7_200) * 1_000_000, 3_600)
    flipped = [token_a[:i] + chr(ord(token_a[i]) ^ 1) + token_a[i + 1:] for i in range(len(token_a))]
    routes_b = org_routes(openapi, org_b)
    assert len(routes_b) >= 25, routes_b
    with httpx.Client(base_url=service.base_url, timeout=60, headers={"Accept": "application/json"}) as client, \
            guard.unchanged():
        bearer = {"Authorization": f"Bearer {token_a}"}
        for method, path, body in routes_b:
            response = client.request(method, path, json=body, headers=bearer)
            # The guard's bystander is B: its id may not appear in any answer, even a 403.
            guard.refused(response, (method, path), "forbidden")
        for extra in ({"params": {"token": token_a}}, {"headers": {"Cookie": f"mg_billing={token_a}"}}):
            response = client.get(f"/billing/{org_b}", **extra)
            guard.refused(response, ("billing page of B", sorted(extra)), "forbidden")
            assert "set-cookie" not in response.headers
        for method, path, body in org_routes(openapi, org_a):
            response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {expired}"})
            guard.refused(response, ("expired", method, path), "token_expired")
            assert response.status_code == 401, (method, path, response.text)
        assert client.get(f"/billing/{org_a}", headers=bearer).status_code == 200  # the token itself opens it
        for token in flipped:
            response = client.get(f"/billing/{org_a}", headers={"Authorization": f"Bearer {token}"})
            guard.refused(response, ("flipped", token), "unauthorized")
        for token in flipped[::9]:  # and on a route that writes
            response = client.put(f"/v1/orgs/{org_a}/auto-recharge", json=ORG_BODIES["/auto-recharge"],
                                  headers={"Authorization": f"Bearer {token}"})
            guard.refused(response, ("flipped, write", token), "unauthorized")
