"""Races through real HTTP (issue 11, part 3): many requests on one org in flight at once, and
what must hold whatever order the service sees them in.

Each burst is one asyncio loop and one connection per request: every request is created,
waits at a start line, and all are released together, so they reach the ingress within
milliseconds of one another and meet in the same group commits. Every burst is bounded in
time (BURST_TIMEOUT_S). The module prints how many bursts it ran and how many requests they
sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

import httpx
import pytest

from tests.helpers import (
    ADMIN_TOKEN,
    HOUR_TICK_MICROS,
    SERVICE_TOKEN,
    SIGNUP_MICROS,
    STRIPE_SECRET_KEY,
    URLS,
    fake_sessions,
    hour_tick,
    ledger_sum,
    outbox,
    stripe_deliver,
    stripe_event,
    stripe_signed,
    wait_for,
)

US = 1_000_000
BURST_TIMEOUT_S = 60
WATCH_LIMIT = 2_000  # polls of a watcher, whatever happens
STATS: Counter = Counter()
SERVICE = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module", autouse=True)
def race_counts(request):
    yield
    line = "races: " + ", ".join(f"{name}: {count}" for name, count in sorted(STATS.items()))
    # Written past pytest's output capture, so that it shows in a -q run too.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}", flush=True)


# ----- bursts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict
    json: object = None
    content: bytes | None = None


def usage(tick: dict) -> Call:
    return Call("POST", "/v1/usage", SERVICE, {"ticks": [tick]})


def lease(org: str, lease_id: str) -> Call:
    return Call("POST", "/v1/leases", SERVICE, {"org_id": org, "lease_id": lease_id, "ttl_s": 600})


def release(org: str, lease_id: str) -> Call:
    return Call("DELETE", f"/v1/leases/{org}/{lease_id}", SERVICE)


def credit(org: str, kind: str, amount_micros: int, key: str | None) -> Call:
    headers = {**ADMIN, "Idempotency-Key": key} if key else ADMIN
    return Call("POST", f"/v1/orgs/{org}/credits", headers, {"kind": kind, "amount_micros": amount_micros})


def stripe_webhook(evt: dict) -> Call:
    body, headers = stripe_signed(evt)
    return Call("POST", "/webhooks/stripe", headers, content=body)


Watch = Callable[[httpx.AsyncClient, list[asyncio.Task]], Awaitable[object]]


def burst(service, calls: list[Call], watch: Watch | None = None) -> tuple[list[httpx.Response], object]:
    """Every call in flight at once; `watch(client, tasks)` runs beside them and its result is
    returned with the answers. No answer may be a 5xx: under a race, that is a defect."""

    async def run():
        start = asyncio.Event()
        limits = httpx.Limits(max_connections=len(calls) + 8, max_keepalive_connections=len(calls) + 8)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=BURST_TIMEOUT_S, limits=limits) as client:
            async def send(call: Call) -> httpx.Response:
                await start.wait()
                return await client.request(call.method, call.path, headers=call.headers, json=call.json,
                                            content=call.content)

            tasks = [asyncio.create_task(send(call)) for call in calls]
            await asyncio.sleep(0)  # every task now waits at the start line
            watcher = asyncio.create_task(watch(client, tasks)) if watch else None
            start.set()
            answers = await asyncio.wait_for(asyncio.gather(*tasks), BURST_TIMEOUT_S)
            watched = await asyncio.wait_for(watcher, BURST_TIMEOUT_S) if watcher else None
            return answers, watched

    STATS["bursts"] += 1
    STATS["requests"] += len(calls)
    answers, watched = asyncio.run(run())
    for call, answer in zip(calls, answers):
        assert answer.status_code < 500, (call.method, call.path, answer.status_code, answer.text)
        assert "Traceback" not in answer.text
    return answers, watched


def watch_balance(org: str) -> Watch:
    """Reads the org's balance, one read after another, for as long as the burst runs."""

    async def watch(client: httpx.AsyncClient, tasks: list[asyncio.Task]) -> list[int]:
        balances = []
        for _ in range(WATCH_LIMIT):
            if all(task.done() for task in tasks):
                break
            STATS["watch"] += 1
            state = await client.get(f"/v1/orgs/{org}", headers=ADMIN)
            assert state.status_code == 200, state.text
            balances.append(state.json()["balance_micros"])
            await asyncio.sleep(0.005)
        return balances

    return watch


