"""A model-based test against the running service (issue 11, part 1).

A Hypothesis state machine drives one org per example over HTTP: grants (some expiring),
Stripe top-ups, refunds and adjustments, usage ticks (and a tick sent again), leases taken
and released through the API and through Svix webhooks, admin halt and resume, tier changes,
and the test clock (grants and leases expire, a weekly quota period resets). After every step
the org the service shows (balance, debt, grants in burn order, period usage, halt, leases),
the ledger in Postgres and the gate's decisions for `create` and `ingest` must equal a small
model of the rules docs/concepts/billing-rules.md and docs/reference/http-api.md state.

The model is written here from those rules, not imported from metergate's core: a core bug
copied into the oracle could never fail this test. It covers the payg and hobby_weekly
plans, prepaid and postpaid, and only what the rules below drive.

Time: the service's clock is real time plus the shared test clock's offset, so the model
never assumes an absolute time. It reads the clock before every step, and keeps every moment
at which time alone changes the org (an expiry, the period's end) at least a minute away
from "now" by moving the clock past it, so that real time passing during a step can never
decide an expiry the model did not see.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from tests.helpers import (
    HOUR_TICK_MICROS,
    SIGNUP_MICROS,
    TICK_MICROS,
    advance,
    clock_us,
    ledger_sum,
    stripe_deliver,
    stripe_event,
    svix_signed,
)

pytestmark = pytest.mark.time_travel

US = 1_000_000
HOUR_S = 3_600
DAY_S = 86_400

# ----- the rules, as docs/concepts/billing-rules.md and config/catalog.toml state them -------

# Both plans price usage alike (catalog.toml): nano-USD per GiB-second and per vCPU-second.
MEMORY_NANOS_PER_GIB_S = 4_500
CPU_NANOS_PER_VCPU_S = 14_000
PLANS = {"payg": ("month", 0), "hobby_weekly": ("week", 5_000_000)}  # period, included quota
TIER_CAPS = {"base": 5, "pro": 100}
MAX_DISK_MB = 20_480  # default_max_disk_mb
PURCHASED = frozenset({"topup", "adjustment"})  # promotional: signup_grant, grant
PAID = frozenset({"topup"})  # money paid: the org no longer needs a card to be told it ran out
DENY_STATUS = {"halted": 402, "insufficient_balance": 402, "quota_exceeded": 402, "no_payment_method": 402,
               "concurrency_limit": 429, "resource_limit": 403}


def tick_cost_micros(gib: int, vcpus: int, seconds: int) -> int:
    nanos = (MEMORY_NANOS_PER_GIB_S * gib + CPU_NANOS_PER_VCPU_S * vcpus) * seconds
    assert nanos % 1_000 == 0, "every tick of this test costs whole micro-USD: no remainder is carried"
    return nanos // 1_000


# The rates above must be the ones the shared helpers were written against.
assert tick_cost_micros(4, 2, HOUR_S) == HOUR_TICK_MICROS
assert tick_cost_micros(1, 0, 10) == TICK_MICROS


def period_end_us(period: str, now_us: int) -> int:
    """End of the calendar period (ISO week or month, UTC) holding now_us."""
    today = date(1970, 1, 1) + timedelta(days=now_us // (DAY_S * US))
    if period == "week":
        end = today + timedelta(days=7 - today.weekday())
    else:
        end = (today.replace(day=28) + timedelta(days=4)).replace(day=1)
    return (end - date(1970, 1, 1)).days * DAY_S * US


def parse_us(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return round((moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) / timedelta(microseconds=1))


def rfc3339(us: int) -> str:
    assert us % US == 0
    return datetime.fromtimestamp(us // US, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Grant:
    seq: int  # order of arrival: equal grants burn oldest first
    kind: str
    remaining_micros: int
    expires_us: int | None


def burn_key(grant: Grant) -> tuple:
    """Expiring grants soonest first, then promotional credit, then purchased credit."""
    return (grant.expires_us is None, grant.expires_us or 0, grant.kind in PURCHASED, grant.seq)


def clawback_key(grant: Grant) -> tuple:
    """A refund takes purchased credit first, then the rest in burn order."""
    return (grant.kind not in PURCHASED,) + burn_key(grant)


@dataclass
class Lease:
    quantity: int
    ttl_s: int
    expires_us: int


@dataclass
class OrgModel:
    prepaid: bool
    period: str
    included_micros: int
    period_end_us: int
    max_concurrent: int = TIER_CAPS["base"]
    grants: list[Grant] = field(default_factory=list)
    debt_micros: int = 0
    ledger_micros: int = 0
    period_usage_micros: int = 0
    quota_used_micros: int = 0
    halted: str | None = None  # "balance" | "admin"
    paid: bool = False
    seq: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    ended: dict[str, int] = field(default_factory=dict)  # lease id → when it ended (its id is barred an hour)

    # ----- reads --------------------------------------------------------------------------

    @property
    def balance_micros(self) -> int:
        return sum(g.remaining_micros for g in self.grants) - self.debt_micros

    @property
    def quota_remaining_micros(self) -> int:
        return max(0, self.included_micros - self.quota_used_micros)

    @property
    def funded(self) -> bool:
        return self.balance_micros + self.quota_remaining_micros > 0

    @property
    def active_leases(self) -> int:
        return sum(lease.quantity for lease in self.leases.values())

    def moments_us(self) -> list[int]:
        """When time alone next changes this org."""
        return ([g.expires_us for g in self.grants if g.expires_us is not None]
                + [lease.expires_us for lease in self.leases.values()] + [self.period_end_us]
                + [ended_us + HOUR_S * US for ended_us in self.ended.values()])

    def decide(self, action: str, quantity: int = 1, disk_mb: int = 0) -> str:
        """The gate's reason: halted, then money, then (create) resource, then concurrency."""
        if self.halted == "admin":
            return "halted"
        if not self.funded:
            needs_card = not self.paid  # no card is ever saved in this test
            if self.halted == "balance":
                return "no_payment_method" if action == "create" and needs_card else "halted"
            if self.prepaid:  # postpaid with overage is never denied for money
                if action == "create" and needs_card:
                    return "no_payment_method"
                return "quota_exceeded" if self.included_micros else "insufficient_balance"
        if action == "create":
            if disk_mb > MAX_DISK_MB:
                return "resource_limit"
            if self.active_leases + quantity > self.max_concurrent:
                return "concurrency_limit"
        return "ok"

    # ----- money --------------------------------------------------------------------------

    def _take(self, micros: int, key) -> None:
        for grant in sorted(self.grants, key=key):
            taken = min(grant.remaining_micros, micros)
            grant.remaining_micros -= taken
            micros -= taken
        self.grants = [g for g in self.grants if g.remaining_micros > 0]
        self.debt_micros += micros  # what no credit covers is debt, taken from the next credit

    def _halt_if_out_of_money(self) -> None:
        if self.prepaid and self.halted is None and not self.funded:
            self.halted = "balance"

    def _resume_if_funded(self) -> None:
        if self.halted == "balance" and self.funded:
            self.halted = None

    def credit(self, kind: str, micros: int, expires_us: int | None = None) -> None:
        self.seq += 1
        self.paid |= kind in PAID
        self.ledger_micros += micros
        to_debt = min(self.debt_micros, micros)
        self.debt_micros -= to_debt
        if micros > to_debt:
            self.grants.append(Grant(self.seq, kind, micros - to_debt, expires_us))
        self._resume_if_funded()  # credit lifts a halt for money, never an admin halt

    def debit(self, micros: int) -> None:
        self.ledger_micros -= micros
        self._take(micros, clawback_key)
        self._halt_if_out_of_money()

    def spend(self, micros: int) -> None:
        self.period_usage_micros += micros
        from_quota = min(micros, self.quota_remaining_micros)
        self.quota_used_micros += from_quota
        if micros > from_quota:
            # Prepaid: what no grant covers is debt. Postpaid: it is invoiced through Stripe,
            # not taken from the balance (billing-rules 6.2).
            rest = micros - from_quota
            taken = rest if self.prepaid else min(rest, sum(g.remaining_micros for g in self.grants))
            self.ledger_micros -= taken
            self._take(taken, burn_key)
        self._halt_if_out_of_money()

    def halt(self) -> None:
        self.halted = "admin"

    def resume(self) -> None:
        if self.halted is not None:
            self.halted = None
            self._halt_if_out_of_money()  # still out of money: halted again, for balance

    # ----- leases and time ----------------------------------------------------------------

    def lease(self, lease_id: str, quantity: int, disk_mb: int, ttl_s: int, now_us: int) -> tuple[int, str]:
        """(status, reason) of taking a lease; the same lease id again is that lease."""
        if lease_id in self.leases:
            return 200, "ok"
        if now_us - self.ended.get(lease_id, -HOUR_S * US - 1) <= HOUR_S * US:
            return 409, "lease_ended"  # a take after its lease ended (released or expired) is refused
        reason = self.decide("create", quantity, disk_mb)
        if reason != "ok":
            return DENY_STATUS[reason], reason
        self.leases[lease_id] = Lease(quantity, ttl_s, now_us + ttl_s * US)
        return 201, "ok"

    def tick(self, micros: int, lease_id: str, now_us: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None:  # a tick is a heartbeat of its lease
            lease.expires_us = max(lease.expires_us, now_us + lease.ttl_s * US)
        self.spend(micros)

    def advance(self, now_us: int) -> None:
        """What time alone changed by now_us: a new period, lapsed grants, expired leases."""
        new_period = now_us >= self.period_end_us
        if new_period:
            self.period_end_us = period_end_us(self.period, now_us)
            self.period_usage_micros = self.quota_used_micros = 0
        lapsed = [g for g in self.grants if g.expires_us is not None and g.expires_us <= now_us]
        if lapsed:
            self.ledger_micros -= sum(g.remaining_micros for g in lapsed)  # the unused part lapses
            self.grants = [g for g in self.grants if g not in lapsed]
            self._halt_if_out_of_money()
        for lease_id in [i for i, lease in self.leases.items() if lease.expires_us <= now_us]:
            del self.leases[lease_id]
            self.ended[lease_id] = now_us
        self.ended = {i: at for i, at in self.ended.items() if now_us - at <= HOUR_S * US}
        if new_period:
            self._resume_if_funded()  # new quota is money to spend


# ----- the run's bounds and counts ---------------------------------------------------------

# Other clock-moving tests run after this one (tests/test_time_travel.py's meter rollup looks
# back 35 days of service time at ticks of real time), so the clock moves little: hours per
# example, STEPS_ADVANCE_S in all, and one jump over a week's end (at most 7 days).
STEPS_ADVANCE_S = 4 * DAY_S
EXAMPLE_ADVANCE_S = 4 * HOUR_S
JUMPS_PER_SESSION = 1
CLEARANCE_S = 60  # no expiry closer to now than this when a step runs
TICK_ID_KEPT_S = 24 * HOUR_S  # tick ids are kept at least 24 h: a resend within it is a duplicate

STATS = {"examples": 0, "steps": 0, "requests": 0, "comparisons": 0, "advanced_s": 0, "jumps": 0, "jumped_s": 0,
         "denied_leases": 0, "checks_while_halted": 0, "expired_grants": 0, "period_resets": 0}

RULES_RUN: dict[str, int] = {}

# (GiB, vCPUs, seconds): from 45 micro-USD to 5.76 USD, more than a signup grant in one tick
TICK_SIZES = ((1, 0, 10), (1, 0, 10), (4, 2, HOUR_S), (4, 2, HOUR_S), (64, 8, HOUR_S), (256, 32, HOUR_S))
LEASES = {"ls_a": (1, 0), "ls_b": (2, 0), "ls_c": (3, 0), "ls_disk": (1, 30_000)}  # quantity, disk_mb
LEASE_TTLS_S = (1_200, 5_400, DAY_S)
GRANT_EXPIRY_S = (None, 900, 1_800, 2 * HOUR_S, 3 * HOUR_S, 26 * HOUR_S)
amounts = st.sampled_from((1, 45_000, 1_000_000, 2_500_000, 6_000_000))


class OrgAgainstModel(RuleBasedStateMachine):
    admin = compute = sql = None  # the session's clients, set by the test

    # ----- plumbing -----------------------------------------------------------------------

    def call(self, client, method: str, url: str, **kwargs):
        STATS["requests"] += 1
        return client.request(method, url, **kwargs)

    def same(self, what: str, service_value, model_value) -> None:
        STATS["comparisons"] += 1
        assert service_value == model_value, f"{what}: service {service_value!r}, model {model_value!r}"

    def now(self) -> int:
        STATS["requests"] += 1
        return clock_us(self.admin)

    def move_clock(self, seconds: int) -> None:
        """Advance the shared clock; the sweep it runs applies what became due, and so does the model."""
        for _ in range(5):
            STATS["requests"] += 1
            moved = advance(self.admin, seconds)
            STATS["advanced_s"] += seconds
            self.advanced_s += seconds
            if moved["ran"]["sweep"] is not None:
                break
            # The scheduler's own sweep held the job's lock and may have run before the jump:
            # move one more second so that a sweep surely runs after it.
            seconds = 1
            time.sleep(0.2)
        else:
            raise AssertionError("the sweep never ran after the test clock moved")
        self.apply_time(moved["now_us"])

    def apply_time(self, now_us: int) -> None:
        model = self.model
        before = (model.period_end_us, len(model.grants))
        model.advance(now_us)
        STATS["period_resets"] += model.period_end_us != before[0]
        STATS["expired_grants"] += before[1] - len(model.grants)

    def step(self, name: str) -> int:
        """Start a step: read the clock; move it past any expiry that is about to happen."""
        STATS["steps"] += 1
        RULES_RUN[name] = RULES_RUN.get(name, 0) + 1
        for _ in range(3):
            now = self.now()
            soon = [m for m in self.model.moments_us() if m <= now + CLEARANCE_S * US]
            if not soon:
                return now
            self.move_clock(max(2 * CLEARANCE_S, (max(soon) - now) // US + CLEARANCE_S))
        raise AssertionError("expiries kept falling due")

    def clock_budget_left(self, seconds: int) -> bool:
        return (self.advanced_s + seconds <= EXAMPLE_ADVANCE_S
                and STATS["advanced_s"] - STATS["jumped_s"] + seconds <= STEPS_ADVANCE_S)

    # ----- the org ------------------------------------------------------------------------

    @initialize(kind=st.sampled_from((("payg", True), ("payg", True), ("hobby_weekly", True),
                                      ("hobby_weekly", False), ("payg", False))))
    def create_org(self, kind):
        STATS["examples"] += 1
        plan_id, prepaid = kind
        period, included = PLANS[plan_id]
        self.advanced_s = 0
        self.ticks: list[tuple[dict, int]] = []  # (body, sent at)
        now = self.now()
        if period_end_us(period, now) - now < 2 * CLEARANCE_S * US:
            STATS["requests"] += 1
            advance(self.admin, 3 * CLEARANCE_S)  # not born on a period's edge
            STATS["advanced_s"] += 3 * CLEARANCE_S
            now = self.now()
        self.model = OrgModel(prepaid, period, included, period_end_us(period, now))
        self.model.credit("signup_grant", SIGNUP_MICROS)
        self.org_id = f"mdl_{uuid.uuid4().hex[:12]}"
        created = self.call(self.admin, "POST", "/v1/orgs", json={
            "org_id": self.org_id, "email": f"{self.org_id}@example.com", "plan_id": plan_id,
            "billing_mode": "prepaid" if prepaid else "postpaid"})
        self.same("create status", created.status_code, 201)

    # ----- money in and out ---------------------------------------------------------------

    @rule(micros=amounts, expires_in=st.sampled_from(GRANT_EXPIRY_S))
    def grant(self, micros, expires_in):
        now = self.step("grant")
        expires_us = None if expires_in is None else (now // US + expires_in) * US
        body = {"kind": "grant", "amount_micros": micros}
        if expires_us is not None:
            body["expires_at"] = rfc3339(expires_us)
        answer = self.call(self.admin, "POST", f"/v1/orgs/{self.org_id}/credits", json=body)
        self.model.credit("grant", micros, expires_us)
        self.same("grant status", answer.status_code, 201)
        self.same("balance in the grant's answer", answer.json()["balance_micros"], self.model.balance_micros)

    @rule(cents=st.sampled_from((50, 500, 2_000)))
    def stripe_topup(self, cents):
        self.step("stripe_topup")
        session = {"id": f"cs_{uuid.uuid4().hex[:12]}", "object": "checkout.session", "mode": "payment",
                   "payment_status": "paid", "amount_total": cents, "payment_intent": f"pi_{uuid.uuid4().hex}",
                   "client_reference_id": self.org_id, "metadata": {"org_id": self.org_id}}
        STATS["requests"] += 1
        answer = stripe_deliver(self.compute, stripe_event("checkout.session.completed", session))
        self.model.credit("topup", cents * 10_000)
        self.same("top-up status", answer.status_code, 200)
        self.same("top-up applied to", [a["org_id"] for a in answer.json()["applied"]], [self.org_id])

    @rule(micros=amounts)
    def refund(self, micros):
        self.step("refund")
        answer = self.call(self.admin, "POST", f"/v1/orgs/{self.org_id}/credits",
                           json={"kind": "refund", "amount_micros": micros, "note": "model refund"})
        self.model.debit(micros)
        self.same("refund status", answer.status_code, 201)
        self.same("refund entry", answer.json()["amount_micros"], -micros)

    @rule(micros=amounts, negative=st.booleans())
    def adjust(self, micros, negative):
        self.step("adjust")
        answer = self.call(self.admin, "POST", f"/v1/orgs/{self.org_id}/credits",
                           json={"kind": "adjustment", "amount_micros": -micros if negative else micros})
        if negative:
            self.model.debit(micros)
        else:
            self.model.credit("adjustment", micros)
        self.same("adjustment status", answer.status_code, 201)

    # ----- usage --------------------------------------------------------------------------

    @rule(size=st.sampled_from(TICK_SIZES), lease_id=st.sampled_from(tuple(LEASES) + ("ls_none",)))
    def tick(self, size, lease_id):
        now = self.step("tick")
        gib, vcpus, seconds = size
        body = {"ticks": [{"tick_id": f"t{len(self.ticks)}", "org_id": self.org_id, "lease_id": lease_id,
                           "started_at": rfc3339(now // US * US), "duration_ms": seconds * 1_000,
                           "memory_mb": gib * 1_024, "cpu_count": vcpus}]}
        answer = self.call(self.compute, "POST", "/v1/usage", json=body)
        self.model.tick(tick_cost_micros(gib, vcpus, seconds), lease_id, now)
        self.ticks.append((body, now))
        self.same("tick answer", answer.json(), {"accepted": 1, "duplicates": 0, "rejected": []})

    @precondition(lambda self: self.ticks)
    @rule(which=st.integers(0, 10))
    def tick_again(self, which):
        """A tick sent again (a retry) is recognised and changes nothing."""
        now = self.step("tick_again")
        body, sent_us = self.ticks[-1 - which % len(self.ticks)]
        if now - sent_us >= TICK_ID_KEPT_S * US:
            return  # its id may be forgotten by now, as documented
        answer = self.call(self.compute, "POST", "/v1/usage", json=body)
        self.same("duplicate tick answer", answer.json(), {"accepted": 0, "duplicates": 1, "rejected": []})

    # ----- leases -------------------------------------------------------------------------

    def expect_lease(self, lease_id: str, ttl_s: int, now: int) -> tuple[int, str, dict]:
        quantity, disk_mb = LEASES[lease_id]
        status, reason = self.model.lease(lease_id, quantity, disk_mb, ttl_s, now)
        STATS["denied_leases"] += status >= 400
        body = {"org_id": self.org_id, "lease_id": lease_id, "ttl_s": ttl_s,
                "resources": {"memory_mb": 1_024, "cpu_count": 1, "quantity": quantity, "disk_mb": disk_mb}}
        return status, reason, body

    @rule(lease_id=st.sampled_from(tuple(LEASES)), ttl_s=st.sampled_from(LEASE_TTLS_S))
    def take_lease(self, lease_id, ttl_s):
        now = self.step("take_lease")
        status, reason, body = self.expect_lease(lease_id, ttl_s, now)
        answer = self.call(self.compute, "POST", "/v1/leases", json=body)
        self.same(f"lease {lease_id} status", answer.status_code, status)
        if reason == "lease_ended":
            self.same(f"lease {lease_id} refusal", answer.json()["error"]["code"], reason)
        elif status >= 400:
            self.same(f"lease {lease_id} deny", (answer.json()["reason"], answer.json()["error"]["code"]),
                      (reason, reason))

    @rule(lease_id=st.sampled_from(tuple(LEASES)), ttl_s=st.sampled_from(LEASE_TTLS_S))
    def sandbox_started(self, lease_id, ttl_s):
        now = self.step("sandbox_started")
        status, reason, body = self.expect_lease(lease_id, ttl_s, now)
        signed_body, headers = svix_signed({"type": "sandbox.started", "data": body})
        answer = self.call(self.compute, "POST", "/webhooks/svix", content=signed_body, headers=headers)
        self.same("sandbox.started status", answer.status_code, 200)  # a deny is news, not a failure
        result = answer.json()["result"]
        if reason == "lease_ended":  # a late start of a stopped sandbox: news, with the refusal
            self.same(f"sandbox.started {lease_id}", result["error"]["code"], reason)
            return
        self.same(f"sandbox.started {lease_id}", result.get("reason", "ok") if status >= 400 else result["lease_id"],
                  reason if status >= 400 else lease_id)

    @rule(lease_id=st.sampled_from(tuple(LEASES)), by_webhook=st.booleans())
    def release_lease(self, lease_id, by_webhook):
        now = self.step("release_lease")
        if by_webhook:
            signed_body, headers = svix_signed({"type": "sandbox.stopped",
                                                "data": {"org_id": self.org_id, "lease_id": lease_id}})
            answer = self.call(self.compute, "POST", "/webhooks/svix", content=signed_body, headers=headers)
            self.same("sandbox.stopped status", answer.status_code, 200)
        else:
            answer = self.call(self.compute, "DELETE", f"/v1/leases/{self.org_id}/{lease_id}")
            self.same("release status", answer.status_code, 204)  # also when already gone
        self.model.leases.pop(lease_id, None)
        self.model.ended[lease_id] = now  # held or not: the id is barred for an hour

    # ----- operator -----------------------------------------------------------------------

    @rule()
    def halt(self):
        self.step("halt")
        answer = self.call(self.admin, "POST", f"/v1/orgs/{self.org_id}/halt")
        self.model.halt()
        self.same("halt answer", (answer.status_code, answer.json()["halt_reason"]), (200, "admin"))

    @rule()
    def resume(self):
        self.step("resume")
        answer = self.call(self.admin, "POST", f"/v1/orgs/{self.org_id}/resume")
        self.model.resume()
        self.same("resume answer", (answer.status_code, answer.json()["halt_reason"]), (200, self.model.halted))

    @rule(tier=st.sampled_from(tuple(TIER_CAPS)))
    def set_tier(self, tier):
        self.step("set_tier")
        answer = self.call(self.admin, "PUT", f"/v1/orgs/{self.org_id}/tier", json={"tier": tier})
        self.model.max_concurrent = TIER_CAPS[tier]  # a lower cap ends no running lease
        self.same("tier answer", (answer.status_code, answer.json()["max_concurrent"]), (200, TIER_CAPS[tier]))

    # ----- time ---------------------------------------------------------------------------

    # Two rules, so that an example rarely runs without time passing: Hypothesis turns some
    # rules off in each example (swarm testing). The clock's budget is checked in the body,
    # not in a precondition: a precondition reading state outside the example is flaky to
    # Hypothesis.
    @rule(seconds=st.sampled_from((600, 1_200)))
    def minutes_pass(self, seconds):
        self.step("minutes_pass")
        if self.clock_budget_left(seconds):
            self.move_clock(seconds)

    @rule(hours=st.sampled_from((1, 2)))
    def hours_pass(self, hours):
        self.step("hours_pass")
        if self.clock_budget_left(hours * HOUR_S):
            self.move_clock(hours * HOUR_S)

    @precondition(lambda self: self.model.period == "week")
    @rule()
    def week_ends(self):
        """Jump past the end of the quota period: the quota is new, a halt for money lifts."""
        now = self.step("week_ends")
        if STATS["jumps"] < JUMPS_PER_SESSION:
            STATS["jumps"] += 1
            seconds = (self.model.period_end_us - now) // US + HOUR_S
            STATS["jumped_s"] += seconds
            self.move_clock(seconds)

    # ----- after every step: the service equals the model ---------------------------------

    @invariant()
    def service_matches_model(self):
        model = self.model
        STATS["requests"] += 1
        state = self.admin.get(f"/v1/orgs/{self.org_id}").json()
        self.same("balance_micros", state["balance_micros"], model.balance_micros)
        self.same("debt_micros", state["debt_micros"], model.debt_micros)
        self.same("grants in burn order",
                  [(g["kind"], g["remaining_micros"], g["expires_at"] and parse_us(g["expires_at"]))
                   for g in state["grants"]],
                  [(g.kind, g.remaining_micros, g.expires_us) for g in sorted(model.grants, key=burn_key)])
        self.same("halt", (state["is_halted"], state["halt_reason"]), (model.halted is not None, model.halted))
        self.same("active_leases", state["active_leases"], model.active_leases)
        self.same("leases", sorted((l["lease_id"], l["quantity"]) for l in state["leases"]),
                  sorted((i, lease.quantity) for i, lease in model.leases.items()))
        for held in state["leases"]:  # renewals: the model knows each expiry to a step's latency
            drift_s = abs(parse_us(held["expires_at"]) - model.leases[held["lease_id"]].expires_us) / US
            self.same(f"lease {held['lease_id']} expiry within 5 s", drift_s < 5, True)
        self.same("max_concurrent", state["max_concurrent"], model.max_concurrent)
        period = state["period"]
        self.same("period", (period["usage_micros"], period["quota_used_micros"], parse_us(period["resets_at"])),
                  (model.period_usage_micros, model.quota_used_micros, model.period_end_us))
        STATS["requests"] += 1
        ledger = ledger_sum(self.sql, self.org_id)
        self.same("ledger sum", ledger, model.ledger_micros)
        self.same("ledger sum is the balance", ledger, state["balance_micros"])
        STATS["checks_while_halted"] += model.halted is not None
        for action in ("create", "ingest"):
            gate = self.call(self.compute, "POST", "/v1/gate", json={
                "org_id": self.org_id, "action": action, "resources": {"memory_mb": 1_024, "cpu_count": 1}})
            decision = gate.json()
            reason = model.decide(action)
            self.same(f"gate {action}", (gate.status_code, decision["allowed"], decision["reason"]),
                      (200, reason == "ok", reason))
            self.same(f"gate {action} figures", (decision["balance_micros"], decision["active_leases"]),
                      (model.balance_micros, model.active_leases))


@pytest.mark.time_travel
def test_an_org_under_random_commands_over_http_matches_the_model_after_every_step(admin, compute, sql):
    OrgAgainstModel.admin, OrgAgainstModel.compute, OrgAgainstModel.sql = admin, compute, sql
    started = time.monotonic()
    # No shrinking: every replay would make another org and move the shared clock again.
    run_state_machine_as_test(OrgAgainstModel, settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None, database=None,
        phases=(Phase.generate,)))
    print(f"\nmodel test: {STATS} in {time.monotonic() - started:.0f} s\nrules run: {RULES_RUN}")
    assert STATS["examples"] >= 20
    assert STATS["comparisons"] > 10 * STATS["steps"]
