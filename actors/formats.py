"""Saved formats: the bytes of org snapshots and journal rows, their versions, and how every
older version is read (docs/operations/formats.md).

A saved row is a msgpack array. From format 2 on, its first element is the format version, an
integer: `[2, org_id, email, ...]` for a snapshot (OrgSnapshot, a struct tagged 2) and
`[2, [item, ...]]` for a journal row (JournalEntry). Format 1 is what the code before this
module wrote, with no version: a snapshot starts with its org id (a string), a journal row
with its first item (an array) or is empty. No format 1 row can start with an integer, so
`saved_version` tells the versions apart from the bytes alone, before choosing a layout.

Reading: each version has its own layout (a struct that is never edited again once another
version follows it) and an upcaster to the next version; a row is decoded in the layout of its
version and upcast step by step to the current one. Writing is always the current version.
A row of a version newer than the code (a rolling upgrade reading a newer release's rows) is
refused, never guessed at.

  snapshot 1 -> 2: the dunning state held whole `Plan`s (free and prior plan); format 2 holds
                   their ids and versions (SavedDunning) and the terms of every plan the org
                   names (`plans`, PlanTerms), so a version removed from the catalog still loads.
  journal  1 -> 2: the items are unchanged; only the envelope is new.

The rule for a saved struct (every struct reachable from OrgSnapshot and JournalEntry, checked
against tests/formats/schema.lock.json by tests/test_formats.py): a field is only ever
appended, with a default. Removing, renaming, reordering or retyping a field, or adding one
without a default, needs a new format version: a frozen copy of the old layout here, an
upcaster, and a corpus of the old bytes (tests/formats/generate.py).

`load_org` is what a shard calls per org: it turns any failure to read or replay one org's rows
into UnreadableOrg for that org, so one bad row never fails a whole multi-org load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from actors.commands import JOURNAL_DECODER, JOURNAL_ENCODER, JOURNAL_VERSION, JournalItem, replay, saved_version
from actors.leases import Lease
from actors.money import Grant
from actors.org import SNAPSHOT_VERSION, OrgBillingActor, OrgSnapshot, PlanTerms
from actors.periods import DunningStep, SavedDunning
from actors.recharge import AutoRecharge
from actors.refunds import DisputeRecord, RefundRecord
from actors.subscriptions import SubscriptionRecord
from config.catalog import Catalog
from metergate_client.decision import HaltCause

__all__ = ["JOURNAL_VERSION", "SNAPSHOT_VERSION", "UnreadableOrg", "decode_journal", "decode_snapshot",
           "encode_journal", "encode_snapshot", "load_org", "saved_version"]


class UnreadableOrg(Exception):
    """One org's saved rows cannot be read or replayed by this code: that org stays unloaded,
    the others of the same load go on. `reason` says which row and why."""

    def __init__(self, org_id: str, reason: str) -> None:
        super().__init__(org_id, reason)  # both in args: it crosses Ray (pickled) as it is
        self.org_id = org_id
        self.reason = reason

    def __str__(self) -> str:
        return f"org {self.org_id}: {self.reason}"


# ----- format 1: the layouts as the code before this module wrote them (never edit) ---------


class PlanV1(msgspec.Struct, frozen=True):
    """config.catalog.Plan as format 1 embedded it in the dunning state (a msgpack map)."""

    id: str
    version: int
    effective_from_us: int
    effective_until_us: int | None
    period: str
    included_micros: int
    overage: bool
    memory_nanos_per_gib_s: int
    cpu_nanos_per_vcpu_s: int
    disk_nanos_per_gib_s: int
    unit_nanos: dict[str, int]


class DunningV1(msgspec.Struct, array_like=True):
    since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan: PlanV1
    step: DunningStep = DunningStep.NONE
    prior_plan: PlanV1 | None = None
    invoice_ids: list[str] | None = None
    invoice_subscriptions: dict[str, str] | None = None


class OrgSnapshotV1(msgspec.Struct, array_like=True):
    """OrgSnapshot of format 1. Its nested records (Grant, Lease, ...) are today's: they only
    ever gain fields at their end, with defaults, so they read their format 1 bytes."""

    org_id: str
    email: str
    prepaid: bool
    plan_id: str
    plan_version: int
    tier: str
    max_concurrent: int
    max_disk_mb: int
    machine_quotas: dict[str, dict[str, int]] | None
    grants: list[Grant] | None
    debt_micros: int
    remainder_scaled: int
    period_key: str
    period_start_us: int
    period_end_us: int
    period_usage_micros: int
    quota_used_micros: int
    thresholds_fired: int
    halted: HaltCause | None
    suspended: bool
    past_due_since_us: int | None
    leases: list[Lease] | None
    has_payment_method: bool
    created_us: int
    grant_seq: int
    tier_as_of_us: int = 0
    recharge: AutoRecharge | None = None
    dunning: DunningV1 | None = None
    paid_invoice: bool = False
    invoice_as_of_us: int = 0
    period_anchor_us: int = 0
    paid_credit: bool = False
    period_cycle_start_us: int = 0
    period_cycle_us: int = -1
    refunds: list[RefundRecord] | None = None
    ended_leases: dict[str, int] | None = None
    low_balance_micros: int = 0
    low_balance_armed: bool = True
    disputes: list[DisputeRecord] | None = None
    subscriptions: list[SubscriptionRecord] | None = None
    settled_invoices: list[str] | None = None
    lapsed: dict[str, int] | None = None


def _terms_v1(plan: PlanV1) -> PlanTerms:
    return PlanTerms(**{name: getattr(plan, name) for name in PlanV1.__struct_fields__})


def _snapshot_v1_to_v2(old: OrgSnapshotV1) -> OrgSnapshot:
    """The dunning state's whole plans become ids and versions, their terms kept in `plans`.
    The org's own plan was stored by id already: format 1 kept no terms of it."""
    fields = {name: getattr(old, name) for name in OrgSnapshotV1.__struct_fields__ if name != "dunning"}
    dunning, terms = old.dunning, None
    saved = None
    if dunning is not None:
        prior = dunning.prior_plan
        saved = SavedDunning(
            dunning.since_us, dunning.suspend_after_s, dunning.degrade_after_s, dunning.downgrade_after_s,
            dunning.free_plan.id, dunning.free_plan.version, dunning.step, None if prior is None else prior.id,
            0 if prior is None else prior.version, dunning.invoice_ids, dunning.invoice_subscriptions)
        embedded = [dunning.free_plan] + ([prior] if prior is not None else [])
        terms = list({(plan.id, plan.version): _terms_v1(plan) for plan in embedded}.values())
    return OrgSnapshot(**fields, dunning=saved, plans=terms)


