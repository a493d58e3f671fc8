"""The engine against the independent reference model (issue 17): one harness, two runners.

`tests/test_differential.py` runs a few hundred Hypothesis examples in `make test`;
`bench/model.py --minutes N` runs it for as long as asked, with its seed printed.

A step is a command (as the model's dict) at an instant. The engine side applies it the way
the shard does: through `execute` (usage through `actors.usage.bill_ticks`), a keyed command
skipped when its key already booked a ledger entry, every applied command journaled (and
encoded, as the shard keeps it). A restart rebuilds the engine's org from its last snapshot
and the journal after it, as a shard does after a crash or a passivation. After every step
the two must agree to the micro: the command's result, its ledger entries, events, charges
and archived periods, and the whole observable state.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from hypothesis import strategies as st

from actors import commands as cmd
from actors.commands import JOURNAL_DECODER, JOURNAL_ENCODER, JournalItem, execute, replay
from actors.org import BillingError, Effects, LeaseConflict, LeaseEnded, OrgBillingActor, OrgSnapshot, Resources
from actors.refusals import UnknownLease
from actors.ticks import Tick
from actors.timeutil import rfc3339_to_us
from actors.usage import bill_ticks
from config.catalog import Catalog, parse_catalog
from metergate_client.decision import decide
from tests.model.reference import RefCatalog, RefOrg

US = 1_000_000
HOUR_S = 3_600
DAY_S = 86_400
DAY_US = DAY_S * US
ORG_ID = "org_diff"


CATALOG_PATH = Path(__file__).parent / "model" / "catalog.toml"
RAW = tomllib.loads(CATALOG_PATH.read_text())
ENGINE_CATALOG: Catalog = parse_catalog(RAW)
START_US = rfc3339_to_us("2026-03-01T00:00:00Z")
DUNNING = {"suspend_after_s": 3 * DAY_S, "degrade_after_s": 7 * DAY_S, "downgrade_after_s": 14 * DAY_S,
           "free_plan_id": "free", "free_plan_version": 1}


# ----- the engine, driven as the shard drives it -----------------------------------------


def _resources(spec: dict) -> Resources:
    return Resources(**{k: v for k, v in spec.items() if v is not None})


def _key(command: dict) -> str | None:
    return command.get("key")


class EngineOrg:
    """One org of the engine, with the shard's journal, snapshot, key and tick memory."""

    def __init__(self, plan_id: str, prepaid: bool, now_us: int, imported: dict | None = None,
                 shadow: bool = False) -> None:
        fx = Effects()
        create = (cmd.CreateOrg("diff@example.test", plan_id, prepaid, shadow) if imported is None
                  else import_command({**imported, "plan_id": plan_id, "prepaid": prepaid}))
        created = execute(None, create, ENGINE_CATALOG, now_us, fx, org_id=ORG_ID)
        self.org: OrgBillingActor = created.org
        self.import_result = {"changed": created.changed} if imported is not None else None
        self.snapshot = msgspec.msgpack.encode(self.org.to_snapshot())
        self.tail: list[bytes] = []  # journal entries after the snapshot, encoded
        self.booked_keys: set[str] = set()
        self.billed_ticks: set[str] = set()
        self.last_now = now_us
        self.fx = fx

    def take_effects(self) -> dict:
        fx, self.fx = self.fx, Effects()
        # What the model does not see: every effect is this org's and of this step's instant.
        assert all(org_id == ORG_ID and entry.at_us == self.last_now for org_id, entry in fx.ledger), fx.ledger
        assert all(e.org_id == ORG_ID and e.at_us == self.last_now for e in fx.events), fx.events
        assert all(c.org_id == ORG_ID and c.requested_us == self.last_now for c in fx.charges), fx.charges
        assert all(p.org_id == ORG_ID for p in fx.periods), fx.periods
        return {"ledger": [(e.kind, e.amount_micros, e.grant_id, e.expires_at_us, e.invoiced_micros)
                           for _, e in fx.ledger],
                "events": [(e.type, e.data) for e in fx.events],
                "charges": [(c.charge_id, c.amount_micros, c.idempotency_key) for c in fx.charges],
                "periods": [(p.period_key, p.start_us, p.end_us, p.usage_micros, p.quota_used_micros, p.plan_id,
                             p.plan_version) for p in fx.periods]}

    def _run(self, command: cmd.Command, now_us: int):
        self.tail.append(JOURNAL_ENCODER.encode([JournalItem(now_us, command)]))
        return execute(self.org, command, ENGINE_CATALOG, now_us, self.fx)

    def apply(self, now_us: int, step: dict) -> dict:
        kind = step["type"]
        if kind == "gate":
            # As a gateway decides: from the view the shard published after the org's last
            # command while it is valid (docs/gate-protocol.md 8.5), else from the view published
            # again once time ended it. So the model holds valid_until to the rules too.
            view, until = self.org.view_as_of(self.last_now)
            if until is not None and now_us >= until:
                view = self.org.view_as_of(now_us)[0]
            decision = decide(step["action"], _resources(step["resources"]), view)
            if decision.would_reason is not None:  # a shadow org's (billing-rules 2.12)
                return {"reason": str(decision.reason), "would": str(decision.would_reason)}
            return {"reason": str(decision.reason)}
        key = _key(step)
        if key is not None and key in self.booked_keys:
            return {"replayed": True}  # the edge answers it from the key: the org sees nothing
        self.last_now = now_us
        if kind == "usage":
            return self._usage(now_us, step["ticks"])
        try:
            outcome = self._run(self._command(step), now_us)
        except LeaseConflict:
            return {"refused": "conflict"}
        except LeaseEnded:
            return {"refused": "lease_ended"}
        except UnknownLease:
            return {"refused": "unknown_lease"}
        except BillingError as exc:
            if kind == "set_enforcement":
                return {"refused": str(exc.code)}
            return {"refused": True} if kind == "import" else {"refused": str(exc)}
        if isinstance(outcome, cmd.Booked) and key is not None:
            self.booked_keys.add(key)
        return self._result(kind, outcome)

    def _usage(self, now_us: int, ticks: list[dict]) -> dict:
        fresh, duplicates = [], 0
        for index, t in enumerate(ticks):
            if t["tick_id"] in self.billed_ticks or any(f.tick_id == t["tick_id"] for f in fresh):
                duplicates += 1
                continue
            fresh.append(Tick(t["tick_id"], ORG_ID, t["lease_id"], now_us, t["duration_ms"], t["memory_mb"],
                              t["cpu_count"], t["disk_mb"], t["units"], index))
        billed = bill_ticks(self.org, fresh, ENGINE_CATALOG, now_us, self.fx)
        for command in billed.commands:
            self.tail.append(JOURNAL_ENCODER.encode([JournalItem(now_us, command)]))
        self.billed_ticks.update(t.tick_id for t in billed.ticks)
        return {"accepted": len(billed.ticks), "duplicates": duplicates,
                "rejected": [t.tick_id for t in billed.unpriced]}

    @staticmethod
    def _command(step: dict) -> cmd.Command:
        match step["type"]:
            case "credit":
                return cmd.Credit(step["kind"], step["amount_micros"], step.get("expires_at_us"), None,
                                  step.get("key"), step.get("payment_id"), step.get("paid_micros"))
            case "debit":
                return cmd.Credit(step["kind"], -step["amount_micros"])
            case "stripe_refund":
                return cmd.RefundPayment(step["refund_id"], step["payment_id"], step["amount_micros"], None,
                                         step.get("key"), None, step.get("credited_micros", 0),
                                         step.get("paid_micros"))
            case "stripe_refund_failed":
                return cmd.ReverseRefund(step["refund_id"], step["payment_id"], step.get("key"))
            case "dispute":
                return cmd.DisputeFunds(step["dispute_id"], step["payment_id"], step["amount_micros"],
                                        step["withdrawn"], step["credited_micros"], None, None, step.get("key"),
                                        step["lapsed_micros"], step.get("paid_micros"))
            case "subscription":
                return cmd.SubscriptionChanged(step["subscription_id"], step["status"], step["tier"],
                                               step["max_concurrent"], step["as_of_us"], step["base_tier"],
                                               step["base_max_concurrent"], step.get("start_us"), step.get("end_us"))
            case "acquire":
                return cmd.AcquireLease(step["lease_id"], _resources(step["resources"]), step["ttl_s"])
            case "renew":
                return cmd.RenewLease(step["lease_id"])
            case "release":
                return cmd.ReleaseLease(step["lease_id"])
            case "halt":
                return cmd.Halt()
            case "resume":
                return cmd.Resume()
            case "set_plan":
                return cmd.SetPlan(step["plan_id"], step["plan_version"])
            case "set_tier":
                return cmd.SetTier(step["tier"], step["max_concurrent"], step.get("as_of_us"))
            case "set_limits":
                return cmd.SetLimits(step.get("max_disk_mb"), step.get("machine_quotas"))
            case "set_card":
                return cmd.SetPaymentMethod(step["present"])
            case "set_auto_recharge":
                return cmd.SetAutoRecharge(step["enabled"], step["threshold_micros"], step["amount_micros"],
                                           step["max_per_day"], step["cooldown_s"], step.get("lift_dispute", False),
                                           step.get("threshold_runway_s", 0))
            case "settle":
                return cmd.SettleRecharge.of_payment(step["charge_id"], step["succeeded"], step["amount_micros"],
                                                     step["payment_id"], step.get("reason"))
            case "invoice_failed":
                return cmd.InvoiceFailed(step["since_us"], step["suspend_after_s"], step["degrade_after_s"],
                                         step["downgrade_after_s"], step["free_plan_id"], step["free_plan_version"],
                                         step.get("invoice_id"), step.get("subscription_id"))
            case "invoice_paid":
                return cmd.InvoicePaid(step["as_of_us"], step.get("invoice_id"), step.get("amount_paid_cents"),
                                       step.get("settled_by", "paid"))
            case "subscription_period":
                return cmd.ResetPeriod(step["start_us"], step.get("end_us"))
            case "set_alerts":
                return cmd.SetAlerts(step["low_balance_micros"], step.get("runway_alert_s"))
            case "advance":
                return cmd.Advance()
            case "set_enforcement":
                return cmd.SetEnforcement(step["mode"], step.get("at_us"), step.get("undo", False))
            case "import":
                return import_command(step)
        raise AssertionError(f"no engine command for {step!r}")

    @staticmethod
    def _result(kind: str, outcome) -> dict:
        match outcome:
            case cmd.Booked(entry=entry) if kind == "stripe_refund":
                return {"clawed_micros": -entry.amount_micros}
            case cmd.Booked(entry=entry):
                return {"entry": (entry.kind, entry.amount_micros, entry.grant_id, entry.expires_at_us)}
            case cmd.Stale() if kind in ("stripe_refund", "dispute"):
                return {"duplicate": True}
            case cmd.Stale():
                return {"stale": True}
            case cmd.Applied() if kind == "stripe_refund":
                return {"clawed_micros": 0}
            case cmd.Applied() if kind == "set_tier":
                return {"stale": False}
            case cmd.LeaseGranted(lease=lease, created=created, shadowed=shadowed):
                granted = {"granted": True, "created": created, "expires_at_us": lease.expires_at_us}
                return granted if shadowed is None else {**granted, "would": str(shadowed.would_reason)}
            case cmd.LeaseDenied(decision=decision):
                return {"denied": str(decision.reason)}
            case cmd.LeaseRenewed(lease=lease):
                return {"expires_at_us": lease.expires_at_us}
            case cmd.Released(released=released):
                return {"released": released}
            case cmd.Imported(changed=changed):
                return {"changed": changed}
        return {}

    def restart(self, snapshot_now: bool) -> None:
        """As a shard rebuilds an org (after a crash or a passivation): its last snapshot and
        the journal after it. The rebuilt org must equal the live one exactly."""
        if snapshot_now:  # the shard snapshots and drops the journal behind it
            self.snapshot, self.tail = msgspec.msgpack.encode(self.org.to_snapshot()), []
        snap = msgspec.msgpack.decode(self.snapshot, type=OrgSnapshot)
        rebuilt = OrgBillingActor.from_snapshot(snap, ENGINE_CATALOG)
        for entry in self.tail:
            replay(rebuilt, JOURNAL_DECODER.decode(entry), ENGINE_CATALOG)
        assert rebuilt.to_snapshot() == self.org.to_snapshot(), "replay differs from the live org"
        self.org = rebuilt

    def observe(self) -> dict:
        org = self.org
        r = org.recharge
        recharge = None
        if r is not None:
            recharge = {"enabled": r.enabled, "threshold_micros": r.threshold_micros,
                        "amount_micros": r.amount_micros, "max_per_day": r.max_per_day, "cooldown_s": r.cooldown_s,
                        "pending_id": r.pending_id, "pending_micros": r.pending_micros if r.pending_id else None,
                        "day_count": r.day_count if r.day == self.last_now // DAY_US else 0,
                        "paused": r.paused is not None}
        state = org.state(self.last_now)
        return {
            "balance_micros": org.balance_micros, "debt_micros": org.debt_micros,
            "grants": [(g.grant_id, g.kind, g.remaining_micros, g.expires_at_us, g.payment_id) for g in state.grants],
            "remainder_scaled": org.remainder_scaled, "period_key": org.period_key,
            "period_start_us": org.period_start_us, "period_end_us": org.period_end_us,
            "period_usage_micros": org.period_usage_micros, "quota_used_micros": org.quota_used_micros,
            "quota_micros": org.plan.included_micros, "plan_id": org.plan.id, "plan_version": org.plan.version,
            "halted": None if org.halted is None else str(org.halted), "suspended": org.suspended,
            "degraded": org.degraded, "dunning_step": None if org.dunning is None else int(org.dunning.step),
            "past_due_since_us": org.past_due_since_us, "tier": org.tier, "max_concurrent": org.max_concurrent,
            "max_disk_mb": org.max_disk_mb,
            "leases": {l.lease_id: (l.expires_at_us, l.quantity, l.ttl_s) for l in (org.leases or {}).values()},
            "has_payment_method": org.has_payment_method, "paid_credit": org.paid_credit, "recharge": recharge,
            "low_balance_micros": org.low_balance_micros, "low_balance_armed": org.low_balance_armed,
            "runway_alert_s": org.runway_alert_s, "runway_armed": org.runway_armed,
        }


