"""The reference model's commands, one method each (`_cmd_<type>`), mixed into RefOrg
(tests/model/reference.py), which holds the state and the rules they call."""

from __future__ import annotations

from tests.model.basics import (
    SHADOW_FOREVER,
    rfc3339,
    share,
    share_after,
    ENDED,
    Dunning,
    ENDED_LEASE_MEMORY_US,
    Lease,
    MAX_GRANTS,
    MAX_LEASES,
    MAX_WAITING_REFUNDS,
    Recharge,
    SCALE,
    US,
    WaitingRefund,
    sub_key,
)


class Commands:
    """RefOrg's command handlers: each applies one command at `now` (µs) and answers a dict."""

    # credit (2.3)
    def _cmd_credit(self, now, cmd):
        entry = self._credit(now, cmd["kind"], int(cmd["amount_micros"]), cmd.get("expires_at_us"),
                             cmd.get("payment_id"), paid=cmd.get("paid_micros"))
        if entry is None:
            return {"refused": "too_many_grants"}
        return {"entry": entry}

    # operator debit (2.8)
    def _cmd_debit(self, now, cmd, entry_kind=None):
        kind = cmd["kind"]
        amount = int(cmd["amount_micros"])
        if amount <= 0:
            raise ValueError("a debit must be > 0")
        left = self._take(amount, self._clawback_order())
        self.debt += left
        self._ledger(entry_kind or kind, -amount, None, None, 0)
        self._halt_check(now)
        self._recharge_check(now)
        return {"entry": (kind, -amount, None, None)}

    # import (2.11)
    def _cmd_import(self, now, cmd):
        amounts = cmd.get("amounts") or []
        # 1. caps, counted before anything changes; the billing mode never changes
        if cmd.get("prepaid") is not None and bool(cmd["prepaid"]) != self.prepaid:
            return {"refused": True}
        new_ids, new_positive = [], 0
        for a in amounts:
            if a["source_id"] in self.imported_ids or a["source_id"] in new_ids:
                continue
            new_ids.append(a["source_id"])
            new_positive += int(a["amount_micros"]) > 0
        if len(self.grants) + new_positive > MAX_GRANTS or len(self.imported_ids) + len(new_ids) > 1_000:
            return {"refused": True}
        changed = []
        # 2.
        if cmd.get("plan_id") is not None and cmd["plan_id"] != self.plan_id:
            self._change_plan(now, cmd["plan_id"], int(cmd["plan_version"]))
            changed.append("plan")
        if cmd.get("tier") is not None and (cmd["tier"], int(cmd["max_concurrent"])) != (self.tier, self.max_concurrent):
            self.tier, self.max_concurrent = cmd["tier"], int(cmd["max_concurrent"])
            changed.append("tier")
        # 3.
        for a in amounts:
            s = a["source_id"]
            if s in self.imported_ids:
                continue
            self.imported_ids.append(s)
            amount = int(a["amount_micros"])
            if a["kind"] == "signup_grant" or amount == 0:
                raise ValueError("an import amount is of a kind of 2.2 other than signup_grant, and not 0")
            if amount > 0:
                self._credit(now, a["kind"], amount, a.get("expires_at_us"), None, entry_kind="import")
            else:
                if a["kind"] != "adjustment" or a.get("expires_at_us") is not None:
                    raise ValueError("a debt is imported as an adjustment without expiry")
                self._cmd_debit(now, {"kind": "adjustment", "amount_micros": -amount}, entry_kind="import")
            changed.append("import:" + s)
        # 4.
        if cmd.get("card") is not None and bool(cmd["card"]) != self.has_payment_method:
            self._cmd_set_card(now, {"present": bool(cmd["card"])})
            changed.append("card")
        # 5.
        if cmd.get("past_due") is not None and self.dunning is None:
            self._cmd_invoice_failed(now, {**cmd["past_due"], "invoice_id": None, "subscription_id": None})
            if self.dunning is not None:
                changed.append("past_due")
        # 6.
        settings = cmd.get("recharge")
        if settings is not None:
            r = self.recharge
            if not settings["enabled"]:
                differs = r is not None and r.enabled
            else:
                differs = r is None or not r.enabled or (
                    r.threshold_micros, r.amount_micros, r.max_per_day, r.cooldown_s, r.threshold_runway_s) != (
                    settings["threshold_micros"], settings["amount_micros"], settings["max_per_day"],
                    settings["cooldown_s"], settings.get("threshold_runway_s", 0))
            if differs:
                self._cmd_set_auto_recharge(now, {**settings, "lift_dispute": False})
                changed.append("auto_recharge")
        # 7.
        r = self.recharge
        if cmd.get("customer_linked") and r is not None and r.paused == "no_stripe_customer":
            r.paused = False
            if r.enabled:
                self._recharge_check(now)
            changed.append("auto_recharge")
        return {"changed": changed}

    # Stripe refund (section 3)
    def _cmd_stripe_refund(self, now, cmd):
        rid = cmd["refund_id"]
        pid = cmd["payment_id"]
        amount = int(cmd["amount_micros"])
        if rid in self.applied_refunds:
            return {"duplicate": True}
        # AMBIGUOUS 3.2: a refund that took nothing (and waits) is "applied" too: its id is
        # remembered, so a resend of it is a duplicate.
        self.applied_refunds[rid] = now
        # Rule 3.1: the payment's grants, in the order the org holds them.
        mine = self._payment_grants(pid)
        if not mine:
            self.waiting_refunds.append(WaitingRefund(rid, pid, amount, now))
            while len(self.waiting_refunds) > MAX_WAITING_REFUNDS:
                self.waiting_refunds.pop(0)
            return {"clawed_micros": 0}
        first = mine[0]
        credited, paid = self.paid_credits.get(pid, (int(cmd.get("credited_micros", 0)), cmd.get("paid_micros")))
        s = share_after(*self._refunded(pid), amount, credited, paid)
        c = self._take_in_order(mine, s)
        if c == 0:
            return {"clawed_micros": 0}
        self.refund_taken[rid] = (c, first.kind, first.expires_at_us, pid)
        self.refund_amounts[rid] = (amount, s)
        # AMBIGUOUS 3.1: the refund ledger entry names the grant id but no expiry (None).
        self._ledger("refund", -c, first.grant_id, None, 0)
        self._halt_check(now)
        self._recharge_check(now)
        return {"clawed_micros": c}

    def _refunded(self, pid) -> tuple[int, int]:
        """Rule 3.0: (S, their shares) of the payment's refunds that took credit, not reversed,
        still remembered."""
        mine = [v for rid, v in self.refund_amounts.items()
                if self.refund_taken[rid][3] == pid and rid not in self.reversed_refunds]
        return sum(a for a, _ in mine), sum(s for _, s in mine)

    # a refund that failed or was canceled (3.5)
    def _cmd_stripe_refund_failed(self, now, cmd):
        rid = cmd["refund_id"]
        if rid not in self.applied_refunds:
            self.applied_refunds[rid] = now
            self.reversed_refunds.add(rid)
            return {}
        if rid in self.reversed_refunds:
            return {}
        self.reversed_refunds.add(rid)
        self.waiting_refunds = [w for w in self.waiting_refunds if w.refund_id != rid]
        taken = self.refund_taken.get(rid)
        if taken is None:
            return {}
        c, kind, expires, _ = taken
        return {"entry": self._credit(now, kind, c, expires, cmd["payment_id"], entry_kind="refund_reversal")}

    # disputes (3.6)
    def _cmd_dispute(self, now, cmd):
        did = cmd["dispute_id"]
        d = self.disputes.setdefault(did, {"at": now, "w": 0, "kind": "topup", "expires": None, "withdrawn": False,
                                           "reinstated": False, "waiting": False, "D": 0, "payment": None})
        while len(self.disputes) > 1_000:  # 3.4: the oldest reported forgotten first
            del self.disputes[next(iter(self.disputes))]
        if not cmd["withdrawn"]:
            if d["reinstated"]:
                return {"duplicate": True}
            d["reinstated"], d["waiting"] = True, False
            if d["w"] == 0:
                return {}
            return {"entry": self._credit(now, d["kind"], d["w"], d["expires"], cmd["payment_id"],
                                          entry_kind="dispute_reversal")}
        if d["withdrawn"]:
            return {"duplicate": True}
        if d["reinstated"]:
            return {}
        d["withdrawn"] = True
        if self.recharge is None:  # 3.6: also an auto-recharge not configured yet
            self.recharge = Recharge(False, 0, 0, 1, 0)
        self.recharge.paused = "disputed"  # 3.6: only an operator's settings lift it
        pid = cmd["payment_id"]
        # 3.0: C and P as the org remembers them, else as the dispute names them.
        credited, paid = self.paid_credits.get(pid, (int(cmd["credited_micros"]), cmd.get("paid_micros")))
        if credited == 0:  # 3.6: waits for the payment's credit
            d["waiting"], d["D"], d["payment"] = True, int(cmd["amount_micros"]), pid
            return {}
        lapsed = max(int(cmd.get("lapsed_micros", 0)), self.lapsed.get(pid, 0))
        entry = self._dispute_takes(d, pid, share(int(cmd["amount_micros"]), credited, paid), credited - lapsed)
        if entry is None:
            return {}
        self._halt_check(now)
        return {"entry": entry}

    def _dispute_takes(self, d, pid, disputed, kept):
        """3.6: w = max(0, min(D, kept − R)) from the payment's grants, then clawback order."""
        refunded = sum(c for rid, (c, _, _, paid_by) in self.refund_taken.items()
                       if paid_by == pid and rid not in self.reversed_refunds)
        w = max(0, min(disputed, kept - refunded))
        if w == 0:
            return None
        mine = self._payment_grants(pid)
        first = mine[0] if mine else None
        from_mine = self._take_in_order(mine, w)
        if first is not None:
            d["kind"], d["expires"] = first.kind, first.expires_at_us
        if w - from_mine > 0:
            self.debt += self._take(w - from_mine, self._clawback_order())
        d["w"] = w
        entry = ("dispute", -w, first.grant_id if first is not None else None, None)
        self._ledger(*entry, 0)
        return entry

    def _apply_waiting_disputes(self, pid, credited, paid):
        """3.6: a credit of the payment meets its waiting disputes (no halt check)."""
        for d in self.disputes.values():
            if d["waiting"] and d["payment"] == pid:
                d["waiting"] = False
                self._dispute_takes(d, pid, share(d["D"], credited, paid), credited)

    def _payment_grants(self, pid):
        return [g for g in self.grants if g.payment_id is not None and g.payment_id == pid]

    def _take_in_order(self, grants, amount):
        """Up to `amount` from these grants in order, each removed at 0: what was taken."""
        taken = 0
        for g in grants:
            part = min(amount - taken, g.remaining)
            g.remaining -= part
            taken += part
        self.grants = [g for g in self.grants if g.remaining > 0]
        return taken

    # subscriptions (7.7)
    def _cmd_subscription(self, now, cmd):
        sid, t, status = cmd["subscription_id"], int(cmd["as_of_us"]), cmd["status"]
        old = self.subscriptions.get(sid)
        if (old is None and cmd["tier"] is None) or (old is not None and (
                old["status"] in ENDED or old["t"] > t
                or (old["t"] == t and status == "incomplete" and old["status"] != "incomplete"))):
            if status in ENDED:
                if old is None:  # 7.7: another product's end is remembered, the tier left alone
                    self._remember_subscription(sid, status, None, 0, t)
                self._subscription_ended(now, sid)
            return {"stale": True}
        self._remember_subscription(sid, status, cmd["tier"], int(cmd["max_concurrent"]), t)
        ruling = None
        for k, r in self.subscriptions.items():
            if self._pays(r) and (ruling is None or (r["cap"], r["t"]) > (ruling[1]["cap"], ruling[1]["t"])):
                ruling = (k, r)
        if ruling is None:
            self.tier, self.max_concurrent = cmd["base_tier"], int(cmd["base_max_concurrent"])
        else:
            self.tier, self.max_concurrent = ruling[1]["tier"], ruling[1]["cap"]
            if ruling[0] == sid and cmd.get("start_us") is not None:
                self._cmd_subscription_period(now, {"start_us": cmd["start_us"], "end_us": cmd.get("end_us")})
        self.tier_as_of_us = t if self.tier_as_of_us is None else max(self.tier_as_of_us, t)
        if status in ENDED:
            self._subscription_ended(now, sid)
        return {}

    def _subscription_ended(self, now, sid):
        """Rule 8.4: its failed invoices leave the unpaid list; an empty list ends dunning."""
        d = self.dunning
        if d is None or not d.unpaid or not any(d.billing.get(i) == sid for i in d.unpaid):
            return
        d.unpaid = [i for i in d.unpaid if d.billing.get(i) != sid]
        d.billing = {i: b for i, b in d.billing.items() if b != sid}
        if not d.unpaid:
            self._end_dunning(now)

    def _remember_subscription(self, sid, status, tier, cap, t):
        """7.7 step 1: the record moves to the end; past 20, one other is forgotten."""
        self.subscriptions.pop(sid, None)
        self.subscriptions[sid] = {"status": status, "tier": tier, "cap": cap, "t": t}
        if len(self.subscriptions) > 20:
            others = [k for k in self.subscriptions if k != sid]
            unpaying = [k for k in others if not self._pays(self.subscriptions[k])]
            live = [k for k in unpaying if self.subscriptions[k]["status"] not in ENDED]
            del self.subscriptions[(live or unpaying or others)[0]]

    @staticmethod
    def _pays(record: dict) -> bool:
        return record["status"] in ("active", "trialing", "past_due") and record["tier"] is not None

    # usage (section 6)
    def _cmd_usage(self, now, cmd):
        plan = self.plan
        accepted: list[dict] = []
        duplicates = 0
        rejected: list = []
        in_request: set[str] = set()
        for tick in cmd.get("ticks") or []:
            tid = tick["tick_id"]
            # Rule 6.6: an id seen earlier in this request is a duplicate, whatever became of
            # that tick; the duplicate check comes before the unit check.
            if tid in self.billed_ticks or tid in in_request:
                duplicates += 1
                continue
            in_request.add(tid)
            units = tick.get("units") or {}
            # AMBIGUOUS 6.4: read literally, a unit named in the tick with a count of 0 that
            # the plan does not price still rejects the tick.
            if any(u not in plan.unit_nanos for u in units):
                rejected.append(tid)
                continue
            self.billed_ticks.add(tid)
            accepted.append(tick)
        scaled = 0
        for tick in accepted:
            ms = int(tick["duration_ms"])
            mb_ms = int(tick.get("memory_mb") or 0) * ms
            cpu_ms = int(tick.get("cpu_count") or 0) * ms
            disk_mb_ms = int(tick.get("disk_mb") or 0) * ms
            scaled += plan.memory_nanos_per_gib_s * mb_ms
            scaled += plan.disk_nanos_per_gib_s * disk_mb_ms
            scaled += plan.cpu_nanos_per_vcpu_s * cpu_ms * 1_024
            for u, count in (tick.get("units") or {}).items():
                scaled += plan.unit_nanos[u] * int(count) * 1_024_000
        spent, self.remainder_scaled = divmod(scaled + self.remainder_scaled, SCALE)
        # Rule 6.3: heartbeat of the leases named by accepted ticks.
        # AMBIGUOUS 6.3: duplicate and rejected ticks do not renew their lease.
        for lid in dict.fromkeys(t.get("lease_id") or "" for t in accepted):
            if lid and lid in self.leases:
                lease = self.leases[lid]
                lease.expires_at_us = max(lease.expires_at_us, now + lease.ttl_s * US)
        if spent > 0:
            self._spend(now, spent)
        # AMBIGUOUS 6.6: ticks carry no start time here, so `tick_too_old` is not modelled.
        return {"accepted": len(accepted), "duplicates": duplicates, "rejected": rejected, "spent_micros": spent}

    def _spend(self, now: int, M: int):
        """Rule 6.2."""
        # AMBIGUOUS 6.2: a usage command whose cost rounds to M = 0 µUSD does none of 6.2 (no
        # ledger entry, no thresholds, no halt check): only the remainder and heartbeats change.
        # 1.
        self.period_usage += M
        q = min(M, self._quota_remaining())
        self.quota_used += q
        # 2.
        m = M - q
        if m > 0:
            if self.prepaid:
                left = self._take(m, self._burn_order(self.grants))
                self.debt += left
                taken, invoiced = m, 0
                # AMBIGUOUS 6.2 step 3: for a prepaid org "taken from credit" is all of m
                # (the grants' part and the new debt), so the ledger matches the balance.
            else:
                total = sum(g.remaining for g in self.grants)
                taken = min(m, total)
                self._take(taken, self._burn_order(self.grants))
                invoiced = m - taken
            # 3.
            self._ledger("usage", -taken, None, None, invoiced)
        # 4.
        self._quota_thresholds()
        self._halt_check(now)
        if m > 0:
            self._recharge_check(now)

    def _quota_thresholds(self):
        """Rule 5.7."""
        # AMBIGUOUS 5.7: checked only in 6.2 step 4 (after a spend of M > 0), not after a plan
        # change that lowers the quota; "reaches" means used × 100 >= percent × quota (integer).
        # The check runs on every spend even when q = 0 (quota already used up).
        quota = self.plan.included_micros
        if quota <= 0:
            return
        for pct in (80, 100):
            if pct not in self.quota_flags and self.quota_used * 100 >= pct * quota:
                self.quota_flags.add(pct)
                self._event("quota.threshold_crossed", {"percent": pct, "period": self.period_key,
                                                        "quota_micros": quota, "used_micros": self.quota_used})

    # leases (7.2, 7.3)
    def _cmd_acquire(self, now, cmd):
        lid = cmd["lease_id"]
        resources = dict(cmd.get("resources") or {})
        ttl = int(cmd["ttl_s"])
        # AMBIGUOUS 7.2: "ttl 1 s–24 h" does not say what happens outside the range (refused?
        # clamped?); the model treats it as a harness error.
        if not 1 <= ttl <= 86_400:
            raise ValueError(f"ttl_s {ttl} outside 1 s–24 h")
        if lid in self.leases:
            lease = self.leases[lid]
            # AMBIGUOUS 7.2: "same resources" compares the resources dict only (not the ttl);
            # the existing lease is returned unchanged (not renewed).
            if lease.resources == resources:
                return {"granted": True, "created": False, "expires_at_us": lease.expires_at_us}
            return {"refused": "conflict"}
        if lid in self.ended_leases and now - self.ended_leases[lid] <= ENDED_LEASE_MEMORY_US:
            return {"refused": "lease_ended"}
        # AMBIGUOUS (brief, not in the rules): the 10,000-lease cap is checked before the gate.
        if len(self.leases) >= MAX_LEASES:
            return {"refused": "too_many_leases"}
        reason = self._decide("create", resources, self._balance(), self._quota_remaining(),
                              list(self.leases.values()))
        shadow = self._in_shadow(now)   # rule 2.12.1: granted whatever the gate says
        if reason != "ok" and not shadow:
            return {"denied": reason}
        qty = resources.get("quantity")
        qty = 1 if qty is None else int(qty)
        lease = Lease(lid, now + ttl * US, qty, ttl, resources)
        self.leases[lid] = lease
        granted = {"granted": True, "created": True, "expires_at_us": lease.expires_at_us}
        return {**granted, "would": reason} if shadow else granted

    def _cmd_set_enforcement(self, now, cmd):
        """Rule 2.12, after advance."""
        self._shadow_events(self._cmd_start, now)   # what advance brought, as the org was then
        if cmd["mode"] == "shadow":
            if self.shadow_until == SHADOW_FOREVER:
                return {}
            if cmd.get("undo"):
                r = self.recharge
                if self.shadow_until is None:
                    return {"refused": "invalid_command"}
                if r is not None and (r.pending_id is not None or (
                        r.last_ask_us is not None and r.last_ask_us >= self.shadow_until)):
                    return {"refused": "cutover_charged"}
            if not self._in_shadow(now):   # rule 2.12: the compute plane is told it runs
                if self.halted is not None:
                    self._event("org.resumed", {"reason": "shadow", "balance_micros": self._balance()})
                if self.suspended:
                    self._event("org.unsuspended", {"was_suspended": True, "step": self.dunning.step,
                                                    "past_due_since": rfc3339(self.dunning.past_due_since_us)})
            self.shadow_until, self.cutover_told = SHADOW_FOREVER, False
            return {}
        at = now if cmd.get("at_us") is None else cmd["at_us"]
        if not self._in_shadow(now) or at == self.shadow_until:
            return {}
        self.shadow_until, self.cutover_told = at, False
        if at <= now:
            self._tell_cutover(now)
            self._recharge_check(now)
        return {}

    def _cmd_renew(self, now, cmd):
        lid = cmd["lease_id"]
        lease = self.leases.get(lid)
        if lease is None:
            return {"refused": "unknown_lease"}
        lease.expires_at_us = max(lease.expires_at_us, now + lease.ttl_s * US)
        return {"expires_at_us": lease.expires_at_us}

    def _cmd_release(self, now, cmd):
        lid = cmd["lease_id"]
        self._remember_ended(lid, now)  # rule 7.5: held or not (a release may overtake its take)
        if lid not in self.leases:
            return {"released": False}
        del self.leases[lid]
        return {"released": True}

    # halts (4.4)
    def _cmd_halt(self, now, cmd):
        if self.halted != "admin":
            self.halted = "admin"
            # AMBIGUOUS 4.4: the admin org.halted carries the same fields as 4.2's.
            self._event("org.halted", {"reason": "admin", "lease_ids": self._lease_ids(),
                                       "balance_micros": self._balance()})
        return {}

    def _cmd_resume(self, now, cmd):
        # AMBIGUOUS 4.4: org.resumed (admin) is emitted only if there was a halt to clear.
        if self.halted is not None:
            self.halted = None
            self._event("org.resumed", {"reason": "admin", "balance_micros": self._balance()})
        self._halt_check(now)
        return {}

    # plan (5.5)
    def _cmd_set_plan(self, now, cmd):
        self._change_plan(now, cmd["plan_id"], int(cmd["plan_version"]))
        return {}

    # tier and limits (7.6)
    def _cmd_set_tier(self, now, cmd):
        as_of = cmd.get("as_of_us")
        # AMBIGUOUS 7.6: a decision without as_of is never stale and does not move the
        # remembered as_of; an equal as_of is not "older" and is applied.
        if as_of is not None and self.tier_as_of_us is not None and as_of < self.tier_as_of_us:
            return {"stale": True}
        tier = cmd["tier"]
        mc = cmd.get("max_concurrent")
        # AMBIGUOUS 7.6: max_concurrent None = the tier's cap from the catalog (0 for a tier the
        # catalog does not list); the tier name is not validated.
        self.tier = tier
        self.max_concurrent = self.catalog.tiers.get(tier, 0) if mc is None else int(mc)
        if as_of is not None:
            self.tier_as_of_us = as_of
        return {"stale": False}

    def _cmd_set_limits(self, now, cmd):
        if cmd.get("max_disk_mb") is not None:
            self.max_disk_mb = int(cmd["max_disk_mb"])
        if cmd.get("machine_quotas") is not None:
            self.machine_quotas = {r: dict(t) for r, t in cmd["machine_quotas"].items()}
        return {}

    # card and auto-recharge (section 9)
    def _cmd_set_card(self, now, cmd):
        if cmd["present"]:
            self.has_payment_method = True
            if self.recharge is not None and self.recharge.paused in ("payment_failed", "no_stripe_customer"):
                self.recharge.paused = False      # 9.4: a new card lifts either pause
            self._recharge_check(now)             # 9.3: after a card is saved
        else:
            self.has_payment_method = False
        return {}

    def _cmd_set_auto_recharge(self, now, cmd):
        r = self.recharge
        if not cmd["enabled"]:
            # Rule 9.1: off only stops new charges; settings and a pause stay, no check runs.
            if r is not None:
                r.enabled = False
            return {}
        if r is None:
            r = self.recharge = Recharge(False, 0, 0, 0, 0)
        r.enabled = bool(cmd["enabled"])
        r.threshold_micros = int(cmd["threshold_micros"])
        r.amount_micros = int(cmd["amount_micros"])
        r.max_per_day = int(cmd["max_per_day"])
        r.cooldown_s = int(cmd["cooldown_s"])
        r.threshold_runway_s = int(cmd.get("threshold_runway_s", 0))
        # Rule 9.1: turning it on (or sending the settings again) clears a pause (a dispute's
        # only when an operator sends them) and runs the check. A charge in flight stays in flight.
        if r.paused != "disputed" or cmd.get("lift_dispute"):
            r.paused = False
        self._recharge_check(now)
        return {}

    def _cmd_settle(self, now, cmd):
        cid = cmd["charge_id"]
        r = self.recharge
        in_flight = r is not None and r.pending_id == cid
        succeeded = bool(cmd["succeeded"])
        amount = int(cmd.get("amount_micros") or 0)
        pid = cmd.get("payment_id")
        if succeeded:
            # Rule 9.4: each payment is applied once by the edge (its idempotency key); a success
            # of a charge not in flight still credits.
            if in_flight:
                r.pending_id, r.pending_micros, r.pending_asked_us = None, None, None
            if amount <= 0:
                return {}      # AMBIGUOUS 9.4: a success of 0 µUSD credits nothing
            entry = self._credit(now, "auto_recharge", amount, None, pid, in_settle=True)
            if entry is None:
                # AMBIGUOUS 9.4 / 2.3: a refused credit emits no succeeded event.
                return {"refused": "too_many_grants"}
            self._event("auto_recharge.succeeded", {"charge_id": cid, "amount_micros": amount,
                                                    "payment_intent_id": pid,
                                                    "balance_micros": self._balance()})
            return {"entry": entry}
        if in_flight:
            r.pending_id, r.pending_micros, r.pending_asked_us = None, None, None
            if r.paused != "disputed":  # 9.4 / 3.6: a dispute's pause stays
                r.paused = "no_stripe_customer" if cmd.get("reason") == "no_stripe_customer" else "payment_failed"
            # AMBIGUOUS 9.4: the failed event's amount and payment id are the settlement's (not the
            # amount asked for); its reason is the settlement's reason.
            self._event("auto_recharge.failed", {"charge_id": cid, "amount_micros": amount,
                                                 "payment_intent_id": pid, "reason": cmd.get("reason"),
                                                 "balance_micros": self._balance()})
        return {}

    # dunning (section 8)
    def _cmd_invoice_failed(self, now, cmd):
        s = int(cmd["since_us"])
        iid = cmd.get("invoice_id")
        if iid is not None:
            if iid in self.settled_invoices:
                return {}
            sub = self.subscriptions.get(cmd.get("subscription_id"))
            if sub is not None and sub["status"] in ENDED:  # 8.1: its subscription ended
                return {}
        # AMBIGUOUS 8.1/8.3: "older than the latest news" is strict: news at the same time applies.
        elif self.latest_invoice_news_us is not None and s < self.latest_invoice_news_us:
            # AMBIGUOUS 8.1: an ignored failure does not add its invoice id to the unpaid list.
            return {}
        self.latest_invoice_news_us = s if self.latest_invoice_news_us is None else max(self.latest_invoice_news_us, s)
        if self.dunning is None:
            # Rule 8.1: the dunning policy is taken when dunning starts (later failures while it
            # runs do not change it), and the steps already due are taken at once.
            self.dunning = Dunning(past_due_since_us=s,
                                   suspend_after_s=int(cmd["suspend_after_s"]),
                                   degrade_after_s=int(cmd["degrade_after_s"]),
                                   downgrade_after_s=int(cmd["downgrade_after_s"]),
                                   free_plan_id=cmd["free_plan_id"],
                                   free_plan_version=int(cmd["free_plan_version"]))
            self._dunning_steps(now)
        if iid is not None and iid not in self.dunning.unpaid:
            self.dunning.unpaid.append(iid)
            if cmd.get("subscription_id") is not None:
                self.dunning.billing[iid] = cmd["subscription_id"]
        return {}

    def _cmd_invoice_paid(self, now, cmd):
        p = int(cmd["as_of_us"])
        iid = cmd.get("invoice_id")
        payment = cmd.get("settled_by", "paid") == "paid" and cmd.get("amount_paid_cents") != 0
        d = self.dunning
        if iid is not None:
            if iid not in self.settled_invoices:
                self.settled_invoices = (self.settled_invoices + [iid])[-100:]
            if payment:
                self.paid_an_invoice = True
                self.latest_invoice_news_us = p if self.latest_invoice_news_us is None else max(
                    self.latest_invoice_news_us, p)
            if d is None:
                return {}
            if d.unpaid:
                if iid in d.unpaid:
                    d.unpaid.remove(iid)
                    d.billing.pop(iid, None)
                if not d.unpaid:
                    self._end_dunning(now)
            elif payment:
                self._end_dunning(now)
            return {}
        if not payment:
            return {}
        if self.latest_invoice_news_us is not None and p < self.latest_invoice_news_us:
            return {}
        self.latest_invoice_news_us = p
        self.paid_an_invoice = True
        if d is not None:
            self._end_dunning(now)
        return {}

    # subscription periods (5.6)
    def _cmd_subscription_period(self, now, cmd):
        a = int(cmd["start_us"])
        e = cmd.get("end_us")
        # 1.
        if self.sub_latest_start_us is not None and a <= self.sub_latest_start_us:
            return {}
        first = self.sub_latest_start_us is None
        # 2.
        self.sub_latest_start_us = a
        if e is not None:
            # AMBIGUOUS 5.6: e <= a would make a cycle of length <= 0; treated as a harness error.
            if e <= a:
                raise ValueError("subscription period end must be after its start")
            self.grid = (a, e - a)
        # 3.
        if not first and a > self.period_start_us:
            # AMBIGUOUS 5.6 step 3: 5.4's "a period whose start is not before now is not
            # archived" applies; the new period keeps the org's plan version (5.4's succession
            # is not applied).
            self._archive(now, now)
            if e is not None and e > now:
                end = e
            else:
                _k, _s, end = self._grid_period(now)
            self.period_key, self.period_start_us, self.period_end_us = sub_key(now), now, end
            self._reset_period_counters()
            self._lift(now, "period")
        # 4.
        elif e is not None and e > now:
            self.period_end_us = e
        return {}

    # alerts (2.9)
    def _cmd_set_alerts(self, now, cmd):
        if int(cmd["low_balance_micros"]) >= 0:  # -1: unchanged
            self.low_balance_micros = int(cmd["low_balance_micros"])
            self.low_balance_armed = True
        if cmd.get("runway_alert_s") is not None:
            self.runway_alert_s = int(cmd["runway_alert_s"])
            self.runway_armed = True
        return {}

    def _cmd_advance(self, now, cmd):
        return {}