# ----- reading and writing ----------------------------------------------------------------

# version -> (decode the bytes in that version's layout, upcast the result to the current one)
_SNAPSHOT_READERS: dict[int, tuple[Callable[[bytes], object], Callable[[object], OrgSnapshot]]] = {
    1: (msgspec.msgpack.Decoder(OrgSnapshotV1).decode, _snapshot_v1_to_v2),
    SNAPSHOT_VERSION: (msgspec.msgpack.Decoder(OrgSnapshot).decode, lambda snap: snap),
}
_ENCODER = msgspec.msgpack.Encoder()
assert sorted(_SNAPSHOT_READERS) == list(range(1, SNAPSHOT_VERSION + 1)), "every version has a reader"
# One format version for both kinds of row: a release that needs a new layout of either bumps
# both (the other's upcaster is the identity, as the journal's 1 -> 2), so a corpus directory
# tests/formats/v<N>/ is one release's bytes.
assert SNAPSHOT_VERSION == JOURNAL_VERSION, (SNAPSHOT_VERSION, JOURNAL_VERSION)


def decode_snapshot(data: bytes) -> OrgSnapshot:
    """A snapshot row of any version, as the current OrgSnapshot. DecodeError if it does not
    decode, or is of a version newer than this code."""
    version = saved_version(data)
    reader = _SNAPSHOT_READERS.get(version)
    if reader is None:
        raise msgspec.DecodeError(f"a snapshot of format {version}: this code reads 1 to {SNAPSHOT_VERSION}")
    decode, upcast = reader
    return upcast(decode(data))


def encode_snapshot(snap: OrgSnapshot) -> bytes:
    return _ENCODER.encode(snap)


def decode_journal(data: bytes) -> list[JournalItem]:
    """A journal row of any version (format 1 and 2 items are the same), its items."""
    return JOURNAL_DECODER.decode(data)


def encode_journal(items: list[JournalItem]) -> bytes:
    return JOURNAL_ENCODER.encode(items)


def load_org(org_id: str, state: bytes, entries: Sequence[bytes], catalog: Catalog) -> OrgBillingActor:
    """The org `org_id` from its snapshot row and journal tail as Postgres holds them (any
    format version), its invariants checked. UnreadableOrg, naming the row and the cause, when
    anything of it fails: a row that does not decode, a format newer than this code, a plan
    without terms, an invariant, a replay that raises. The catch is wide on purpose: this is
    the boundary that keeps one org's bad rows from failing the load of every other org."""
    try:
        snap = decode_snapshot(state)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise UnreadableOrg(org_id, f"snapshot does not decode: {exc}") from exc
    if snap.org_id != org_id:
        raise UnreadableOrg(org_id, f"snapshot is of org {snap.org_id!r}")
    try:
        org = OrgBillingActor.from_snapshot(snap, catalog)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableOrg(org_id, f"snapshot does not load: {type(exc).__name__}: {exc}") from exc
    for number, entry in enumerate(entries, 1):
        try:
            items = decode_journal(entry)
        except Exception as exc:  # noqa: BLE001
            raise UnreadableOrg(org_id, f"journal entry {number} of {len(entries)} does not decode: {exc}") from exc
        try:
            replay(org, items, catalog)
        except Exception as exc:  # noqa: BLE001
            raise UnreadableOrg(org_id, f"journal entry {number} of {len(entries)} does not replay: "
                                        f"{type(exc).__name__}: {exc}") from exc
    try:
        org.check_invariants()
    except AssertionError as exc:
        raise UnreadableOrg(org_id, f"replayed org fails an invariant: {exc}") from exc
    return org