def import_command(step: dict) -> cmd.ImportOrg:
    """The engine's ImportOrg of the model's import step (billing-rules 2.11)."""
    due, recharge = step.get("past_due"), step.get("recharge")
    return cmd.ImportOrg(
        "diff@example.test",
        [cmd.ImportAmount(a["source_id"], a["kind"], a["amount_micros"], a.get("expires_at_us"))
         for a in step.get("amounts") or ()],
        step.get("plan_id"), step.get("plan_version", 0), step.get("prepaid"), step.get("tier"),
        step.get("max_concurrent", 0), step.get("card"),
        None if due is None else cmd.InvoiceFailed(due["since_us"], due["suspend_after_s"], due["degrade_after_s"],
                                                   due["downgrade_after_s"], due["free_plan_id"],
                                                   due["free_plan_version"]),
        None if recharge is None else cmd.SetAutoRecharge(
            recharge["enabled"], recharge["threshold_micros"], recharge["amount_micros"], recharge["max_per_day"],
            recharge["cooldown_s"], False, recharge.get("threshold_runway_s", 0)),
        customer_linked=bool(step.get("customer_linked")), shadow=step.get("shadow"))


# ----- the model side: the same key memory the edge gives every command ------------------


class ModelOrg:
    def __init__(self, plan_id: str, prepaid: bool, now_us: int, imported: dict | None = None,
                 shadow: bool = False) -> None:
        self.ref = RefOrg(RefCatalog(RAW), ORG_ID, plan_id, prepaid, now_us, imported, shadow)
        self.booked_keys: set[str] = set()

    def apply(self, now_us: int, step: dict) -> dict:
        key = _key(step)
        if key is not None and key in self.booked_keys:
            return {"replayed": True}
        result = self.ref.apply(now_us, {k: v for k, v in step.items() if k != "key"})
        booked = "entry" in result or result.get("clawed_micros", 0) > 0
        if key is not None and booked:
            self.booked_keys.add(key)
        if step["type"] == "usage":
            result = {k: result[k] for k in ("accepted", "duplicates", "rejected")}
        if step["type"] == "settle" and "entry" not in result:
            result = {}
        return result


