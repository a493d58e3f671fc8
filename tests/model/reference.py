"""Independent reference model of metergate's money rules.

Written from docs/concepts/billing-rules.md ALONE (plus config/catalog.toml for the catalog
file format). Nothing here is read from or imported from the engine. Deliberately simple and
slow: plain ints, lists and dicts, datetime for calendars, no floats for money, no caching.

Rule numbers in comments refer to billing-rules.md. Every point where the rules are silent or
ambiguous is marked `# AMBIGUOUS:` with the choice made.

AMBIGUOUS (cross-references): 1.2 step 5 and 2.6 call the auto-recharge check "rule 6.2" and
1.3 calls the held-back charge "rule 6.3"; the rules meant are 9.2 and 9.3 (6.2 is spending,
6.3 the lease heartbeat). The model runs the check of 9.2 there.
AMBIGUOUS 6.5: the hourly Stripe meter events are not modelled; the invoiced part of each usage
ledger entry (5th field) is what they would sum.
"""

from __future__ import annotations

import copy

from tests.model.basics import (  # noqa: F401 - also what the model's tests import from here
    DISPUTE_MEMORY_US,
    CENT_MICROS,
    Dunning,
    ENDED_LEASE_MEMORY_US,
    Grant,
    Lease,
    MAX_CHARGE_MICROS,
    MAX_ENDED_LEASES,
    MAX_GRANTS,
    PAID,
    REFUND_MEMORY_US,
    REFUND_WAIT_US,
    Recharge,
    RefCatalog,
    RefPlan,
    SCALE,
    US,
    UTC,
    WaitingRefund,
    share,
    share_after,
    SHADOW_FOREVER,
    SHADOWED,
    calendar_period,
    dt_to_us,
    kind_is_purchased,
    rfc3339,
    sub_key,
    utc_day,
)
from tests.model.commands import Commands


# ----------------------------------------------------------------------------------------
# The org
# ----------------------------------------------------------------------------------------

