"""Traffic that keeps flowing while a fault is injected, and the invariants checked after it.

`Traffic` runs, on threads, for a few orgs: usage ticks (50 a request, each tick id sent once
unless retried), keyed credits, lease take/release cycles and gate checks. Every loop ends by
itself after `max_s`. It records what was acknowledged and every failure a caller saw.
`settle()` sends again what was not acknowledged, as a caller would once the fault is over;
`violations()` then lists every broken promise:

- an acknowledged tick or credit missing, or anything present twice;
- balance != credits - debits (memory against the ledger, and against what was sent);
- a lease left counted after every lease was released;
- a gate decision after the fault that is not what the org's state says;
- a failure seen by a caller that was not a 503 with Retry-After (or a refused connection,
  while the HTTP front itself was down).

Used by tests/chaos/test_faults.py, and by bench/soak.py for minutes on end.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.helpers import TICK_MICROS, TICKS_PER_REQUEST, tick_batch

CREDIT_MICROS = 1_000
RETRYABLE_CODES = {"shard_unavailable", "outcome_unknown", "service_unavailable", "database_unavailable"}
SETTLE_S = 60  # how long settle() keeps retrying what a fault left unacknowledged


@dataclass
class Seen:
    """What callers saw: answers by kind and status, and the failures that break a promise."""

    answers: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)  # (what, status, body) of each answer that must not happen
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, response: httpx.Response | Exception | None, ok: tuple[int, ...]) -> bool:
        """Whether the request was acknowledged (status in `ok`). Any other answer must be a
        503 with Retry-After and a retryable code, or no answer at all (the connection
        refused or cut: the exception's class is counted)."""
        with self.lock:
            if not isinstance(response, httpx.Response):
                self.answers[(what, type(response).__name__)] += 1
                return False
            self.answers[(what, response.status_code)] += 1
            if response.status_code in ok:
                return True
            if not _retryable(response) and not (response.status_code == 409 and _code(response) ==
                                                 "idempotency_in_progress"):
                self.bad.append((what, response.status_code, response.text[:300]))
            return False


def billed_ticks(sql, org: str) -> int:
    return sql.val("SELECT COALESCE(sum(ticks), 0)::int8 FROM usage_rollups WHERE org_id = $1", org)


def _code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _retryable(response: httpx.Response) -> bool:
    return (response.status_code == 503 and response.headers.get("Retry-After") == "1"
            and _code(response) in RETRYABLE_CODES and "Traceback" not in response.text)


class Traffic:
    def __init__(self, base_url: str, admin_token: str, service_token: str, orgs: list[str],
                 max_s: float = 120, name: str = "t") -> None:
        self.base_url = base_url
        self.headers = {"admin": {"Authorization": f"Bearer {admin_token}"},
                        "service": {"Authorization": f"Bearer {service_token}"}}
        self.orgs = orgs
        self.max_s = max_s
        self.name = name  # tick ids, credit keys and lease ids carry it: one run's never meet another's
        self.seen = Seen()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.usage_sent: dict[int, bool] = {}  # request number -> acknowledged
        self.credits_sent: dict[str, tuple[str, bool]] = {}  # key -> (org, acknowledged)
        self.gates = 0
        self.checks = 0  # invariant checks made by violations()
        self.fault_s = 0.0  # how long the fault lasted (set by whoever injects it)

    def _client(self, role: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers[role], timeout=30)

    def _post(self, client: httpx.Client, path: str, **kwargs) -> httpx.Response | httpx.TransportError:
        try:
            return client.post(path, **kwargs)
        except httpx.TransportError as exc:
            time.sleep(0.05)  # the front is down: no busy loop
            return exc

    # ----- the loops ---------------------------------------------------------------------

    def start(self) -> "Traffic":
        self.deadline = time.monotonic() + self.max_s
        for loop in (self._usage, self._credits, self._leases, self._gate):
            thread = threading.Thread(target=loop, name=f"traffic-{loop.__name__}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _running(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def _numbered(self, role: str, step, pause_s: float = 0.0) -> None:
        """`step(client, number)` for number 0, 1, 2, ... while the traffic runs."""
        with self._client(role) as client:
            number = 0
            while self._running():
                step(client, number)
                number += 1
                time.sleep(pause_s)

    def _org(self, number: int) -> str:
        return self.orgs[number % len(self.orgs)]

    def _usage(self) -> None:
        self._numbered("service", self._send_usage)

    def _send_usage(self, client: httpx.Client, number: int, what: str = "usage") -> bool:
        """Request `number`'s ticks; whether all of them were acknowledged."""
        response = self._post(client, "/v1/usage", json=self._usage_body(number))
        acked = self.seen.record(what, response, (200,)) and response.json()["rejected"] == []
        self.usage_sent[number] = acked
        return acked

    def _usage_body(self, number: int) -> dict:
        body = tick_batch(self.orgs, number)
        for tick in body["ticks"]:
            tick["tick_id"] = f"{self.name}-{tick['tick_id']}"
        return body

    def _credits(self) -> None:
        self._numbered("admin", lambda client, number: self._credit(client, self._org(number), f"{self.name}-c{number}"),
                       pause_s=0.02)

    def _credit(self, client: httpx.Client, org: str, key: str) -> bool:
        response = self._post(client, f"/v1/orgs/{org}/credits", headers={"Idempotency-Key": key},
                              json={"kind": "grant", "amount_micros": CREDIT_MICROS, "note": key})
        acked = self.seen.record("credit", response, (201,))
        self.credits_sent[key] = (org, acked)
        return acked

    def _leases(self) -> None:
        self._numbered("service", self._lease_cycle)

    def _lease_cycle(self, client: httpx.Client, number: int) -> None:
        org, lease = self._org(number), f"{self.name}-l{number}"
        taken = self._post(client, "/v1/leases", json={"org_id": org, "lease_id": lease, "ttl_s": 600})
        self.seen.record("lease", taken, (201,))
        self._release(client, org, lease)

    def _release(self, client: httpx.Client, org: str, lease: str) -> bool:
        try:
            response = client.delete(f"/v1/leases/{org}/{lease}")
        except httpx.TransportError as exc:
            response = exc
        return self.seen.record("release", response, (204,))

    def _gate(self) -> None:
        with self._client("service") as client:
            while self._running():
                for org in self.orgs:
                    response = self._post(client, "/v1/gate", json={"org_id": org, "action": "create"})
                    self.seen.record("gate", response, (200,))
                    self.gates += 1
                time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a traffic loop did not end"

    # ----- after the fault ---------------------------------------------------------------

    def settle(self) -> None:
        """Send again what was not acknowledged, until it is (ticks and keyed credits make the
        retry safe), and release every lease the loops may have left."""
        deadline = time.monotonic() + SETTLE_S
        with self._client("service") as service, self._client("admin") as admin:
            for number, acked in sorted(self.usage_sent.items()):
                if not acked:
                    _retried(lambda: self._send_usage(service, number, "usage retry"), deadline)
            for key, (org, acked) in sorted(self.credits_sent.items()):
                # A key whose request may have committed stays claimed for a while (409
                # idempotency_in_progress): that credit is checked as at most once instead.
                if not acked:
                    _retried(lambda: self._credit(admin, org, key), deadline, tries=5)
            leases = {(self._org(n), f"{self.name}-l{n}") for n in range(self._leases_tried())}
            for org, lease in sorted(leases):
                _retried(lambda: self._release(service, org, lease), deadline)

    def _leases_tried(self) -> int:
        return sum(n for (what, _), n in self.seen.answers.items() if what == "lease")

    def violations(self, admin: httpx.Client, sql, before: dict[str, tuple[int, int]]) -> list[str]:
        """Every broken promise; `before` is each org's (balance, ticks billed) before the traffic."""
        found = [f"caller saw {what} -> {status}: {body}" for what, status, body in self.seen.bad]
        self.checks = sum(self.seen.answers.values())  # every answer a caller got was checked
        unsettled = [n for n, acked in self.usage_sent.items() if not acked]
        self._check(not unsettled, f"usage requests never acknowledged after the fault: {unsettled[:5]}", found)
        ticks_sent = Counter(t["org_id"] for n in self.usage_sent for t in self._usage_body(n)["ticks"])
        for org in self.orgs:
            self._org_violations(admin, sql, org, *before[org], ticks_sent[org], found)
        return found

    def _check(self, holds: bool, problem: str, found: list[str]) -> None:
        self.checks += 1
        if not holds:
            found.append(problem)

    def _org_violations(self, admin, sql, org: str, start_micros: int, start_ticks: int, ticks: int,
                        found: list[str]) -> None:
        billed = billed_ticks(sql, org) - start_ticks
        self._check(billed == ticks, f"{org}: {ticks} ticks sent and acknowledged, {billed} billed", found)
        notes = Counter(r["note"] for r in sql.fetch(
            "SELECT note FROM ledger WHERE org_id = $1 AND kind = 'grant' AND note LIKE $2", org, f"{self.name}-c%"))
        for key, (owner, acked) in self.credits_sent.items():
            if owner == org:  # acknowledged: exactly once; not acknowledged: at most once
                self._check(notes[key] == 1 if acked else notes[key] <= 1,
                            f"{org}: credit {key} (acknowledged: {acked}) is in the ledger {notes[key]} times", found)
        expected = start_micros + sum(notes.values()) * CREDIT_MICROS - ticks * TICK_MICROS
        state = admin.get(f"/v1/orgs/{org}").json()
        ledger = sql.val("SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger WHERE org_id = $1", org)
        self._check(state["balance_micros"] == ledger == expected,
                    f"{org}: balance {state['balance_micros']}, ledger {ledger}, expected {expected}", found)
        self._check(state["active_leases"] == 0,
                    f"{org}: {state['active_leases']} leases counted after all were released", found)
        gate = admin.post("/v1/gate", json={"org_id": org, "action": "create"}).json()
        self._check(gate["allowed"] and gate["balance_micros"] == state["balance_micros"]
                    and gate["active_leases"] == 0, f"{org}: gate after the fault {gate}, state {state}", found)

    def summary(self) -> dict:
        ticks = sum(TICKS_PER_REQUEST for _ in self.usage_sent)
        return {"requests": sum(self.seen.answers.values()), "ticks": ticks, "credits": len(self.credits_sent),
                "gate_checks": self.gates,
                "not_acknowledged": sum(n for (w, s), n in self.seen.answers.items()
                                        if s not in (200, 201, 204)),
                "violations_seen_by_callers": len(self.seen.bad)}


def _retried(attempt, deadline: float, tries: int | None = None) -> bool:
    """Whether `attempt()` returned True within `tries` attempts (any number if None), none
    of them begun past `deadline`."""
    tried = 0
    while (tries is None or tried < tries) and time.monotonic() < deadline:
        if attempt():
            return True
        tried += 1
        time.sleep(0.2)
    return False