# ----- comparing -------------------------------------------------------------------------


class Divergence(AssertionError):
    pass


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def compare(step_no: int, step: dict, engine_result: dict, model_result: dict, engine_fx: dict, model_fx: dict,
            engine_state: dict, model_state: dict) -> None:
    problems = []
    if engine_result != model_result:
        problems.append(f"result: engine {engine_result} model {model_result}")
    for name in ("ledger", "events", "charges", "periods"):
        mine = Counter(_canon(x) for x in engine_fx[name])
        theirs = Counter(_canon(x) for x in model_fx[name])
        if mine != theirs:
            problems.append(f"{name}: engine {engine_fx[name]} model {model_fx[name]}")
    for name in model_state:
        if engine_state.get(name) != model_state[name]:
            problems.append(f"state {name}: engine {engine_state.get(name)!r} model {model_state[name]!r}")
    if problems:
        raise Divergence(f"step {step_no} {_canon(step)}:\n  " + "\n  ".join(problems))


@dataclass
class Pair:
    """The engine and the model, fed the same steps."""

    engine: EngineOrg
    model: ModelOrg
    now: int
    steps: int = 0
    charges_seen: dict[str, int] = field(default_factory=dict)  # every charge asked for → its amount
    payments: list[str] = field(default_factory=list)
    paid: dict[str, int] = field(default_factory=dict)  # payment → what was paid for its credit, when named
    deliveries: dict[str, dict] = field(default_factory=dict)  # idempotency key → the step first sent

    def delivery(self, step: dict) -> dict:
        """A keyed step is a Stripe object: sent again, it is the same object (a redelivery),
        never another body under the same key."""
        key = step.get("key")
        if key is None:
            return step
        step = self.deliveries.setdefault(key, step)
        if step["type"] == "credit" and step["payment_id"] not in self.payments:
            self.payments.append(step["payment_id"])
        if step["type"] == "credit" and step.get("paid_micros"):
            self.paid.setdefault(step["payment_id"], step["paid_micros"])
        return step

    @classmethod
    def create(cls, plan_id: str, prepaid: bool, now_us: int, imported: dict | None = None,
               shadow: bool = False) -> "Pair":
        """`imported`: the org is created by this import step (billing-rules 2.11); `shadow`:
        created in shadow (2.12)."""
        if imported is not None:
            imported = {**imported, "plan_id": plan_id, "plan_version": 0, "prepaid": prepaid}
            if shadow:
                imported["shadow"] = True
        pair = cls(EngineOrg(plan_id, prepaid, now_us, imported, shadow),
                   ModelOrg(plan_id, prepaid, now_us, imported, shadow), now_us)
        compare(0, {"type": "create", "plan_id": plan_id, "prepaid": prepaid, "imported": imported},
                pair.engine.import_result or {}, getattr(pair.model.ref, "import_result", None) or {},
                pair.engine.take_effects(), pair.model.ref.take_effects(), pair.engine.observe(),
                pair.model.ref.observe())
        return pair

    total_steps = 0  # over every pair of this process (bench/model.py reports it)

    def step(self, step: dict) -> None:
        self.steps += 1
        Pair.total_steps += 1
        engine_result = self.engine.apply(self.now, step)
        model_result = self.model.apply(self.now, step)
        engine_fx, model_fx = self.engine.take_effects(), self.model.ref.take_effects()
        self.charges_seen.update((c[0], c[1]) for c in engine_fx["charges"])
        if step["type"] == "gate":
            compare(self.steps, step, engine_result, model_result, engine_fx, model_fx, {}, {})
            return
        compare(self.steps, step, engine_result, model_result, engine_fx, model_fx, self.engine.observe(),
                self.model.ref.observe())

    def wait(self, seconds: int) -> None:
        self.now += seconds * US


