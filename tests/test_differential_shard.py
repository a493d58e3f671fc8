"""The shard with Postgres against the independent reference model (issue 17), smaller budget.

The same steps as tests/test_differential.py, but through a real ShardActor (its group
commit, tick dedupe, keyed replays, journal, snapshots and outbox) on a database of its own
in the test session's Postgres, with restarts that reload the org from what Postgres holds.
After every step, besides the org in the shard's memory, what Postgres holds must agree with
the model: the ledger's sum per kind (= the balance), the invoiced usage, and the outbox.

The shard runs in this process, on the test's clock: the model must know the instant of each
commit to the microsecond, and a shard on real time would commit a few ms later than asked.
No auto-recharge is configured: a shard's charger would settle charges on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from actors import shard_commit as shard_commit_module
from actors import shard_residency as shard_residency_module
from actors import shard_reads as shard_reads_module
from actors.commands import CreateOrg, fingerprint
from actors.org import Resources
from actors.shard import ShardActor
from actors.ticks import TICKS_ENCODER, Tick
from config.settings import Settings
from tests.differential import (CATALOG_PATH, DAY_S, START_US, US, Divergence, EngineOrg, ModelOrg, Pair,
                                compare, jump_strategy, step_strategy)

RUNNING: list = [None]  # the machine whose clock the shard reads

REFUSALS = {"idempotency_conflict": "conflict", "lease_ended": "lease_ended", "unknown_lease": "unknown_lease"}


def shard_result(kind: str, answer: dict) -> dict:
    """The shard's answer in the model's terms (tests/differential.py's EngineOrg does the same
    for `execute`'s outcomes)."""
    if kind == "import":  # billing-rules 2.11: refused whole, or what it changed
        return {"refused": True} if "error" in answer else {"changed": answer["changed"]}
    if "error" in answer:
        code = answer["error"]["code"]
        if kind == "set_enforcement":  # billing-rules 2.12: the model names the refusal's code
            return {"refused": code}
        return {"refused": REFUSALS.get(code, answer["error"]["message"])}
    if answer.get("replayed"):
        return {"replayed": True}
    if "entry" in answer:
        entry = answer["entry"]
        if kind == "stripe_refund":
            return {"clawed_micros": -entry["amount_micros"]}
        return {"entry": (entry["kind"], entry["amount_micros"], entry.get("grant_id"), entry.get("expires_at_us"))}
    if "lease" in answer:
        if "created" not in answer:
            return {"expires_at_us": answer["lease"].expires_at_us}
        granted = {"granted": True, "created": answer["created"], "expires_at_us": answer["lease"].expires_at_us}
        shadowed = answer.get("shadowed")  # a shadow org's (billing-rules 2.12): what it would get
        return granted if shadowed is None else {**granted, "would": shadowed["would_reason"]}
    if "denied" in answer:
        return {"denied": answer["denied"]["reason"]}
    if "released" in answer:
        return {"released": answer["released"]}
    if kind == "stripe_refund":
        return {"duplicate": True} if answer.get("stale") else {"clawed_micros": 0}
    if kind == "set_tier":
        return {"stale": bool(answer.get("stale"))}
    if kind == "dispute" and answer.get("stale"):
        return {"duplicate": True}
    if kind == "subscription" and answer.get("stale"):
        return {"stale": True}
    return {}


class ShardAgainstModel(RuleBasedStateMachine):
    database_url: str = ""

    @initialize(plan_id=st.sampled_from(("payg", "hobby_weekly", "free")), prepaid=st.booleans(),
                start_s=st.integers(0, 120 * DAY_S))
    def create(self, plan_id, prepaid, start_s):
        self.loop = asyncio.new_event_loop()
        self.now = START_US + start_s * US
        RUNNING[0] = self
        self.org_id = f"org_{uuid.uuid4().hex[:12]}"
        self.shard = self.run(self.start_shard())
        self.conn = self.run(asyncpg.connect(self.database_url))
        self.outbox_after = 0
        self.model = ModelOrg(plan_id, prepaid, self.now)
        self.model.ref.org_id = self.org_id
        answer = self.submit(CreateOrg("diff@example.test", plan_id, prepaid))
        assert answer.get("created") is True, answer
        # The step strategies read the pair: its engine side is this machine (`org` below).
        self.pair = Pair(engine=self, model=self.model, now=self.now)
        self.totals = {"by_kind": {}, "usage": (0, 0)}
        self.serial = 0
        self.check(0, {"type": "create", "plan_id": plan_id, "prepaid": prepaid}, {}, {})

    # ----- the shard, in this process ----------------------------------------------------

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def start_shard(self) -> ShardActor:
        settings = Settings(database_url=self.database_url, shards=1, catalog=CATALOG_PATH,
                            snapshot_every_entries=4, passivate_after_s=3_600, service_token="s" * 20,
                            admin_token="a" * 20, org_token_secret="o" * 32)
        shard = ShardActor(0, settings.model_dump_json())
        await shard.ready()  # claims shard 0 with a new epoch: a shard before it is fenced out
        return shard

    async def stop_shard(self) -> None:
        self.shard.loop_task.cancel()
        await asyncio.gather(self.shard.loop_task, return_exceptions=True)
        await self.shard.pool.close()

    def submit(self, command) -> dict:
        (answer,) = self.run(self.shard.submit([(self.org_id, command, fingerprint(command))]))
        return answer

    # ----- steps -------------------------------------------------------------------------

    @rule(data=st.data())
    def step(self, data):
        self.serial += 1
        self.pair.now = self.now
        self.now += data.draw(jump_strategy(self.pair), label="wait_s") * US
        self.pair.now = self.now
        step = data.draw(step_strategy(self.pair, self.serial, auto_recharge=False), label="step")
        step = self.pair.delivery(step)
        engine_result = self.apply(step)
        model_result = self.model.apply(self.now, step)
        self.check(self.serial, step, engine_result, model_result)

    @property
    def org(self):
        """The org in the shard's memory (after a restart, loaded from Postgres first)."""
        self.run(self.shard._ensure_loaded([self.org_id]))
        return self.shard.orgs[self.org_id].org

    def apply(self, step: dict) -> dict:
        kind = step["type"]
        if kind == "gate":
            (decision,) = self.run(self.shard.gate([(self.org_id, step["action"], Resources(**step["resources"]))]))
            if decision.get("would_reason") is not None:  # a shadow org's (billing-rules 2.12)
                return {"reason": decision["reason"], "would": decision["would_reason"]}
            return {"reason": decision["reason"]}
        if kind == "usage":
            ticks = [Tick(t["tick_id"], self.org_id, t["lease_id"], self.now, t["duration_ms"], t["memory_mb"],
                          t["cpu_count"], t["disk_mb"], t["units"], index) for index, t in enumerate(step["ticks"])]
            answer = self.run(self.shard.usage(TICKS_ENCODER.encode(ticks)))
            return {"accepted": answer["accepted"], "duplicates": answer["duplicates"],
                    "rejected": [r["tick_id"] for r in answer["rejected"]]}
        command = EngineOrg._command(step)
        answer = self.submit(command)
        return shard_result(kind, answer)

    @rule(drain=st.booleans())
    def restart(self, drain):
        """The shard process restarts (drained first, or as after kill -9): the org is rebuilt
        from its snapshot and journal in Postgres at its next command."""
        if drain:
            self.run(self.shard.drain())
        self.run(self.stop_shard())
        self.shard = self.run(self.start_shard())

    def check(self, step_no: int, step: dict, engine_result: dict, model_result: dict) -> None:
        """The answer, the org in memory and the outbox, entry by entry; the ledger by its sums
        per kind (usage rows are updated in place, one per minute)."""
        model_fx = self.model.ref.take_effects()
        for kind, amount, _, _, invoiced in model_fx["ledger"]:
            if kind == "usage":
                used, billed = self.totals["usage"]
                self.totals["usage"] = (used + amount, billed + invoiced)
            else:
                held, _ = self.totals["by_kind"].get(kind, (0, 0))
                self.totals["by_kind"][kind] = (held + amount, 0)
        nothing = {"ledger": [], "charges": [], "periods": []}
        if step["type"] == "gate":
            compare(step_no, step, engine_result, model_result, nothing | {"events": []},
                    nothing | {"events": model_fx["events"]}, {}, {})
            return
        engine = EngineOrg.__new__(EngineOrg)
        engine.org, engine.last_now = self.org, self.now
        compare(step_no, step, engine_result, model_result, nothing | {"events": self.run(self.outbox())},
                nothing | {"events": model_fx["events"]}, engine.observe(), self.model.ref.observe())
        self.check_ledger(step_no, step)

    async def outbox(self) -> list:
        """What the commits since the last check put in the outbox, in the model's terms."""
        rows = await self.conn.fetch("SELECT id, type, payload FROM outbox WHERE org_id = $1 AND id > $2 ORDER BY id",
                                     self.org_id, self.outbox_after)
        if rows:
            self.outbox_after = rows[-1]["id"]
        events = []
        for row in rows:
            payload = json.loads(row["payload"])
            assert payload.pop("org_id") == self.org_id
            events.append((row["type"], payload))
        return events

    def check_ledger(self, step_no: int, step: dict) -> None:
        sums = self.run(self.conn.fetch(
            "SELECT kind, sum(amount_micros)::int8 AS amount, sum(invoiced_micros)::int8 AS invoiced,"
            " count(*) AS n FROM ledger WHERE org_id = $1 GROUP BY kind", self.org_id))
        in_postgres = {r["kind"]: (r["amount"], r["invoiced"]) for r in sums if r["kind"] != "usage"}
        usage = next(((r["amount"], r["invoiced"]) for r in sums if r["kind"] == "usage"), (0, 0))
        if in_postgres != self.totals["by_kind"] or usage != self.totals["usage"]:
            raise Divergence(f"step {step_no} {step}: ledger in Postgres {in_postgres} usage {usage},"
                             f" model {self.totals}")
        balance = sum(a for a, _ in in_postgres.values()) + usage[0]
        if balance != self.model.ref.observe()["balance_micros"]:
            raise Divergence(f"step {step_no}: SUM(ledger) {balance} != the model's balance")

    def teardown(self):
        if hasattr(self, "shard"):
            self.run(self.stop_shard())
            self.run(self.conn.close())
        if hasattr(self, "loop"):
            self.loop.close()


def test_the_shard_with_postgres_equals_the_reference_model(shard_database, monkeypatch):
    monkeypatch.setattr(ShardAgainstModel, "database_url", shard_database)
    monkeypatch.setattr(shard_commit_module, "now_us", lambda: RUNNING[0].now)
    monkeypatch.setattr(shard_residency_module, "now_us", lambda: RUNNING[0].now)
    monkeypatch.setattr(shard_reads_module, "now_us", lambda: RUNNING[0].now)  # gate reads are as of now
    run_state_machine_as_test(ShardAgainstModel, settings=settings(
        max_examples=int(os.environ.get("METERGATE_DIFF_SHARD_EXAMPLES", "15")), stateful_step_count=30,
        deadline=None, database=None, suppress_health_check=list(HealthCheck)))


def test_a_resent_tick_alone_after_a_period_end_still_applies_time(shard_database, monkeypatch):
    """Found by the random run above (seed 24816230100996775765538573231541096318): a usage
    request whose only tick was a resend reached no org command in the shard, so a period that
    had ended meanwhile stayed open in memory while the model (billing-rules 1.1: every command
    first applies time) began the next. The same two steps, on a fixed path."""
    monkeypatch.setattr(ShardAgainstModel, "database_url", shard_database)
    monkeypatch.setattr(shard_commit_module, "now_us", lambda: RUNNING[0].now)
    monkeypatch.setattr(shard_residency_module, "now_us", lambda: RUNNING[0].now)
    monkeypatch.setattr(shard_reads_module, "now_us", lambda: RUNNING[0].now)
    machine = ShardAgainstModel()
    try:
        machine.create(plan_id="payg", prepaid=False, start_s=0)
        tick = {"tick_id": "t_repeat", "lease_id": "ls_a", "duration_ms": 1, "memory_mb": 0, "cpu_count": 0,
                "disk_mb": 0, "units": None}
        periods = []
        for serial, wait_s in enumerate((60, 57 * DAY_S), 1):
            machine.now += wait_s * US
            step = {"type": "usage", "ticks": [tick]}
            machine.check(serial, step, machine.apply(step), machine.model.apply(machine.now, step))
            periods.append(machine.org.period_key)
        assert periods[0] != periods[1], periods  # the path crosses a period end
    finally:
        machine.teardown()