def codes(answers: list[httpx.Response]) -> list[str]:
    return [a.json()["error"]["code"] if a.status_code >= 400 else "" for a in answers]


def state(admin, org: str) -> dict:
    response = admin.get(f"/v1/orgs/{org}")
    assert response.status_code == 200, response.text
    return response.json()


def gate(compute, org: str, action: str = "create") -> dict:
    response = compute.post("/v1/gate", json={"org_id": org, "action": action})
    assert response.status_code == 200, response.text
    return response.json()


def keyed_entries(sql, org: str, key: str) -> list[int]:
    rows = sql.fetch("SELECT amount_micros FROM ledger WHERE org_id = $1 AND idempotency_key = $2", org, key)
    return [r["amount_micros"] for r in rows]


# ----- 1. debits: usage ticks on a prepaid org, and keyed negative credits -----------------


@pytest.mark.parametrize("shard", [0, 1])
def test_fifty_concurrent_ticks_on_money_for_ten_bill_each_tick_once_and_halt_once(
        service, admin, compute, sql, new_org, org_id_on, shard):
    org = new_org(org_id=org_id_on(shard, "race"))
    start = 10 * HOUR_TICK_MICROS  # money for exactly 10 of the 50 ticks
    cut = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "adjustment", "amount_micros": start - SIGNUP_MICROS},
                     headers={"Idempotency-Key": f"cut-{org}"})
    assert cut.status_code == 201 and cut.json()["balance_micros"] == start, cut.text
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_race", "ttl_s": 600}).status_code == 201
    ticks = [hour_tick(org, f"race-{n}", "sbx_race") for n in range(50)]
    floor = start - 50 * HOUR_TICK_MICROS  # usage that already ran is billed: the debt those ticks make, no more

    # Each tick twice in the same burst: a retry racing its original.
    answers, balances = burst(service, [usage(t) for t in ticks for _ in range(2)], watch_balance(org))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for n in range(50):
        pair = [answers[2 * n].json(), answers[2 * n + 1].json()]
        assert sorted((p["accepted"], p["duplicates"]) for p in pair) == [(0, 1), (1, 0)], (n, pair)
        assert all(p["rejected"] == [] for p in pair)
    # Every balance seen mid-race is the start less a whole number of ticks, never past the floor,
    # and never goes back up (reads were one after another).
    assert balances, "the watcher read no balance"
    assert all((start - b) % HOUR_TICK_MICROS == 0 and floor <= b <= start for b in balances), balances
    assert balances == sorted(balances, reverse=True), balances

    # The same 50 again, all at once: nothing more is billed.
    again, _ = burst(service, [usage(t) for t in ticks])
    assert [a.json() for a in again] == [{"accepted": 0, "duplicates": 1, "rejected": []}] * 50

    after = state(admin, org)
    assert after["balance_micros"] == floor
    assert after["is_halted"] is True
    assert ledger_sum(sql, org) == floor
    assert sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = $1", org) == 50
    (halted,) = outbox(sql, org, "org.halted")  # halted once, at zero, not once per tick past it
    assert halted["lease_ids"] == ["sbx_race"]
    denied = gate(compute, org)
    # Free credit used up and no card: the gateway is told to ask for one (docs/concepts/dunning-and-auto-recharge.md: no_payment_method).
    assert (denied["allowed"], denied["reason"], denied["status"]) == (False, "no_payment_method", 402)
    assert gate(compute, org, "wake")["reason"] == "halted"
    refused = compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_after", "ttl_s": 600})
    assert refused.status_code == 402, refused.text