# ----- what to do next: one strategy per kind of step ------------------------------------

LEASES = ("ls_a", "ls_b", "ls_c", "ls_d")
RESOURCES = (
    {"memory_mb": 512, "cpu_count": 1},
    {"memory_mb": 2048, "cpu_count": 2, "disk_mb": 10_240},
    {"machine_type": "a100", "region": "us-east", "quantity": 1},
    {"machine_type": "a100", "region": "us-east", "quantity": 2},
    {"disk_mb": 30_000},
    {"quantity": 3},
    {"memory_mb": 65_536, "cpu_count": 32, "quantity": 2},  # 5.3 USD an hour: a runway in minutes (2.10)
)
amounts = st.one_of(st.integers(1, 2_000), st.integers(1, 3_000_000), st.integers(1, 30_000_000))
cents = st.integers(50, 3_000).map(lambda c: c * 10_000)


def tick_specs(serial: int) -> st.SearchStrategy:
    return st.lists(st.fixed_dictionaries({
        "tick_id": st.sampled_from([f"t{serial}_{n}" for n in range(4)] + ["t_repeat"]),
        "lease_id": st.sampled_from(LEASES + ("",)),
        "duration_ms": st.sampled_from((1, 999, 1_000, 60_000, 3_600_000)),
        "memory_mb": st.sampled_from((0, 1, 512, 4096, 65_536)),
        "cpu_count": st.sampled_from((0, 1, 2, 16)),
        "disk_mb": st.sampled_from((0, 10_240)),
        "units": st.one_of(st.none(), st.fixed_dictionaries({"gpu_s": st.integers(0, 200)}),
                           st.fixed_dictionaries({"ingest_bytes": st.integers(0, 10**9)})),
    }), min_size=1, max_size=5)


