"""One batch of a shard's commit loop applied in memory (actors/shard.py): the orgs it holds
(LoadedOrg), the items it queues, how each command and usage request is applied and answered,
and the rows its commit must write. Also the shard's refusals, as the edge maps them."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from actors import commands as cmd
from actors import imports
from actors.enforcement import SHADOW_FOREVER_US
from actors.metering import cost_scaled
from actors.org import BillingError, Effects, OrgBillingActor
from actors.placement import slot_of
from actors.refusals import Refusal
from actors.metering import UnknownUnit
from actors.ticks import Tick
from actors.timeutil import minute_us
from actors.usage import bill_ticks
from metergate_client.decision import NO_RESOURCES, decide
from storage import journal as store
from storage.times import dt_to_us

if TYPE_CHECKING:
    from actors.shard import ShardActor

ENCODER = msgspec.msgpack.Encoder()
RECENT_KEYS_MAX = 10_000


def error(code: Refusal, message: str) -> dict:
    """A refusal as the shard answers it. What it means in HTTP is decided at the edge
    (serve_app/errors.py)."""
    return {"error": {"code": Refusal(code), "message": message}}


def unknown_org(org_id: str, unreadable: str | None = None) -> dict:
    """The refusal for an org the shard could not load: none exists, or (`unreadable`: why)
    its stored rows cannot be read (an operator's matter: `metergate check` names it)."""
    if unreadable is not None:
        return error(Refusal.ORG_UNREADABLE, f"org {org_id}'s stored state cannot be read; it has been logged")
    return error(Refusal.UNKNOWN_ORG, f"org {org_id} does not exist")


WRONG_SHARD = error(Refusal.WRONG_SHARD, "this org is not on the shard the request reached; retry")
UNAVAILABLE = error(Refusal.SHARD_UNAVAILABLE, "the billing database is unavailable; retry the request")
UNSTORABLE = error(Refusal.UNSTORABLE_INPUT,
                   "a value in this request cannot be stored; correct it, retrying will not help")


class LoadedOrg:
    """An org in memory plus what the shell needs: its journal position and last use."""

    __slots__ = ("org", "seq", "tail", "touched_s", "due_us", "leases")

    def __init__(self, org: OrgBillingActor, seq: int, tail: int, touched_s: int) -> None:
        self.org = org
        self.seq = seq
        self.tail = tail
        self.touched_s = touched_s
        self.due_us = 0  # the wake-up time last written to org_due (0: none since loading)
        self.leases = 0  # leases held as of the last commit, in the shard's totals (_count_in)


@dataclass
class CommandItem:
    org_id: str
    command: object
    future: asyncio.Future
    request_hash: str | None = None


@dataclass
class UsageItem:
    ticks: list[Tick]
    future: asyncio.Future
    accepted: int = 0
    duplicates: int = 0
    rejected: list = field(default_factory=list)
    keys: list = field(default_factory=list)  # per tick: its dedupe key, None if rejected


def leases_held(org: OrgBillingActor) -> int:
    return sum(lease.quantity for lease in org.leases.values()) if org.leases else 0


class BatchWork:
    """Applies one batch in memory and gathers what its commit must write."""

    def __init__(self, shard: ShardActor, now: int) -> None:
        self.shard = shard
        self.now = now
        self.now_s = int(time.monotonic())
        self.fx = Effects()
        self.out = store.CommitBatch()
        self.journal: dict[str, list[cmd.JournalItem]] = {}
        self.created: set[str] = set()
        self.batch_keys: dict[tuple[str, str], tuple[str, dict]] = {}
        self.entry_meta: dict[int, tuple[str, str | None, str | None]] = {}
        self.freed: dict[bytes, UsageItem] = {}  # tick ids claimed then rejected (a unit not priced), by request

    def _record(self, org_id: str, command) -> None:
        if org_id not in self.created:
            self.journal.setdefault(org_id, []).append(cmd.JournalItem(self.now, command))
        self.shard.orgs[org_id].touched_s = self.now_s

    def apply_usage(self, item: UsageItem, tick_keys: dict, seen_before: set) -> None:
        per_org: dict[str, list[Tick]] = {}
        key_of: dict[int, bytes] = {}
        for tick, key in zip(item.ticks, item.keys):
            if key is None:
                continue  # rejected before the commit
            holder = tick_keys[key]
            if holder is None and self.freed.get(key) is not item and key not in seen_before:
                # An earlier request of this batch sent this id with a unit its plan does not
                # price: rejected and not remembered, so this one is the first (billing-rules 6.6).
                tick_keys[key] = holder = tick
                self.freed.pop(key)
            if holder is not tick or key in seen_before:
                item.duplicates += 1  # seen before, or twice in this batch
                if tick.org_id in self.shard.orgs:  # still a command to the org: time is applied (billing-rules 1.1)
                    per_org.setdefault(tick.org_id, [])
                continue
            per_org.setdefault(tick.org_id, []).append(tick)
            key_of[id(tick)] = key
        rollups = self.out.rollups
        for org_id, ticks in per_org.items():
            billed = bill_ticks(self.shard.orgs[org_id].org, ticks, self.shard.catalog, self.now, self.fx)
            for command in billed.commands:
                self._record(org_id, command)
            if billed.commands:
                self.shard._unanswered(org_id, item.future)  # state reads wait for this commit too
            for tick in billed.unpriced:  # not billed, so not remembered: a fixed resend is billed
                unknown = next(u for u in tick.units if u not in self.shard.orgs[org_id].org.plan.unit_nanos)
                item.rejected.append({"index": tick.index, "tick_id": tick.tick_id, "org_id": tick.org_id,
                                      "error": f"{Refusal.UNKNOWN_UNIT}: {unknown}"})
                tick_keys[key_of[id(tick)]] = None
                self.freed[key_of[id(tick)]] = item
            plan = self.shard.orgs[org_id].org.plan  # what these ticks were billed on
            for tick in billed.ticks:
                usage = tick.usage()
                rollup_key = (tick.org_id, minute_us(tick.started_at_us), tick.lease_id)
                held = rollups.get(rollup_key)
                if held is None:
                    rollups[rollup_key] = [usage, cost_scaled(plan, usage)]
                else:
                    held[0].add(usage)
                    held[1] += cost_scaled(plan, usage)
            item.accepted += len(billed.ticks)

    def apply_command(self, item: CommandItem, keyed: dict) -> dict:
        shard = self.shard
        command = item.command
        if not shard.owns(item.org_id):
            return WRONG_SHARD
        loaded = shard.orgs.get(item.org_id)
        if loaded is None and item.org_id in shard.unreadable:  # it exists: never created again
            return unknown_org(item.org_id, shard.unreadable[item.org_id])
        if isinstance(command, cmd.PreviewImport):
            return self._preview_import(item, loaded)
        if isinstance(command, cmd.CreateOrg) or (isinstance(command, cmd.ImportOrg) and loaded is None):
            return self._create(item, loaded)
        if loaded is None:
            return unknown_org(item.org_id, shard.unreadable.get(item.org_id))
        if not cmd.well_typed(command):
            return error(Refusal.INVALID_COMMAND, f"{type(command).__name__} has a field of the wrong type")
        if isinstance(command, cmd.KEYED) and command.idempotency_key:
            replay = self._keyed_replay(item, keyed)
            if replay is not None:
                return replay
        if isinstance(command, cmd.ImportOrg) and imports.changes_nothing(loaded.org, command, shard.catalog, self.now):
            return answer(cmd.Imported(loaded.org, False, []), loaded.org, self.now)  # a re-run: nothing to write
        first_entry = len(self.fx.ledger)
        refusal = None
        try:
            outcome = cmd.execute(loaded.org, command, shard.catalog, self.now, self.fx)
        except BillingError as exc:
            refusal = error(exc.code, str(exc))
        except UnknownUnit as exc:
            refusal = error(Refusal.UNKNOWN_UNIT, str(exc))
        # Journaled even when refused: its time effects were applied, and replay refuses it alike.
        self._record(item.org_id, command)
        shard._unanswered(item.org_id, item.future)
        if refusal is not None:
            return refusal
        result = answer(outcome, loaded.org, self.now)
        if isinstance(outcome, cmd.Booked):
            assert isinstance(command, cmd.KEYED), command
            # The command's own entry is the first of its kind that it appended: time effects
            # (expirations) may come before it, and a grant that lapses at once after it.
            own = next(i for i in range(first_entry, len(self.fx.ledger)) if self.fx.ledger[i][1].kind == command.kind)
            entry_id = "le_" + uuid.uuid4().hex[:24]
            result["entry"]["entry_id"] = entry_id
            self.entry_meta[own] = (entry_id, command.idempotency_key, item.request_hash)
            if command.idempotency_key:
                self.batch_keys[(item.org_id, command.idempotency_key)] = (item.request_hash, result)
        return result

    def _keyed_replay(self, item: CommandItem, keyed: dict) -> dict | None:
        key = (item.org_id, item.command.idempotency_key)
        seen = self.batch_keys.get(key) or self.shard.recent_keys.get(key)
        if seen is None and key in keyed:
            row = keyed[key]
            seen = (row["request_hash"], {"entry": _entry_from_row(row), "balance_micros": None})
        if seen is None:
            return None
        request_hash, first = seen
        # A `stripe:` key names a Stripe object, which never changes: another shape of the same
        # event (or the hash of an older version's command) is the same payment. A key the
        # core stamped itself (a refund applied when its payment's credit came) has no hash.
        immutable = item.command.idempotency_key.startswith("stripe:") or request_hash is None
        # (formats) a hash a release before canonical fingerprints stored: the same command still matches.
        same = request_hash in (item.request_hash, cmd.legacy_fingerprint(item.command))
        if not same and not immutable:
            return error(Refusal.IDEMPOTENCY_CONFLICT, "this Idempotency-Key was used with a different request")
        replay = dict(first)
        replay["balance_micros"] = self.shard.orgs[item.org_id].org.balance_micros
        replay["replayed"] = True
        return replay

    def _create(self, item: CommandItem, loaded: LoadedOrg | None) -> dict:
        org_id, command = item.org_id, item.command
        org = loaded.org if loaded is not None else None
        if isinstance(command, cmd.ImportOrg) and not cmd.well_typed(command):  # its snapshot would not load
            return error(Refusal.INVALID_COMMAND, "ImportOrg has a field of the wrong type")
        try:
            outcome = cmd.execute(org, command, self.shard.catalog, self.now, self.fx, org_id=org_id)
        except BillingError as exc:
            return error(exc.code, str(exc))
        if outcome.created:  # its first snapshot is written by finish(); it is never journaled
            self.shard.orgs[org_id] = LoadedOrg(outcome.org, 0, 0, self.now_s)
            self.created.add(org_id)
            self.shard._unanswered(org_id, item.future)
            self.out.new_orgs.append((org_id, command.email, "prepaid" if outcome.org.prepaid else "postpaid",
                                      slot_of(org_id), store.us_to_dt(self.now)))
        return answer(outcome, outcome.org, self.now)

    def _preview_import(self, item: CommandItem, loaded: LoadedOrg | None) -> dict:
        """What an import would change (`--dry-run`): the same core run on a copy of the org (or
        on no org), its effects thrown away; nothing is journaled, written or kept."""
        command = item.command.command
        if loaded is None and item.org_id in self.shard.unreadable:
            return unknown_org(item.org_id, self.shard.unreadable[item.org_id])
        if not cmd.well_typed(command):
            return error(Refusal.INVALID_COMMAND, f"{type(command).__name__} has a field of the wrong type")
        org = loaded.org._advanced_copy(self.now) if loaded is not None else None
        try:
            outcome = cmd.execute(org, command, self.shard.catalog, self.now, Effects(), org_id=item.org_id)
        except BillingError as exc:
            return error(exc.code, str(exc))
        return answer(outcome, outcome.org, self.now)

    def finish(self) -> store.CommitBatch:
        """Turn the batch's effects into rows: journal or snapshot per org, ledger, outbox."""
        out = self.out
        out.unclaimed_ticks = list(self.freed)  # claimed in this commit, then rejected: given back
        shard = self.shard
        every = shard.settings.snapshot_every_entries
        self.new_positions: dict[str, tuple[int, int]] = {}
        self.new_due: dict[str, int] = {}
        for org_id in self.created:
            lo = shard.orgs[org_id]
            out.snapshots.append((org_id, 1, ENCODER.encode(lo.org.to_snapshot())))
            self.new_positions[org_id] = (1, 0)
        for org_id, items in self.journal.items():
            lo = shard.orgs[org_id]
            seq = lo.seq + 1
            if lo.tail + 1 >= every:
                out.snapshots.append((org_id, seq, ENCODER.encode(lo.org.to_snapshot())))
                out.compact.append((org_id, seq))
                self.new_positions[org_id] = (seq, 0)
            else:
                out.journal.append((org_id, seq, cmd.JOURNAL_ENCODER.encode(items)))
                self.new_positions[org_id] = (seq, lo.tail + 1)
        for rollup_key, (usage, cost) in list(out.rollups.items()):
            units = msgspec.json.encode(usage.units).decode() if usage.units else None
            out.rollups[rollup_key] = (usage.memory_mb_ms, usage.cpu_ms, usage.disk_mb_ms, usage.ticks,
                                       cost, units, usage.duration_ms)
        for index, (org_id, entry) in enumerate(self.fx.ledger):
            if entry.kind == "usage":
                debit = out.usage_debits.setdefault((org_id, minute_us(entry.at_us)), [0, entry.at_us, 0])
                debit[0] += entry.amount_micros
                debit[2] += entry.invoiced_micros
                continue
            entry_id, key, request_hash = self.entry_meta.get(index) or (
                "le_" + uuid.uuid4().hex[:24], entry.idempotency_key, None)
            out.ledger.append((entry_id, org_id, entry.kind, entry.amount_micros, entry.grant_id,
                               store.us_to_dt(entry.expires_at_us) if entry.expires_at_us else None,
                               entry.note, key, request_hash, store.us_to_dt(entry.at_us), entry.paid_micros))
        for org_id in set(self.journal) | self.created:
            # Wake-up times only move earlier in org_due, or once the written one has passed:
            # a heartbeat that pushes a lease's expiry later costs no write.
            lo = shard.orgs[org_id]
            due = lo.org.next_due_us()
            if lo.due_us == 0 or due < lo.due_us or lo.due_us <= self.now:
                out.due.append((org_id, store.us_to_dt(due)))
                self.new_due[org_id] = due
        for period in self.fx.periods:
            out.periods.append((period.org_id, period.period_key, store.us_to_dt(period.start_us),
                                store.us_to_dt(period.end_us), period.usage_micros, period.quota_used_micros,
                                period.plan_id, period.plan_version))
        for event in self.fx.events:
            payload = {"org_id": event.org_id, **event.data}
            out.events.append((event.org_id, event.type, msgspec.json.encode(payload).decode(),
                               store.us_to_dt(event.at_us)))
        return out

    def after_commit(self, event_ids: list[int]) -> None:
        for org_id, (seq, tail) in self.new_positions.items():
            lo = self.shard.orgs.get(org_id)
            if lo is not None:
                self.shard._count_out(lo)
                lo.seq, lo.tail = seq, tail
                self.shard._count_in(lo)
        for org_id, due in self.new_due.items():
            lo = self.shard.orgs.get(org_id)
            if lo is not None:
                lo.due_us = due
        recent = self.shard.recent_keys
        recent.update(self.batch_keys)
        while len(recent) > RECENT_KEYS_MAX:
            recent.pop(next(iter(recent)))


def _standing(org: OrgBillingActor, now_us: int, gated: bool) -> dict:
    """What a lease answer's capability token may say: the org's tier and plan, and whether it
    may be signed at all. A new lease passed the gate (`gated`); a renewal or the same lease
    again did not, so its token is signed only while the org is neither suspended, nor halted,
    nor out of money (the checks of `ingest`, which holds no slot: the lease holds its own).
    `shadow`: the org is in shadow now (billing-rules 2.12): its token is a short one, which
    a cutover does not leave in force (serve_app/captokens.py)."""
    may = gated or decide("ingest", NO_RESOURCES, org.view_as_of(now_us)[0]).allowed
    return {"tier": org.tier, "plan": org.plan.id, "token_ok": may, "shadow": org.in_shadow(now_us)}


def answer(outcome: cmd.Outcome, org: OrgBillingActor, now_us: int) -> dict:
    """A command's reply, from its typed outcome. Built at once, from copies: later commands
    of the batch may change the org before the reply is sent."""
    match outcome:
        case cmd.Applied():
            return {"state": org.state(now_us)}
        case cmd.Stale():
            return {"state": org.state(now_us), "stale": True}
        case cmd.OrgCreated(created=created):
            return {"created": created, "state": org.state(now_us)}
        case cmd.Debited(micros=micros):
            return {"debited_micros": micros}
        case cmd.LeaseGranted(lease=lease, created=created, shadowed=shadowed):  # tier, plan, standing: for its token
            granted = {"lease": msgspec.structs.replace(lease), "created": created, **_standing(org, now_us, created)}
            return granted if shadowed is None else {**granted, "shadowed": msgspec.to_builtins(shadowed)}
        case cmd.LeaseRenewed(lease=lease):
            return {"lease": msgspec.structs.replace(lease), **_standing(org, now_us, False)}
        case cmd.LeaseDenied(decision=decision):
            return {"denied": msgspec.to_builtins(decision)}
        case cmd.Released(released=released):
            return {"released": released}
        case cmd.Booked(entry=entry, balance_micros=balance):
            return {"entry": msgspec.to_builtins(entry), "balance_micros": balance}
        case cmd.Imported(created=created, changed=changed):
            return {"created": created, "changed": list(changed), "balance_micros": org.balance_micros,
                    "waits_for_customer": imports.waits_for_customer(org), "enforcement": org.enforcement(now_us),
                    "cutover_us": None if org.shadow_until_us == SHADOW_FOREVER_US else org.shadow_until_us}
        case _:
            raise AssertionError(f"unknown outcome {outcome!r}")


def _entry_from_row(row) -> dict:
    entry = {"entry_id": row["entry_id"], "kind": row["kind"], "amount_micros": row["amount_micros"],
             "at_us": dt_to_us(row["created_at"])}
    for name in ("grant_id", "note"):
        if row[name] is not None:
            entry[name] = row[name]
    if row["expires_at"] is not None:
        entry["expires_at_us"] = dt_to_us(row["expires_at"])
    return entry