def test_fifty_keyed_debits_sent_twice_at_once_each_land_once(service, admin, sql, new_org):
    org = new_org()
    run = uuid.uuid4().hex[:8]
    # Distinct amounts, so each key's entry is known by its amount as well as its key.
    debits = [(f"debit-{run}-{n}", "adjustment" if n % 2 else "refund", 10_000 + n) for n in range(50)]

    def call(key: str, kind: str, micros: int) -> Call:
        return credit(org, kind, -micros if kind == "adjustment" else micros, key)

    answers, _ = burst(service, [call(*d) for d in debits for _ in range(2)])
    firsts: dict[str, dict] = {}
    for n, (key, kind, micros) in enumerate(debits):
        pair = answers[2 * n: 2 * n + 2]
        landed = [a.json() for a in pair if a.status_code == 201]
        assert landed, (key, [a.text for a in pair])
        # The loser of the race is told the key is still running, or gets the first answer again.
        assert all(a.status_code == 201 or codes([a]) == ["idempotency_in_progress"] for a in pair), \
            [a.text for a in pair]
        assert all(entry == landed[0] for entry in landed)
        assert (landed[0]["kind"], landed[0]["amount_micros"]) == (kind, -micros)
        firsts[key] = landed[0]
        assert keyed_entries(sql, org, key) == [-micros]

    # All 50 keys once more, at once: each answers its first entry, and nothing more is booked.
    replayed, _ = burst(service, [call(*d) for d in debits])
    assert [(a.status_code, a.json()) for a in replayed] == [(201, firsts[key]) for key, _, _ in debits]
    expected = SIGNUP_MICROS - sum(micros for _, _, micros in debits)
    assert state(admin, org)["balance_micros"] == expected
    assert ledger_sum(sql, org) == expected
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", org) == 51  # the signup grant and 50 debits


# ----- 2. leases against a cap of 100 --------------------------------------------------------


def test_two_hundred_concurrent_leases_on_a_cap_of_100_grant_exactly_100(service, admin, compute, sql, new_org):
    org = new_org()
    capped = admin.put(f"/v1/orgs/{org}/tier", json={"tier": "custom", "max_concurrent": 100})
    assert capped.status_code == 200 and capped.json()["max_concurrent"] == 100, capped.text
    assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000 * US}).status_code == 201
    ids = [f"lease-{n}" for n in range(200)]

    answers, _ = burst(service, [lease(org, lease_id) for lease_id in ids])
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {201: 100, 429: 100}, statuses
    granted = [lease_id for lease_id, a in zip(ids, answers) if a.status_code == 201]
    denied = [lease_id for lease_id, a in zip(ids, answers) if a.status_code == 429]
    assert all(a.json()["lease_id"] == lease_id for lease_id, a in zip(ids, answers) if a.status_code == 201)
    assert {(a.json()["reason"], c) for a, c in zip(answers, codes(answers)) if a.status_code == 429} == {
        ("concurrency_limit", "concurrency_limit")}
    assert state(admin, org)["active_leases"] == 100
    full = gate(compute, org)
    assert (full["allowed"], full["reason"], full["status"], full["active_leases"]) == (
        False, "concurrency_limit", 429, 100)

    # Release the 100, each twice at once: every release is 204, and the slots are free.
    released, _ = burst(service, [release(org, lease_id) for lease_id in granted for _ in range(2)])
    assert [a.status_code for a in released] == [204] * 200
    assert state(admin, org)["active_leases"] == 0
    assert gate(compute, org)["reason"] == "ok"

    # Take the 100 that were denied, each id twice at once: one lease each, the twin sees it.
    retaken, _ = burst(service, [lease(org, lease_id) for lease_id in denied for _ in range(2)])
    for n, lease_id in enumerate(denied):
        pair = retaken[2 * n: 2 * n + 2]
        assert sorted(a.status_code for a in pair) == [200, 201], (lease_id, [a.text for a in pair])
        assert {(a.json()["lease_id"], a.json()["expires_at"]) for a in pair} == {
            (lease_id, pair[0].json()["expires_at"])}
    assert state(admin, org)["active_leases"] == 100
    more, _ = burst(service, [lease(org, f"extra-{n}") for n in range(20)])
    assert [(a.status_code, c) for a, c in zip(more, codes(more))] == [(429, "concurrency_limit")] * 20
    assert state(admin, org)["active_leases"] == 100
    assert gate(compute, org)["reason"] == "concurrency_limit"

    # Releases racing new takes: 50 slots come free while 100 new ids ask. However they
    # interleave, no more are granted than were freed, and the count held is the count granted.
    freeing = denied[:50]
    racing, _ = burst(service, [release(org, lease_id) for lease_id in freeing]
                      + [lease(org, f"late-{n}") for n in range(100)])
    assert [a.status_code for a in racing[:50]] == [204] * 50
    late = Counter(a.status_code for a in racing[50:])
    assert set(late) <= {201, 429} and late[201] <= 50, late
    STATS["late leases granted while slots came free"] += late[201]
    after = state(admin, org)
    assert after["active_leases"] == 50 + late[201]
    assert gate(compute, org)["active_leases"] == after["active_leases"]
    assert ledger_sum(sql, org) == SIGNUP_MICROS + 1_000 * US  # leases move no money