class RefOrg(Commands):
    def __init__(self, catalog: RefCatalog, org_id: str, plan_id: str, prepaid: bool, now_us: int,
                 imported: dict | None = None, shadow: bool = False):
        """`imported`: the org is created by this import (rule 2.11): no signup grant, and rule
        4.5's check after the import."""
        self.catalog = catalog
        self.org_id = org_id
        self.prepaid = bool(prepaid)
        self.created_us = now_us
        self.last_now_us = now_us

        found = catalog.plan_in_effect(plan_id, now_us)   # rule 5.3
        if found is None:
            raise ValueError(f"no version of plan {plan_id!r} is in effect at {now_us}")
        self.plan_id, self.plan_version = found

        # money
        self.grants: list[Grant] = []          # in the order the org holds them (creation order)
        self.debt = 0
        self.credit_n = 0
        self.paid_credit = False
        self.has_payment_method = False
        self.remainder_scaled = 0

        # halts, dunning
        self.halted: str | None = None
        self.suspended = False
        self.degraded = False
        self.dunning: Dunning | None = None
        self.latest_invoice_news_us: int | None = None
        self.paid_an_invoice = False

        # period (rule 5.2: the calendar until a subscription gives a whole period)
        self.grid: tuple[int, int] | None = None          # (a, L) once a subscription gave [a, e)
        self.sub_latest_start_us: int | None = None
        key, start, end = calendar_period(self.plan.period, now_us)
        self.period_key, self.period_start_us, self.period_end_us = key, start, end
        self.period_usage = 0
        self.quota_used = 0
        self.quota_flags: set[int] = set()

        # leases and limits
        self.leases: dict[str, Lease] = {}           # insertion order = the order they were taken
        self.ended_leases: dict[str, int] = {}       # lease id -> the time it ended
        self.tier = catalog.default_tier
        self.max_concurrent = catalog.tiers.get(catalog.default_tier, 0)
        self.tier_as_of_us: int | None = None
        self.max_disk_mb = catalog.default_max_disk_mb
        self.machine_quotas: dict = {}

        # refunds and disputes
        self.applied_refunds: dict[str, int] = {}    # refund id -> when applied
        self.waiting_refunds: list[WaitingRefund] = []
        self.refund_taken: dict[str, tuple] = {}     # refund id -> (taken, grant kind, grant expiry, payment)
        self.refund_amounts: dict[str, tuple] = {}   # refund id -> (its amount R, its share), one that took credit (3.0)
        self.reversed_refunds: set[str] = set()
        self.disputes: dict[str, dict] = {}          # dispute id -> what rule 3.6 remembers
        self.lapsed: dict[str, int] = {}             # payment id -> what of its credit lapsed (rule 2.6)
        self.paid_credits: dict[str, tuple] = {}     # payment id -> (A, P) of its credit (rules 2.3 step 7, 3.0)

        # subscriptions (rule 7.7), in the order of their latest report
        self.subscriptions: dict[str, dict] = {}
        self.settled_invoices: list[str] = []        # rule 8.3: the latest 100

        # usage
        self.billed_ticks: set[str] = set()

        # auto-recharge
        self.recharge: Recharge | None = None
        self.charge_k = 0

        # alerts (rule 2.9)
        self.low_balance_micros = catalog.low_balance_micros
        self.low_balance_armed = True
        self.runway_alert_s = catalog.runway_alert_s   # rule 2.10
        self.runway_armed = True

        # effects
        self._fx_ledger: list = []
        self._fx_events: list = []
        self._fx_charges: list = []
        self._fx_periods: list = []

        self.imported_ids: list[str] = []             # rule 2.11: source ids imported, never forgotten

        # creation is a command at now_us (rule 4.5); in shadow if it says so (rule 2.12)
        shadow = shadow or bool((imported or {}).get("shadow"))
        self.shadow_until = SHADOW_FOREVER if shadow else None
        self.cutover_told = False
        signup = catalog.signup_grant_micros
        if imported is not None:
            self.import_result = self._cmd_import(now_us, imported)
            if self.prepaid:
                self._halt_check(now_us)
        elif signup > 0:
            self._credit(now_us, "signup_grant", signup, None, None)
        elif self.prepaid:
            self._halt_check(now_us)
        self._low_balance_rule()
        self._runway_rule(now_us)
        self._shadow_events(0, now_us)

    # ------------------------------------------------------------------ basic reads

    @property
    def plan(self) -> RefPlan:
        return self.catalog.plan(self.plan_id, self.plan_version)

    def _balance(self) -> int:
        """Rule 2.1, after advance (every grant held is live)."""
        return sum(g.remaining for g in self.grants) - self.debt

    def _balance_at(self, now: int) -> int:
        """Rule 2.1 as a read: only grants live at now."""
        return sum(g.remaining for g in self.grants
                   if g.expires_at_us is None or now < g.expires_at_us) - self.debt

    def _quota_remaining(self) -> int:
        # AMBIGUOUS 5.5: after a plan change to a smaller quota, quota used may exceed the new
        # plan's included; quota remaining is floored at 0.
        return max(0, self.plan.included_micros - self.quota_used)

    def _funded(self) -> bool:
        return self._balance() + self._quota_remaining() > 0     # rule 4.1

    def _needs_card(self) -> bool:
        return not self.has_payment_method and not self.paid_credit   # rule 7.1

    def _burn_order(self, grants: list[Grant]) -> list[Grant]:
        """Rule 2.4."""
        def key(g: Grant):
            has_expiry = g.expires_at_us is not None
            return (0 if has_expiry else 1,
                    g.expires_at_us if has_expiry else 0,
                    1 if kind_is_purchased(g.kind) else 0,
                    g.seq)
        return sorted(grants, key=key)

    def _clawback_order(self) -> list[Grant]:
        """Rule 2.5."""
        burn = self._burn_order(self.grants)
        return [g for g in burn if kind_is_purchased(g.kind)] + [g for g in burn if not kind_is_purchased(g.kind)]

    # ------------------------------------------------------------------ effects

    def _ledger(self, kind, amount, grant_id, expires, invoiced=0):
        self._fx_ledger.append((kind, amount, grant_id, expires, invoiced))

    def _event(self, type_, data):
        self._fx_events.append((type_, data))

    def take_effects(self) -> dict:
        out = {
            "ledger": list(self._fx_ledger),
            "events": list(self._fx_events),
            "charges": [tuple(c) for c in self._fx_charges],
            "periods": list(self._fx_periods),
        }
        self._fx_ledger, self._fx_events, self._fx_charges, self._fx_periods = [], [], [], []
        return out

    # ------------------------------------------------------------------ money primitives

    def _take(self, amount: int, order: list[Grant]) -> int:
        """Rule 2.7 without the debt: returns what the grants could not cover."""
        left = amount
        for g in order:
            if left == 0:
                break
            give = min(g.remaining, left)
            g.remaining -= give
            left -= give
        self.grants = [g for g in self.grants if g.remaining > 0]
        return left

    def _credit(self, now: int, kind: str, amount: int, expires: int | None, payment_id: str | None,
                in_settle: bool = False, entry_kind: str | None = None, paid: int | None = None):
        """Rule 2.3. Returns the entry tuple, or None when refused (1,001st grant). `entry_kind`:
        money given back (rules 3.5, 3.6), booked under that kind and never refused."""
        if amount <= 0:
            raise ValueError("a credit must be > 0")
        kind_is_purchased(kind)   # validates the kind
        d = min(self.debt, amount)
        # AMBIGUOUS 2.3: "a credit that would make the 1,001st [grant] is refused" — counted only
        # when the credit would add a grant (A − d > 0); a credit with an expiry <= now still
        # counts (it is made, then expires at once).
        if amount - d > 0 and len(self.grants) >= MAX_GRANTS and kind not in PAID and entry_kind is None:
            return None  # rule 2.3: an operator's credit is refused at the cap; money paid never
        # 1.
        self.credit_n += 1
        gid = f"gr_{self.credit_n}"
        # 2.
        self.debt -= d
        # 3.
        grant = None
        if amount - d > 0:
            grant = Grant(gid, self.credit_n, kind, amount - d, expires, payment_id)
            self.grants.append(grant)
        # 4.  AMBIGUOUS 2.3 step 4: "note" is not defined by the rules; it is not part of the
        #     effect tuple.
        self._ledger(entry_kind or kind, amount, gid, expires, 0)
        # 5.
        if kind in PAID:
            self.paid_credit = True
        entry = (entry_kind or kind, amount, gid, expires)
        # 6.
        if expires is not None and expires <= now:
            # Rule 2.3 step 6: rule 2.6 runs (the new grant, if one was made, expires), with its
            # halt and auto-recharge checks; steps 7 and 8 are skipped.
            self._expire_grants(now, in_settle=in_settle, always_check=True)
            return entry
        # 7.
        if payment_id is not None and paid is not None and entry_kind is None:
            self.paid_credits.pop(payment_id, None)     # remembered anew, the latest 1,000 kept
            self.paid_credits[payment_id] = (amount, paid)
            while len(self.paid_credits) > 1_000:
                del self.paid_credits[next(iter(self.paid_credits))]
        if grant is not None and payment_id is not None:
            self._apply_waiting_refunds(now, grant, amount, paid)
        if payment_id is not None:
            self._apply_waiting_disputes(payment_id, amount, paid)
        # 8.
        self._lift(now, "credit")
        return entry

    def _apply_waiting_refunds(self, now: int, grant: Grant, credited: int, paid: int | None):
        """Rule 3.3 (rule 2.3 step 7): every waiting refund of the payment stops waiting; each
        claws back what it can (nothing, with no entry, once the grant is used up). No halt or
        auto-recharge check follows."""
        for w in list(self.waiting_refunds):          # oldest first
            if w.payment_id != grant.payment_id:
                continue
            self.waiting_refunds.remove(w)
            s = share_after(*self._refunded(w.payment_id), w.amount, credited, paid)  # rule 3.0
            c = min(s, grant.remaining)
            if c > 0:
                grant.remaining -= c
                self.refund_taken[w.refund_id] = (c, grant.kind, grant.expires_at_us, w.payment_id)
                self.refund_amounts[w.refund_id] = (w.amount, s)
                self._ledger("refund", -c, grant.grant_id, None, 0)
        self.grants = [g for g in self.grants if g.remaining > 0]

    def _expire_grants(self, now: int, in_settle: bool = False, always_check: bool = False):
        """Rule 2.6 (in advance: only when at least one grant expires; after a credit already
        expired, always, rule 2.3 step 6)."""
        expired = [g for g in self.grants if g.expires_at_us is not None and g.expires_at_us <= now]
        if not expired and not always_check:
            return
        for g in expired:      # in the order the org holds them
            self._ledger("expiration", -g.remaining, g.grant_id, g.expires_at_us, 0)
            if g.payment_id is not None:  # rule 2.6: what of a payment's credit lapsed (latest 1,000 kept)
                self.lapsed[g.payment_id] = self.lapsed.pop(g.payment_id, 0) + g.remaining
                while len(self.lapsed) > 1_000:
                    del self.lapsed[next(iter(self.lapsed))]
        self.grants = [g for g in self.grants if not (g.expires_at_us is not None and g.expires_at_us <= now)]
        self._halt_check(now)
        if not in_settle:
            self._recharge_check(now)

    # ------------------------------------------------------------------ halts (section 4)

    def _lease_ids(self) -> list[str]:
        return sorted(self.leases)

    def _halt_check(self, now: int):
        """Rule 4.2."""
        if self.prepaid and self.halted is None and not self._funded():
            self.halted = "balance"
            self._event("org.halted", {"reason": "balance", "lease_ids": self._lease_ids(),
                                       "balance_micros": self._balance()})

    def _lift(self, now: int, reason: str):
        """Rule 4.3."""
        if self.halted == "balance" and self._funded():
            self.halted = None
            self._event("org.resumed", {"reason": reason, "balance_micros": self._balance()})

    # ------------------------------------------------------------------ periods (section 5)

    def _grid_period(self, at_us: int) -> tuple[str, int, int]:
        """Rule 5.2."""
        if self.grid is None:
            return calendar_period(self.plan.period, at_us)
        a, length = self.grid
        k = (at_us - a) // length
        start = a + k * length
        return sub_key(start), start, start + length

    def _archive(self, now: int, end: int):
        # Rule 5.4: a period whose start is not before now is not archived.
        if self.period_start_us < now:
            self._fx_periods.append((self.period_key, self.period_start_us, end, self.period_usage,
                                     self.quota_used, self.plan_id, self.plan_version))

    def _reset_period_counters(self):
        self.period_usage = 0
        self.quota_used = 0
        self.quota_flags = set()

    def _new_period(self, now: int):
        """Rule 5.4."""
        self._archive(now, min(self.period_end_us, now))
        key, start, end = self._grid_period(now)
        # AMBIGUOUS 5.4: succession is applied whatever the successor's own effective_from;
        # a version whose effective_until passed but that has no higher version stays.
        while True:
            p = self.plan
            if p.effective_until_us is not None and p.effective_until_us <= start:
                nxt = self.catalog.successor(self.plan_id, self.plan_version)
                if nxt is None:
                    break
                self.plan_version = nxt
            else:
                break
        self.period_key, self.period_start_us, self.period_end_us = key, start, end
        self._reset_period_counters()

    def _change_plan(self, now: int, plan_id: str, version: int):
        """Rule 5.5."""
        new = self.catalog.plan(plan_id, version)    # KeyError for an unknown plan version
        old_kind = self.plan.period
        self.plan_id, self.plan_version = plan_id, version
        if self.grid is None and new.period != old_kind:
            key, _start, end = calendar_period(new.period, now)
            self.period_key, self.period_end_us = key, end
        self._halt_check(now)
        self._lift(now, "plan")

    # ------------------------------------------------------------------ leases (section 7)

    def _remember_ended(self, lease_id: str, ended_us: int):
        """Rule 7.5."""
        if lease_id in self.ended_leases:
            del self.ended_leases[lease_id]
        self.ended_leases[lease_id] = ended_us
        while len(self.ended_leases) > MAX_ENDED_LEASES:
            oldest = min(self.ended_leases, key=lambda lid: self.ended_leases[lid])  # first among ties
            del self.ended_leases[oldest]

    def _expire_leases(self, now: int):
        """Rule 7.4."""
        # AMBIGUOUS 7.4: the order of several lease.expired events is not stated; chosen: the
        # order the leases were taken (like 2.6's "in the order the org holds them").
        for lid in list(self.leases):
            lease = self.leases[lid]
            if lease.expires_at_us <= now:
                del self.leases[lid]
                # Rule 7.5: an expired lease ends at the advance that expired it.
                self._remember_ended(lid, now)
                self._event("lease.expired", {"lease_id": lid, "expired_at": rfc3339(lease.expires_at_us)})

    def _decide(self, action: str, resources: dict, balance: int, quota_remaining: int,
                active: list[Lease]) -> str:
        """Rule 7.1."""
        if self.suspended:
            return "suspended"
        if action == "purchase":
            return "degraded" if self.degraded else "ok"
        if self.halted == "admin":
            return "halted"
        plan = self.plan
        funded = balance + quota_remaining > 0
        if not funded:
            if self.halted == "balance":
                if action == "create" and self._needs_card():
                    return "no_payment_method"
                return "halted"
            if self.prepaid or not plan.overage:
                if action == "create" and self._needs_card():
                    return "no_payment_method"
                if plan.included_micros > 0:
                    return "quota_exceeded"
                return "insufficient_balance"
            # a postpaid org on a plan with overage passes
        if action in ("create", "wake"):
            resources = resources or {}
            qty = resources.get("quantity")
            qty = 1 if qty is None else int(qty)
            disk = resources.get("disk_mb") or 0
            if disk > self.max_disk_mb:
                return "resource_limit"
            region = resources.get("region")
            mtype = resources.get("machine_type")
            # machine_quotas: region -> machine type -> count
            limit = (self.machine_quotas or {}).get(region, {}).get(mtype) if region is not None else None
            if limit is not None:
                in_use = sum(l.quantity for l in active
                             if l.resources.get("region") == region and l.resources.get("machine_type") == mtype)
                if in_use + qty > limit:
                    return "resource_limit"
            slots = sum(l.quantity for l in active)
            # AMBIGUOUS 7.1/7.6: max_concurrent 0 (the catalog's `custom` default) is a cap of
            # 0, not "unlimited".
            if slots + qty > self.max_concurrent:
                return "concurrency_limit"
        return "ok"

    # ------------------------------------------------------------------ dunning (section 8)

    def _dunning_steps(self, now: int):
        """Rule 8.2."""
        d = self.dunning
        if d is None:
            return
        delays = [d.suspend_after_s, d.degrade_after_s, d.downgrade_after_s]
        # AMBIGUOUS 8.2: steps are taken in order 1, 2, 3 (a later step never before an earlier
        # one, even if its delay were shorter).
        while d.step < 3 and now - d.past_due_since_us >= delays[d.step] * US:
            d.step += 1
            if d.step == 1:
                # AMBIGUOUS 8.2: an org that paid an invoice before is not suspended, but the
                # step still counts as reached (step 1 in org.unsuspended, was_suspended false).
                if not self.paid_an_invoice:
                    self.suspended = True
                    self._event("org.suspended", {"reason": "past_due",
                                                  "past_due_since": rfc3339(d.past_due_since_us),
                                                  "lease_ids": self._lease_ids()})
            elif d.step == 2:
                self.degraded = True
            else:
                # Rule 8.2: "on it already" compares the plan id only (any version); the plan
                # change (rule 5.5) brings its own halt check and lift.
                if self.plan_id != d.free_plan_id:
                    d.plan_before = (self.plan_id, self.plan_version)
                    self._change_plan(now, d.free_plan_id, d.free_plan_version)

    def _end_dunning(self, now: int):
        """Rule 8.3, last paragraph."""
        d = self.dunning
        was_suspended = self.suspended
        self.suspended = False
        self.degraded = False
        # AMBIGUOUS 8.3: the plan is restored (with 5.5's halt/lift events) before
        # org.unsuspended is emitted (the order the sentence lists them); the plan before the
        # downgrade is restored even if an operator changed the plan since.
        if d.plan_before is not None:
            self._change_plan(now, d.plan_before[0], d.plan_before[1])
        self._event("org.unsuspended", {"was_suspended": was_suspended, "step": d.step,
                                        "past_due_since": rfc3339(d.past_due_since_us)})
        self.dunning = None

    # ------------------------------------------------------------------ auto-recharge (section 9)

    def _recharge_amount(self, balance: int, now: int) -> int:
        r = self.recharge
        # AMBIGUOUS 9.2: "above the threshold" is strict (balance + x > threshold); the 10,000 USD
        # cap applies to the result of the max (so also to a configured amount above it); the
        # configured amount is not checked to be whole cents.
        # Whole cents that bring the balance ABOVE the threshold: smallest multiple of 1 cent
        # x with balance + x > threshold.
        need = ((r.threshold_micros - balance) // CENT_MICROS + 1) * CENT_MICROS
        burn = self._burn(now)
        if r.threshold_runway_s > 0 and self.prepaid and burn > 0:
            # Rule 9.2: whole cents x that bring the runway to at least threshold_runway_s:
            # (F + x) × 3,600 >= T × B.
            funds = balance + self._quota_remaining()
            lack = r.threshold_runway_s * burn - funds * 3_600
            x = 0 if lack <= 0 else -(-lack // 3_600)
            need = max(need, -(-x // CENT_MICROS) * CENT_MICROS)
        return min(max(r.amount_micros, need), MAX_CHARGE_MICROS)

    def _recharge_check(self, now: int):
        """Rule 9.2 / 9.3."""
        r = self.recharge
        if r is None:
            return
        balance = self._balance()
        if r.pending_id is not None:
            # Rule 9.3: a charge asked for at this same instant and not yet sent (this step's
            # effects hold it: a step is one commit) grows (never shrinks) to what a charge asked
            # for now would be, whatever else holds; an older one, or one sent, stays.
            if r.pending_asked_us == now and any(c[0] == r.pending_id for c in self._fx_charges):
                amount = self._recharge_amount(balance, now)
                if amount > r.pending_micros:
                    r.pending_micros = amount
                    self._record_charge(r.pending_id, amount)
            return
        if not r.enabled or r.paused or not self.has_payment_method or self._in_shadow(now):   # rule 2.12.2
            return
        runway = self._runway(now) if r.threshold_runway_s > 0 else None   # rule 9.2
        if not (balance < r.threshold_micros or (runway is not None and runway < r.threshold_runway_s)):
            return
        # AMBIGUOUS 9.2: "the cooldown has passed" = now − last ask >= cooldown.
        if r.last_ask_us is not None and now - r.last_ask_us < r.cooldown_s * US:
            return
        day = utc_day(now)
        count = r.day_count if r.day == day else 0
        if count >= r.max_per_day:
            # AMBIGUOUS 9.2: the daily_limit event is emitted only when every other condition
            # (including the cooldown) would have allowed a charge.
            if r.limit_event_day != day:
                r.limit_event_day = day
                self._event("auto_recharge.failed", {"reason": "daily_limit", "max_per_day": r.max_per_day,
                                                     "balance_micros": balance})
            return
        self.charge_k += 1
        cid = f"ar_{self.charge_k}"
        amount = self._recharge_amount(balance, now)
        r.pending_id, r.pending_micros, r.pending_asked_us = cid, amount, now
        r.last_ask_us = now
        r.day, r.day_count = day, count + 1
        self._record_charge(cid, amount)

    def _record_charge(self, cid: str, amount: int):
        # Within one take_effects window (one commit) a charge appears once, at its last amount.
        for c in self._fx_charges:
            if c[0] == cid:
                c[1] = amount
                return
        asked = self.recharge.pending_asked_us
        self._fx_charges.append([cid, amount, f"metergate:{self.org_id}:{self.created_us}:auto_recharge:{cid}:{asked}"])

    # ------------------------------------------------------------------ alerts (rule 2.9)

    def _low_balance_rule(self):
        # AMBIGUOUS 2.9: a threshold <= 0 counts as "off" (only 0 is named).
        th = self.low_balance_micros
        balance = self._balance()
        if th > 0 and self.low_balance_armed and balance < th:
            self._event("balance.threshold_crossed", {"threshold_micros": th, "balance_micros": balance})
            self.low_balance_armed = False
        elif not self.low_balance_armed and (th <= 0 or balance >= th):
            self.low_balance_armed = True

    # ------------------------------------------------------------------ runway (rule 2.10)

    def _burn(self, now: int) -> int:
        """µUSD an hour of the live leases costs at the plan's rates, rounded up."""
        plan, hour_ms, scaled = self.plan, 3_600 * 1_000, 0
        for lease in self.leases.values():
            if lease.expires_at_us <= now:
                continue
            res = lease.resources
            scaled += plan.memory_nanos_per_gib_s * int(res.get("memory_mb") or 0) * lease.quantity * hour_ms
            scaled += plan.disk_nanos_per_gib_s * int(res.get("disk_mb") or 0) * lease.quantity * hour_ms
            scaled += plan.cpu_nanos_per_vcpu_s * int(res.get("cpu_count") or 0) * lease.quantity * hour_ms * 1_024
        return (scaled + SCALE - 1) // SCALE

    def _runway(self, now: int):
        burn = self._burn(now)
        if not self.prepaid or burn == 0:
            return None
        return max(0, self._balance() + self._quota_remaining()) * 3_600 // burn

    def _runway_rule(self, now: int):
        th = self.runway_alert_s
        runway = self._runway(now)
        if th > 0 and self.runway_armed and runway is not None and runway < th:
            self._event("balance.runway_low", {
                "threshold_s": th, "runway_s": runway, "burn_micros_per_hour": self._burn(now),
                "balance_micros": self._balance(),
                "lease_ids": sorted(lid for lid, lease in self.leases.items() if lease.expires_at_us > now)})
            self.runway_armed = False
        elif not self.runway_armed and (th <= 0 or (runway is not None and runway >= th)):
            self.runway_armed = True

    # ------------------------------------------------------------------ advance (rule 1.2)

    def _forget(self, now: int):
        """Rule 3.4 (and 7.5's one hour)."""
        # AMBIGUOUS 3.4: "more than 180 days ago" / "older than 30 days" are strict (> 180 d,
        # > 30 d); 3.4's position within advance is not stated (it does not matter: refunds and
        # credits come after advance). The 180 days count from the refund's arrival, also for a
        # refund that was applied later from the waiting list.
        self.applied_refunds = {rid: t for rid, t in self.applied_refunds.items() if now - t <= REFUND_MEMORY_US}
        self.refund_taken = {rid: v for rid, v in self.refund_taken.items() if rid in self.applied_refunds}
        self.refund_amounts = {rid: v for rid, v in self.refund_amounts.items() if rid in self.applied_refunds}
        self.reversed_refunds &= set(self.applied_refunds)
        # Rule 3.4: disputes are forgotten 400 days after they were first reported (strictly more).
        self.disputes = {did: d for did, d in self.disputes.items() if now - d["at"] <= DISPUTE_MEMORY_US}
        for d in self.disputes.values():  # 3.6: a withdrawal waits at most 30 days
            if d["waiting"] and now - d["at"] > REFUND_WAIT_US:
                d["waiting"] = False
        self.waiting_refunds = [w for w in self.waiting_refunds if now - w.at_us <= REFUND_WAIT_US]
        # Rule 7.5: remembered until more than one hour has passed.
        self.ended_leases = {lid: t for lid, t in self.ended_leases.items() if now - t <= ENDED_LEASE_MEMORY_US}

    def _advance(self, now: int):
        self._tell_cutover(now)                             # rule 2.12: a cutover passed, first
        self._forget(now)
        new_period = False
        if now >= self.period_end_us:                       # 1.
            self._new_period(now)
            new_period = True
        self._expire_grants(now)                            # 2.
        self._expire_leases(now)                            # 3.
        self._dunning_steps(now)                            # 4.
        self._recharge_check(now)                           # 5.
        if new_period:                                      # 6.
            self._lift(now, "period")

    # ------------------------------------------------------------------ commands

    def apply(self, now_us: int, cmd: dict) -> dict:
        t = cmd["type"]
        if t == "gate":
            reason = self._gate_read(now_us, cmd.get("action"), cmd.get("resources") or {})
            if self._in_shadow(now_us):   # rule 2.12.1: allowed; the rules' decision rides along
                return {"reason": "ok", "would": reason}
            return {"reason": reason}
        handler = getattr(self, "_cmd_" + t, None)
        if handler is None:
            raise ValueError(f"unknown command type {t!r}")
        self._cmd_start = len(self._fx_events)
        self._advance(now_us)
        result = handler(now_us, cmd)
        # Rules 2.9, then 2.10, after every command, also a refused one (which still applied its advance).
        self._low_balance_rule()
        self._runway_rule(now_us)
        if t != "set_enforcement":   # (which sorts its own events, before and after its switch)
            self._shadow_events(self._cmd_start, now_us)   # rule 2.12.3
        self.last_now_us = now_us
        # self-checks of the model (rule 2.1, 2.7)
        assert not (self.debt > 0 and self.grants), "debt and a grant with money at the same time"
        assert all(g.remaining > 0 for g in self.grants), "a grant at 0 is held"
        assert self.debt >= 0 and 0 <= self.remainder_scaled < SCALE
        return result

    def _gate_read(self, now: int, action: str, resources: dict) -> str:
        """Rule 1.1: the gate decides as of its instant, on the org as advance (rule 1.2) would
        leave it then, without applying anything to the org itself."""
        org = copy.deepcopy(self)
        org._advance(now)
        balance = org._balance_at(now)
        active = [l for l in org.leases.values() if l.expires_at_us > now]
        return org._decide(action, resources, balance, org._quota_remaining(), active)

    # ------------------------------------------------------------------ enforcement (rule 2.12)

    def _in_shadow(self, t: int) -> bool:
        return self.shadow_until is not None and t < self.shadow_until

    def _tell_cutover(self, now: int):
        """Rule 2.12: at the first advance at or after a cutover (or at the cutover itself), a
        halted org's `org.halted` and a suspended one's `org.suspended`, as the org stands."""
        u = self.shadow_until
        if u is None or u == SHADOW_FOREVER or u > now or self.cutover_told:
            return
        self.cutover_told = True
        if self.halted is not None:
            self._event("org.halted", {"reason": self.halted, "lease_ids": self._lease_ids(),
                                       "balance_micros": self._balance()})
        if self.suspended:
            self._event("org.suspended", {"reason": "past_due",
                                          "past_due_since": rfc3339(self.dunning.past_due_since_us),
                                          "lease_ids": self._lease_ids()})

    def _shadow_events(self, start: int, now: int):
        """Rule 2.12.3: the compute plane's events of an instant in shadow get `.shadow`."""
        if self._in_shadow(now):
            self._fx_events[start:] = [(t + ".shadow" if t in SHADOWED else t, d) for t, d in self._fx_events[start:]]

    # ------------------------------------------------------------------ observe

    def observe(self) -> dict:
        # AMBIGUOUS 1.1: "reads (state, gate) count what time changed"; per the brief, observe
        # is the state right after the last command, with no time applied.
        r = self.recharge
        recharge = None
        if r is not None:
            recharge = {
                "enabled": r.enabled,
                "threshold_micros": r.threshold_micros,
                "amount_micros": r.amount_micros,
                "max_per_day": r.max_per_day,
                "cooldown_s": r.cooldown_s,
                "pending_id": r.pending_id,
                "pending_micros": r.pending_micros,
                # charges asked for on the UTC day of the last command
                "day_count": r.day_count if r.day == utc_day(self.last_now_us) else 0,
                "paused": bool(r.paused),
            }
        return {
            "balance_micros": self._balance(),
            "debt_micros": self.debt,
            "grants": [(g.grant_id, g.kind, g.remaining, g.expires_at_us, g.payment_id)
                       for g in self._burn_order(self.grants)],
            "remainder_scaled": self.remainder_scaled,
            "period_key": self.period_key,
            "period_start_us": self.period_start_us,
            "period_end_us": self.period_end_us,
            "period_usage_micros": self.period_usage,
            "quota_used_micros": self.quota_used,
            "quota_micros": self.plan.included_micros,
            "plan_id": self.plan_id,
            "plan_version": self.plan_version,
            "halted": self.halted,
            "suspended": self.suspended,
            "degraded": self.degraded,
            "dunning_step": None if self.dunning is None else self.dunning.step,
            "past_due_since_us": None if self.dunning is None else self.dunning.past_due_since_us,
            "tier": self.tier,
            "max_concurrent": self.max_concurrent,
            "max_disk_mb": self.max_disk_mb,
            "leases": {lid: (l.expires_at_us, l.quantity, l.ttl_s) for lid, l in self.leases.items()},
            "has_payment_method": self.has_payment_method,
            "paid_credit": self.paid_credit,
            "recharge": recharge,
            "low_balance_micros": self.low_balance_micros,
            "low_balance_armed": self.low_balance_armed,
            "runway_alert_s": self.runway_alert_s,
            "runway_armed": self.runway_armed,
        }