def next_boundaries(pair: Pair) -> list[int]:
    """Instants worth landing on: period ends, expiries, the next dunning step, week and month
    edges, each ±1 s."""
    org = pair.engine.org
    moments = [org.period_end_us, org.next_due_us()]
    moments += [g.expires_at_us for g in org.grants or () if g.expires_at_us]
    return sorted({m + d for m in moments for d in (-US, 0, US) if m + d > pair.now})


def step_strategy(pair: Pair, serial: int, auto_recharge: bool = True) -> st.SearchStrategy:
    """The next step, given where the pair is: every command of the rules, with the Stripe
    ones delivered early, late, twice and out of order. Without `auto_recharge` no charge is
    ever asked for (a shard's charger would settle it on its own)."""
    now = pair.now
    resources = st.sampled_from(RESOURCES)
    payments = pair.payments or ["pi_none"]
    stripe = st.one_of(
        # What was paid (rule 3.0): unknown, or with tax on top, or less than the credit (a bonus).
        st.builds(lambda amount, expires, pid, paid: {"type": "credit", "kind": "topup", "amount_micros": amount,
                                                      "expires_at_us": expires, "payment_id": pid,
                                                      "key": f"stripe:payment:{pid}", "paid_micros": paid},
                  amounts, st.one_of(st.none(), st.integers(-DAY_S, 40 * DAY_S).map(lambda s: now + s * US)),
                  st.one_of(st.just(f"pi_{serial}"), st.sampled_from(payments)), st.one_of(st.none(), amounts)),
        st.builds(lambda rid, pid, amount, credited, paid: {
            "type": "stripe_refund", "refund_id": rid, "payment_id": pid, "amount_micros": amount,
            "key": f"stripe:refund:{rid}", "credited_micros": credited, "paid_micros": paid},
                  st.sampled_from([f"re_{serial}", "re_again", "re_other"]),
                  st.sampled_from(payments + [f"pi_{serial + 1}", "pi_invoice"]), amounts,
                  st.one_of(st.just(0), amounts), st.one_of(st.none(), amounts)),
        # Part of a payment whose total is known (rule 3.0: several parts round down once).
        st.builds(lambda rid, pid, part: {
            "type": "stripe_refund", "refund_id": rid, "payment_id": pid,
            "amount_micros": max(1, pair.paid[pid] * part[0] // part[1]), "key": f"stripe:refund:{rid}",
            "credited_micros": 0, "paid_micros": None},
                  st.sampled_from([f"re_{serial}", "re_again"]), st.sampled_from(sorted(pair.paid) or ["pi_none"]),
                  st.sampled_from([(1, 3), (2, 7), (1, 2), (5, 11)])) if pair.paid else st.nothing(),
        st.builds(lambda rid, pid: {"type": "stripe_refund_failed", "refund_id": rid, "payment_id": pid,
                                    "key": f"stripe:refund:{rid}:reversed"},
                  st.sampled_from([f"re_{serial}", "re_again", "re_other"]),
                  st.sampled_from(payments + [f"pi_{serial + 1}"])),
        st.builds(lambda did, pid, amount, credited, lapsed, withdrawn, paid: {
            "type": "dispute", "dispute_id": did, "payment_id": pid, "amount_micros": amount,
            "credited_micros": credited, "lapsed_micros": min(lapsed, credited), "withdrawn": withdrawn,
            "key": f"stripe:dispute:{did}:{'withdrawn' if withdrawn else 'reinstated'}", "paid_micros": paid},
            st.sampled_from(["dp_1", "dp_2", f"dp_{serial}"]),
            st.sampled_from(payments + ["pi_invoice", f"pi_{serial + 1}"]),  # a credit still to come
            amounts, st.one_of(st.just(0), amounts), st.one_of(st.just(0), amounts), st.booleans(),
            st.one_of(st.none(), amounts)),
        st.builds(lambda sub, status, tier, back_s, period: {
            "type": "subscription", "subscription_id": sub, "status": status, "tier": tier,
            "max_concurrent": ENGINE_CATALOG.tiers[tier] if tier else 0, "as_of_us": now - back_s * US,
            "base_tier": ENGINE_CATALOG.default_tier, "base_max_concurrent": ENGINE_CATALOG.tiers[ENGINE_CATALOG.default_tier],
            "start_us": None if period is None else now - period[0] * US,
            "end_us": None if period is None or not period[1] else now - period[0] * US + period[1] * DAY_US},
            st.sampled_from(["sub_a", "sub_b", "sub_c"]),
            st.sampled_from(["active", "trialing", "past_due", "incomplete", "paused", "canceled", "unpaid",
                             "incomplete_expired"]),
            st.sampled_from([None, "pro", "pro_plus"]), st.sampled_from([0, 0, 1, 2, 3 * DAY_S]),
            st.one_of(st.none(), st.tuples(st.integers(0, 40 * DAY_S), st.sampled_from((0, 7, 30))))),
        st.builds(lambda since_s, invoice, sub: {"type": "invoice_failed", "since_us": now - since_s * US,
                                                 "invoice_id": invoice, "subscription_id": sub, **DUNNING},
                  st.integers(0, 20 * DAY_S), st.sampled_from(["in_1", "in_2", None]),
                  st.sampled_from([None, "sub_a", "sub_b"])),
        st.builds(lambda as_of_s, invoice, paid, how: {"type": "invoice_paid", "as_of_us": now - as_of_s * US,
                                                       "invoice_id": invoice, "amount_paid_cents": paid,
                                                       "settled_by": how},
                  st.integers(0, 3 * DAY_S), st.sampled_from(["in_1", "in_2", "in_3", None]),
                  st.sampled_from([0, 900, None]), st.sampled_from(["paid", "paid", "voided", "uncollectible"])),
        st.builds(lambda back_s, length_d, with_end: {
            "type": "subscription_period", "start_us": now - back_s * US,
            "end_us": now - back_s * US + length_d * DAY_US if with_end else None},
            st.integers(0, 40 * DAY_S), st.sampled_from((7, 28, 30, 31)), st.booleans()),
    )
    # An outcome only for a charge that was asked for (early, late, twice, or after the next
    # one), of its amount or another; one payment intent per charge (the charger's
    # idempotency key sees to it), so a success delivered twice carries the same key.
    settle = [st.builds(lambda cid, ok, amount, reason: {"type": "settle", "charge_id": cid, "succeeded": ok,
                                                 "amount_micros": amount or pair.charges_seen[cid],
                                                 "payment_id": f"pi_{cid}",
                                                 "reason": None if ok else reason,
                                                 "key": f"stripe:payment:pi_{cid}" if ok else None},
                        st.sampled_from(sorted(pair.charges_seen)), st.booleans(), st.one_of(st.none(), cents),
                        st.sampled_from(("card_declined", "no_stripe_customer")))
              ] if pair.charges_seen else []
    recharge = st.one_of(
        *settle,
        *([st.builds(lambda on, threshold, amount, per_day, cooldown, by_admin, runway: {
            "type": "set_auto_recharge", "enabled": on, "threshold_micros": threshold, "amount_micros": amount,
            "max_per_day": per_day, "cooldown_s": cooldown, "lift_dispute": by_admin, "threshold_runway_s": runway},
            st.booleans(), st.integers(1, 10_000_000), cents, st.integers(1, 4), st.sampled_from((0, 60, 3_600)),
            st.booleans(), st.sampled_from((0, 600, 7_200, 86_400)))]
          if auto_recharge else []),
        st.builds(lambda present: {"type": "set_card", "present": present}, st.booleans()),
    )
    leases = st.one_of(
        st.builds(lambda lid, res, ttl: {"type": "acquire", "lease_id": lid, "resources": res, "ttl_s": ttl},
                  st.sampled_from(LEASES), resources, st.sampled_from((1, 30, 600, 3_600, 86_400))),
        st.builds(lambda lid: {"type": "renew", "lease_id": lid}, st.sampled_from(LEASES)),
        st.builds(lambda lid: {"type": "release", "lease_id": lid}, st.sampled_from(LEASES)),
    )
    operator = st.one_of(
        st.builds(lambda kind, amount, expires: {"type": "credit", "kind": kind, "amount_micros": amount,
                                                 "expires_at_us": expires},
                  st.sampled_from(("grant", "adjustment")), amounts,
                  st.one_of(st.none(), st.integers(1, 40 * DAY_S).map(lambda s: now + s * US))),
        st.builds(lambda kind, amount: {"type": "debit", "kind": kind, "amount_micros": amount},
                  st.sampled_from(("refund", "adjustment")), amounts),
        st.just({"type": "halt"}), st.just({"type": "resume"}),
        st.sampled_from([{"type": "set_plan", "plan_id": p, "plan_version": v}
                         for p, v in (("payg", 1), ("payg", 2), ("hobby_weekly", 1), ("hobby_weekly", 2),
                                      ("free", 1))]),
        st.builds(lambda tier, as_of_s: {"type": "set_tier", "tier": tier, "max_concurrent": ENGINE_CATALOG.tiers[tier]
                                         if tier != "custom" else 2, "as_of_us": None if as_of_s is None
                                         else now - as_of_s * US},
                  st.sampled_from(("base", "pro", "custom")), st.one_of(st.none(), st.integers(0, DAY_S))),
        st.builds(lambda disk, quotas: {"type": "set_limits", "max_disk_mb": disk, "machine_quotas": quotas},
                  st.one_of(st.none(), st.sampled_from((0, 20_480, 40_000))),
                  st.one_of(st.none(), st.just({}), st.just({"us-east": {"a100": 2}}))),
        st.builds(lambda threshold, runway: {"type": "set_alerts", "low_balance_micros": threshold,
                                             "runway_alert_s": runway},
                  st.sampled_from((-1, 0, 1_000_000, 4_000_000)), st.sampled_from((None, 0, 600, 3_600, 86_400))),
        st.just({"type": "advance"}),
        # Shadow and cutover (billing-rules 2.12): a cutover now, past or ahead, and its undo.
        st.builds(lambda mode, at_s, undo: {"type": "set_enforcement", "mode": mode,
                                            "at_us": None if at_s is None else now + at_s * US, "undo": undo},
                  st.sampled_from(("shadow", "enforce", "enforce")),
                  st.one_of(st.none(), st.integers(-DAY_S, DAY_S), st.sampled_from((-1, 0, 1, 60))),
                  st.booleans()),
    )
    gate = st.builds(lambda action, res: {"type": "gate", "action": action, "resources": res},
                     st.sampled_from(("create", "wake", "ingest", "purchase")), resources)
    usage = tick_specs(serial).map(lambda ticks: {"type": "usage", "ticks": ticks})
    return st.one_of(usage, usage, leases, operator, stripe, recharge, gate,
                     import_strategy(now, serial, auto_recharge))


PLANS = (("payg", 1), ("payg", 2), ("hobby_weekly", 1), ("hobby_weekly", 2), ("free", 1))


def import_amounts(now: int, serial: int) -> st.SearchStrategy:
    """An import's amounts (billing-rules 2.11): grants of every kind, with and without expiry
    (some already past), and debts; source ids drawn from a few, so that re-imports happen."""
    grant = st.builds(lambda sid, kind, amount, expires: {"source_id": sid, "kind": kind, "amount_micros": amount,
                                                          "expires_at_us": expires},
                      st.sampled_from(["im_a", "im_b", "im_c", f"im_{serial}"]),
                      st.sampled_from(("grant", "topup", "adjustment", "auto_recharge")), amounts,
                      st.one_of(st.none(), st.integers(-DAY_S, 40 * DAY_S).map(lambda s: now + s * US)))
    debt = st.builds(lambda sid, amount: {"source_id": sid, "kind": "adjustment", "amount_micros": -amount,
                                          "expires_at_us": None},
                     st.sampled_from(["im_debt", f"im_d{serial}"]), amounts)
    return st.lists(st.one_of(grant, grant, debt), max_size=4)


def import_strategy(now: int, serial: int, auto_recharge: bool = True) -> st.SearchStrategy:
    """An import of the org (billing-rules 2.11): its amounts, and settings that may or may not
    differ from the org's; now and then the other billing mode (refused whole)."""
    plan = st.one_of(st.none(), st.sampled_from(PLANS))
    tier = st.one_of(st.none(), st.sampled_from([("base", ENGINE_CATALOG.tiers["base"]),
                                                 ("pro", ENGINE_CATALOG.tiers["pro"]), ("custom", 2)]))
    past_due = st.one_of(st.none(), st.integers(0, 20 * DAY_S).map(lambda s: {"since_us": now - s * US, **DUNNING}))
    recharge = st.one_of(st.none(), st.builds(
        lambda on, threshold, amount, per_day, cooldown, runway: {
            "enabled": on, "threshold_micros": threshold, "amount_micros": amount, "max_per_day": per_day,
            "cooldown_s": cooldown, "threshold_runway_s": runway},
        st.booleans(), st.sampled_from((1_000_000, 5_000_000)), st.sampled_from((5_000_000, 10_000_000)),
        st.integers(1, 3), st.sampled_from((0, 3_600)), st.sampled_from((0, 7_200))) if auto_recharge else st.none())

    def build(amount_list, plan_pick, tier_pick, card, due, settings, prepaid, linked):
        step = {"type": "import", "amounts": amount_list, "card": card, "past_due": due, "recharge": settings,
                "prepaid": prepaid, "customer_linked": linked}
        if plan_pick is not None:
            step["plan_id"], step["plan_version"] = plan_pick
        if tier_pick is not None:
            step["tier"], step["max_concurrent"] = tier_pick
        return step

    return st.builds(build, import_amounts(now, serial), plan, tier, st.one_of(st.none(), st.booleans()), past_due,
                     recharge, st.sampled_from((None, None, None, True, False)), st.booleans())


def jump_strategy(pair: Pair) -> st.SearchStrategy:
    """How far the clock moves before the next step: not at all, seconds, hours, days, months,
    or onto an edge (a period end, an expiry, a dunning step, ±1 s)."""
    edges = next_boundaries(pair)
    return st.one_of(
        st.just(0), st.integers(1, 120), st.integers(60, 6 * HOUR_S), st.integers(HOUR_S, 10 * DAY_S),
        st.integers(10 * DAY_S, 70 * DAY_S),
        st.sampled_from(edges).map(lambda at: (at - pair.now + US - 1) // US) if edges else st.just(1))