# ----- 3. a Stripe top-up racing an auto-recharge --------------------------------------------


def stripe_api(api_base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api_base, timeout=10, headers={"Authorization": f"Bearer {STRIPE_SECRET_KEY}"})


async def recharge_intents(api: httpx.AsyncClient, org: str) -> list[dict]:
    """The org's auto-recharge PaymentIntents at the loopback Stripe (its list has no filters)."""
    found, after = [], None
    for _ in range(50):  # pages of 100: far more intents than a test session makes
        page = await api.get("/v1/payment_intents",
                             params={"limit": 100, **({"starting_after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        found += [pi for pi in body["data"] if (pi.get("metadata") or {}).get("org_id") == org
                  and pi["metadata"].get("kind") == "auto_recharge"]
        if not body.get("has_more") or not body["data"]:
            return found
        after = body["data"][-1]["id"]
    raise AssertionError("too many payment intents to list")


def charged_at_stripe(api_base: str, org: str) -> list[dict]:
    async def run() -> list[dict]:
        async with stripe_api(api_base) as api:
            return await recharge_intents(api, org)

    return asyncio.run(run())


def card_on_file(service, admin, compute, org: str) -> None:
    """A Stripe customer with a default card (the Checkout fake, backed by localstripe), and
    the setup session's completion delivered by us: no webhook endpoint is registered here."""
    assert admin.post(f"/v1/orgs/{org}/checkout/setup", json=URLS).status_code == 200
    (setup,) = [s for s in fake_sessions(service, org) if s["mode"] == "setup"]
    done = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{setup['id']}/complete", json={}, timeout=30)
    assert done.status_code == 200, done.text
    assert stripe_deliver(compute, stripe_event("checkout.session.completed", done.json())).status_code == 200
    assert state(admin, org)["has_payment_method"] is True


@pytest.mark.parametrize("shard", [0, 1])
def test_a_topup_webhook_racing_an_auto_recharge_credits_each_payment_once(
        service, admin, compute, sql, new_org, org_id_on, shard):
    org = new_org(org_id=org_id_on(shard, "arrace"))
    card_on_file(service, admin, compute, org)
    armed = admin.put(f"/v1/orgs/{org}/auto-recharge", json={
        "enabled": True, "threshold_micros": 4 * US, "amount_micros": 10 * US, "max_per_day": 3})
    assert armed.status_code == 200 and armed.json()["auto_recharge"]["pending"] is None, armed.text
    # 20 hour ticks (3.312 USD) take 5 USD, or 6 USD with the top-up, under the 4 USD
    # threshold whichever lands first: one charge either way, of the configured 10 USD.
    ticks = [hour_tick(org, f"ar-race-{n}") for n in range(20)]
    topup_pi = f"pi_race_topup_{uuid.uuid4().hex[:10]}"
    session = {"id": f"cs_race_{uuid.uuid4().hex[:10]}", "object": "checkout.session", "mode": "payment",
               "payment_status": "paid", "amount_total": 100, "payment_intent": topup_pi,
               "client_reference_id": org, "metadata": {"org_id": org}}
    completed = stripe_event("checkout.session.completed", session)
    topups = [stripe_webhook(completed)] * 3 + [
        stripe_webhook(stripe_event("checkout.session.async_payment_succeeded", session))]
    api_base = service.settings.stripe_api_base

    async def recharge_webhooks(client: httpx.AsyncClient, tasks: list[asyncio.Task]) -> dict:
        """As soon as the charger's PaymentIntent exists, Stripe's payment_intent.succeeded for
        it arrives: the same event twice at once and a second event id, racing the charger's
        own settlement. Meanwhile the org's pending charge is read: only ever one at a time."""
        found = asyncio.Event()
        pending_seen: set[str] = set()

        async def read_pending() -> None:
            for _ in range(WATCH_LIMIT):
                STATS["watch"] += 1
                view = (await client.get(f"/v1/orgs/{org}", headers=ADMIN)).json()["auto_recharge"]
                if view["pending"]:
                    pending_seen.add(view["pending"]["charge_id"])
                if found.is_set() and view["pending"] is None:
                    return
                await asyncio.sleep(0.01)

        async def deliver() -> tuple[dict, list[httpx.Response]]:
            deadline = time.monotonic() + 30
            async with stripe_api(api_base) as api:
                while not (mine := await recharge_intents(api, org)):  # as tight as the loopback allows
                    STATS["watch"] += 1
                    assert time.monotonic() < deadline, "no auto-recharge PaymentIntent appeared at Stripe"
            found.set()
            succeeded = stripe_event("payment_intent.succeeded", mine[0])
            calls = [stripe_webhook(succeeded), stripe_webhook(succeeded),
                     stripe_webhook(stripe_event("payment_intent.succeeded", mine[0]))]
            STATS["requests"] += len(calls)
            return mine[0], await asyncio.gather(*[client.post(c.path, content=c.content, headers=c.headers)
                                                   for c in calls])

        (intent, answers), _ = await asyncio.gather(deliver(), read_pending())
        return {"intent": intent, "answers": answers, "pending_seen": pending_seen}

    answers, watched = burst(service, [usage(t) for t in ticks] + topups, recharge_webhooks)
    assert [a.json()["accepted"] for a in answers[:20]] == [1] * 20
    assert [a.status_code for a in answers[20:]] == [200] * 4
    assert [a.status_code for a in watched["answers"]] == [200] * 3, [a.text for a in watched["answers"]]
    assert watched["pending_seen"] <= {"ar_1"}
    # Which report settled the charge first: the charger's own answer, or Stripe's event (a
    # redelivery of an event already answered repeats that answer, marked duplicate).
    first = [a.json() for a in watched["answers"]
             if not a.json().get("duplicate") and not a.json()["applied"][0]["replayed"]]
    assert len(first) <= 1, first
    STATS[f"recharges settled first by the {'webhook' if first else 'charger'}"] += 1

    intent = watched["intent"]
    expected = SIGNUP_MICROS + 1 * US + 10 * US - 20 * HOUR_TICK_MICROS
    wait_for("the recharge and the top-up", lambda: state(admin, org)["balance_micros"] == expected, timeout_s=30)
    time.sleep(1.0)  # a second credit of either payment would land within this
    rows = sql.fetch("SELECT kind, amount_micros, idempotency_key FROM ledger WHERE org_id = $1 AND kind <> 'usage'"
                     " ORDER BY kind", org)
    assert [(r["kind"], r["amount_micros"]) for r in rows] == [
        ("auto_recharge", 10 * US), ("signup_grant", SIGNUP_MICROS), ("topup", 1 * US)]
    # Each keyed by the PaymentIntent that moved the money, whoever reported it first.
    assert (rows[0]["idempotency_key"], rows[2]["idempotency_key"]) == (
        f"stripe:payment:{intent['id']}", f"stripe:payment:{topup_pi}")
    after = state(admin, org)
    assert after["balance_micros"] == expected == ledger_sum(sql, org)
    assert (after["auto_recharge"]["pending"], after["auto_recharge"]["charges_today"]) == (None, 1)
    assert [pi["id"] for pi in charged_at_stripe(api_base, org)] == [intent["id"]]  # Stripe was charged once
    assert (intent["amount"], intent["metadata"]["charge_id"]) == (1_000, "ar_1")
    (succeeded,) = outbox(sql, org, "auto_recharge.succeeded")
    assert succeeded["payment_intent_id"] == intent["id"]


# ----- 4. one Idempotency-Key, concurrent requests; one org id, concurrent creations --------


def test_one_key_with_two_bodies_at_once_books_one_entry_and_the_other_is_409(service, admin, sql, new_org):
    org = new_org()
    run = uuid.uuid4().hex[:8]
    booked = 0
    for round_no in range(20):
        key = f"two-bodies-{run}-{round_no}"
        amounts = [1 * US, 2 * US] if round_no % 2 else [2 * US, 1 * US]  # either may be sent first
        answers, _ = burst(service, [credit(org, "grant", micros, key) for micros in amounts])
        assert sorted(a.status_code for a in answers) == [201, 409], [a.text for a in answers]
        (won,) = [a.json() for a in answers if a.status_code == 201]
        (lost,) = [c for a, c in zip(answers, codes(answers)) if a.status_code == 409]
        assert lost in ("idempotency_conflict", "idempotency_in_progress")
        STATS[f"two-body losers told {lost}"] += 1
        assert keyed_entries(sql, org, key) == [won["amount_micros"]]
        booked += won["amount_micros"]
        STATS[f"two-body rounds won by the {'first' if won['amount_micros'] == amounts[0] else 'second'} sent"] += 1
    assert state(admin, org)["balance_micros"] == SIGNUP_MICROS + booked == ledger_sum(sql, org)

    key = f"same-body-{run}"
    answers, _ = burst(service, [credit(org, "grant", 3 * US, key)] * 10)
    created = [a.json() for a in answers if a.status_code == 201]
    assert created and all(body == created[0] for body in created), [a.text for a in answers]
    assert all(a.status_code == 201 or c == "idempotency_in_progress" for a, c in zip(answers, codes(answers)))
    assert keyed_entries(sql, org, key) == [3 * US]
    STATS["same-key same-body answers replayed"] += len(created) - 1
    STATS["same-key same-body answers told idempotency_in_progress"] += len(answers) - len(created)
    assert state(admin, org)["balance_micros"] == SIGNUP_MICROS + booked + 3 * US == ledger_sum(sql, org)


def test_twenty_concurrent_creations_of_one_org_make_one_org_with_one_signup_grant(service, admin, sql):
    org = f"org_race_{uuid.uuid4().hex[:10]}"
    body = {"org_id": org, "email": f"{org}@example.com", "billing_mode": "prepaid"}
    answers, _ = burst(service, [Call("POST", "/v1/orgs", ADMIN, body)] * 20)
    assert sorted(a.status_code for a in answers) == [200] * 19 + [201], [a.text for a in answers]
    assert {a.json()["balance_micros"] for a in answers} == {SIGNUP_MICROS}
    assert sql.val("SELECT count(*) FROM orgs WHERE org_id = $1", org) == 1
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1 AND kind = 'signup_grant'", org) == 1
    assert state(admin, org)["balance_micros"] == SIGNUP_MICROS == ledger_sum(sql, org)
