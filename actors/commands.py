"""Commands to an org: what the journal stores and what replay re-applies.

`execute` is the single dispatcher for creation, the live path and recovery: a command and
the time it was applied at give the same state change every time, and a typed outcome. An
outcome is a fact (a lease granted, an entry booked), never a view: replay builds none, and
the shell shapes the answer from it. Catalog look-ups (plan version, tier cap) are resolved
before a command is built, so replay never depends on a catalog that changed later.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import msgspec

from actors import imports
from actors.effects import Effects
from metergate_client.decision import Decision, Resources
from actors.leases import Lease
from actors.metering import LeaseUsage
from actors.money import LedgerEntry
from actors.org import OrgBillingActor
from actors.refusals import BillingError, UnknownPlan
from config.catalog import Catalog


class CreateOrg(msgspec.Struct, tag="create", array_like=True):
    """Never journaled: a new org is written as its first snapshot, in the same commit."""

    email: str
    plan_id: str
    prepaid: bool
    shadow: bool = False  # created in shadow (billing-rules 2.12)


class AcquireLease(msgspec.Struct, tag="acq", array_like=True):
    lease_id: str
    resources: Resources
    ttl_s: int


class RenewLease(msgspec.Struct, tag="renew", array_like=True):
    lease_id: str


class ReleaseLease(msgspec.Struct, tag="rel", array_like=True):
    lease_id: str


class ApplyUsage(msgspec.Struct, tag="use", array_like=True):
    usages: list[LeaseUsage]


class Credit(msgspec.Struct, tag="credit", array_like=True):
    kind: str
    amount_micros: int  # > 0 adds credit; < 0 takes it back (an operator's refund, negative adjustment)
    expires_at_us: int | None = None
    note: str | None = None
    idempotency_key: str | None = None
    payment_id: str | None = None  # the Stripe payment that paid for this credit
    paid_micros: int | None = None  # what that payment was, tax included: its refunds take their share (3.0)


class RefundPayment(msgspec.Struct, tag="refund", array_like=True):
    """A Stripe refund of a payment: claws back only what that payment bought (billing-rules 3)."""

    kind: ClassVar[str] = "refund"
    refund_id: str
    payment_id: str
    amount_micros: int
    note: str | None = None
    idempotency_key: str | None = None
    grant_id: str | None = None  # the grant the payment's ledger entry names (credits made before grants kept it)
    credited_micros: int = 0  # the payment's credit and what was paid for it, from its ledger entry:
    paid_micros: int | None = None  # the refund (money paid) takes its share of the credit (billing-rules 3.0)


class ReverseRefund(msgspec.Struct, tag="refund_rev", array_like=True):
    """A Stripe refund that failed or was canceled: what it clawed back is restored (billing-rules 3.5)."""

    kind: ClassVar[str] = "refund_reversal"
    refund_id: str
    payment_id: str
    idempotency_key: str | None = None


class DisputeFunds(msgspec.Struct, tag="dispute", array_like=True):
    """A dispute's money (billing-rules 3.6): withdrawn (`charge.dispute.funds_withdrawn`) takes
    back what the disputed payment bought; reinstated gives back what its withdrawal took.
    `credited_micros`: what the payment's credit was (0: it bought no credit), from its ledger
    entry; `grant_id`: the grant that credit made."""

    dispute_id: str
    payment_id: str
    amount_micros: int
    withdrawn: bool
    credited_micros: int = 0
    grant_id: str | None = None
    note: str | None = None
    idempotency_key: str | None = None
    lapsed_micros: int = 0  # what of that credit lapsed unused (its grant's expiration entries)
    paid_micros: int | None = None  # what the payment was, tax included: the dispute takes its share (3.0)

    @property
    def kind(self) -> str:
        return "dispute" if self.withdrawn else "dispute_reversal"


class SubscriptionChanged(msgspec.Struct, tag="sub", array_like=True):
    """A Stripe subscription as of `as_of_us` (billing-rules 7.6): its status, the tier its
    price or metadata names, its current period. `base_*`: the tier without a subscription."""

    subscription_id: str
    status: str
    tier: str | None
    max_concurrent: int
    as_of_us: int
    base_tier: str
    base_max_concurrent: int
    anchor_us: int | None = None
    end_us: int | None = None


class Halt(msgspec.Struct, tag="halt", array_like=True):
    pass


class Resume(msgspec.Struct, tag="resume", array_like=True):
    pass


class SetPlan(msgspec.Struct, tag="plan", array_like=True):
    plan_id: str
    plan_version: int


class SetTier(msgspec.Struct, tag="tier", array_like=True):
    tier: str
    max_concurrent: int
    as_of_us: int | None = None  # when the source decided it; older decisions are ignored


class SetPaymentMethod(msgspec.Struct, tag="card", array_like=True):
    present: bool


class SetAutoRecharge(msgspec.Struct, tag="ar", array_like=True):
    enabled: bool
    threshold_micros: int = 0
    amount_micros: int = 0
    max_per_day: int = 1
    cooldown_s: int = 0
    lift_dispute: bool = False  # an admin's settings: they also lift a `disputed` pause
    threshold_runway_s: int = 0  # also charge when the runway falls under this (billing-rules 9.2); 0: off


class SettleRecharge(msgspec.Struct, tag="ar_settle", array_like=True):
    """The outcome of an auto-recharge charge, from the charger or from a Stripe event.

    Both build the same command for the same payment intent, so whichever comes second
    replays the first (its idempotency key is the payment's, as for any Stripe payment).
    """

    kind: ClassVar[str] = "auto_recharge"
    charge_id: str
    succeeded: bool
    amount_micros: int
    payment_id: str | None = None
    reason: str | None = None
    idempotency_key: str | None = None

    @classmethod
    def of_payment(cls, charge_id: str, succeeded: bool, amount_micros: int, payment_id: str | None,
                   reason: str | None = None) -> "SettleRecharge":
        key = f"stripe:payment:{payment_id}" if succeeded and payment_id else None
        return cls(charge_id, succeeded, amount_micros, payment_id, None if succeeded else reason, key)


class InvoiceFailed(msgspec.Struct, tag="inv_failed", array_like=True):
    """`invoice.payment_failed`: the past-due clock, with the dunning policy of the settings."""

    since_us: int
    suspend_after_s: int
    degrade_after_s: int
    downgrade_after_s: int
    free_plan_id: str
    free_plan_version: int
    invoice_id: str | None = None
    subscription_id: str | None = None  # the subscription the invoice bills: its end ends the wait


class InvoicePaid(msgspec.Struct, tag="inv_paid", array_like=True):
    as_of_us: int
    invoice_id: str | None = None
    amount_paid: int | None = None  # cents; 0: not a payment (a trial or proration invoice)
    settled_by: str = "paid"  # or "voided", "uncollectible", "credited": settled, never paid


class ResetPeriod(msgspec.Struct, tag="period", array_like=True):
    """A subscription's current period [anchor_us, end_us): when its start moves, the quota
    period restarts; from then on the org's periods follow the subscription's."""

    anchor_us: int
    end_us: int | None = None


class SetLimits(msgspec.Struct, tag="limits", array_like=True):
    max_disk_mb: int | None = None
    machine_quotas: dict[str, dict[str, int]] | None = None


class SetAlerts(msgspec.Struct, tag="alerts", array_like=True):
    low_balance_micros: int  # 0: off; -1: unchanged (a request that sets only the runway alert)
    runway_alert_s: int | None = None  # balance.runway_low under this runway (billing-rules 2.10); 0: off


class Advance(msgspec.Struct, tag="advance", array_like=True):
    """Apply what time alone changed (expired leases and grants, a new period)."""


class ImportAmount(msgspec.Struct, array_like=True):
    """One amount of an import (billing-rules 2.11): a grant (> 0) or a debt (< 0, `adjustment`),
    keyed by the source's id of it."""

    source_id: str
    kind: str
    amount_micros: int
    expires_at_us: int | None = None


class ImportOrg(msgspec.Struct, tag="import", array_like=True):
    """An org brought over from another biller (billing-rules 2.11), applied whole or refused
    whole. Journaled when the org exists; when it does not, it creates the org and, like
    CreateOrg, is written as its first snapshot. What the edge resolved (the plan's version, the
    tier's cap, the dunning policy) is in it, so replay needs no catalog look-up. None: the
    line said nothing of it, and the org keeps what it has."""

    email: str
    amounts: list[ImportAmount]
    plan_id: str | None = None  # a new org without one gets the catalog's default plan
    plan_version: int = 0
    prepaid: bool | None = None  # a new org without one is prepaid
    tier: str | None = None
    max_concurrent: int = 0
    card: bool | None = None
    past_due: InvoiceFailed | None = None  # since when, with the service's dunning policy
    recharge: SetAutoRecharge | None = None
    customer_linked: bool = False  # the org's Stripe customer is linked: a no_stripe_customer pause lifts
    shadow: bool | None = None  # a new org: created in shadow (billing-rules 2.12); an existing one keeps its own


class SetEnforcement(msgspec.Struct, tag="enforcement", array_like=True):
    """Billing-rules 2.12: `shadow`, or `enforce` from `at_us` (None: the command's time; a
    cutover). `undo`: back to shadow only if nothing was charged since the cutover."""

    mode: str
    at_us: int | None = None
    undo: bool = False


class PreviewImport(msgspec.Struct, array_like=True):
    """What an ImportOrg would change, answered from a copy of the org (never applied, never
    journaled): `metergate import --dry-run`."""

    command: ImportOrg


Command = (CreateOrg | AcquireLease | RenewLease | ReleaseLease | ApplyUsage | Credit | RefundPayment | ReverseRefund
           | DisputeFunds | Halt | Resume | SetPlan | SetTier | SubscriptionChanged | SetLimits | SetPaymentMethod
           | SetAutoRecharge | SettleRecharge | InvoiceFailed | InvoicePaid | ResetPeriod | SetAlerts | Advance
           | ImportOrg | SetEnforcement)

# Commands that may carry an idempotency key for the ledger entry they make.
KEYED = (Credit, SettleRecharge, RefundPayment, ReverseRefund, DisputeFunds)


def well_typed(command: Command) -> bool:
    """Whether the command reads back as it is: a field of the wrong type (an int where the
    journal keeps a str, from an event of an unexpected shape) would be applied once and then
    fail every replay of the org, so it must never reach the org."""
    try:
        return _COMMAND_DECODER.decode(_ENCODER.encode(command)) == command
    except msgspec.ValidationError:
        return False


def fingerprint(command: Command) -> str:
    """What a keyed command is compared by when its key comes again: a hash of its type and of
    its fields that differ from their defaults, by name, so that a release that appends a field
    with a default gives every command of the releases before it the same fingerprint."""
    canonical = {"command": type(command).__struct_config__.tag, "fields": _canonical(command)}
    return hashlib.sha256(_CANONICAL_ENCODER.encode(canonical)).hexdigest()


# Fields appended after fingerprints became canonical: the positional bytes of those releases
# never held them, so a legacy fingerprint leaves them out while they keep their default.
_APPENDED_SINCE_LEGACY = frozenset({"paid_micros", "credited_micros", "threshold_runway_s", "runway_alert_s",
                                    "shadow"})


def legacy_fingerprint(command: Command) -> str:
    """The fingerprint of the releases before `fingerprint` was canonical (a hash of the
    positional bytes), still found in ledger rows written by them: a retry across that upgrade
    is compared with both (actors/batch.py)."""
    fields = msgspec.structs.fields(command)
    kept = len(fields)
    while kept and fields[kept - 1].name in _APPENDED_SINCE_LEGACY \
            and getattr(command, fields[kept - 1].name) == fields[kept - 1].default:
        kept -= 1
    if kept == len(fields):
        return hashlib.sha256(_ENCODER.encode(command)).hexdigest()
    positional = [type(command).__struct_config__.tag] + [getattr(command, f.name) for f in fields[:kept]]
    return hashlib.sha256(_ENCODER.encode(positional)).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, msgspec.Struct):
        fields = {}
        for field in msgspec.structs.fields(value):
            current = getattr(value, field.name)
            if field.default is not msgspec.NODEFAULT and current == field.default:
                continue
            if field.default_factory is not msgspec.NODEFAULT and current == field.default_factory():
                continue
            fields[field.name] = _canonical(current)
        return fields
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    return value


class JournalItem(msgspec.Struct, array_like=True):
    at_us: int
    command: Command


JOURNAL_VERSION = 2  # the format a journal entry is written in (actors/formats.py)


class JournalEntry(msgspec.Struct, array_like=True, tag=JOURNAL_VERSION):
    """One journal row (an org's items of one commit) as written from format 2 on:
    `[2, [item, ...]]`. Format 1 rows are the bare list of items, `[item, ...]`."""

    items: list[JournalItem]


def saved_version(data: bytes) -> int:
    """The format version of a saved row: the leading integer of its top-level array (format 2
    on), or 1 when there is none (format 1 rows start with an array or a string, or are empty).
    Read from the bytes alone, before the layout of that version is chosen."""
    header = data[:1]
    if header and 0x90 <= header[0] <= 0x9F:
        start = 1  # fixarray
    elif header == b"\xdc":
        start = 3  # array 16
    elif header == b"\xdd":
        start = 5  # array 32
    else:
        raise msgspec.DecodeError("a saved row is a msgpack array")
    if header[0] == 0x90 or len(data) <= start:
        return 1
    first = data[start]
    if first <= 0x7F:
        return first  # positive fixint: every version until 127
    if first in _UINTS:
        size = _UINTS[first]
        return int.from_bytes(data[start + 1:start + 1 + size], "big")
    return 1


_UINTS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


class _JournalCodec:
    """JOURNAL_ENCODER / JOURNAL_DECODER: a journal row's bytes from and to its items. Writes
    the current format; reads it and format 1 (the same items, no version); refuses a newer
    one (a row of a release ahead of this code) with DecodeError. Older formats' upcasters and
    the whole-org load are actors/formats.py."""

    def encode(self, items: list[JournalItem]) -> bytes:
        return _ENCODER.encode(JournalEntry(items))

    def decode(self, data: bytes) -> list[JournalItem]:
        version = saved_version(data)
        if version == JOURNAL_VERSION:
            return _ENTRY_DECODER.decode(data).items
        if version == 1:
            return _V1_DECODER.decode(data)
        raise msgspec.DecodeError(f"a journal row of format {version}: this code reads 1 to {JOURNAL_VERSION}")


_ENCODER = msgspec.msgpack.Encoder()
_CANONICAL_ENCODER = msgspec.json.Encoder(order="sorted")
_ENTRY_DECODER = msgspec.msgpack.Decoder(JournalEntry)
_V1_DECODER = msgspec.msgpack.Decoder(list[JournalItem])
JOURNAL_ENCODER = JOURNAL_DECODER = _JournalCodec()
_COMMAND_DECODER = msgspec.msgpack.Decoder(Command)


# ----- outcomes ----------------------------------------------------------------------------


class Applied(msgspec.Struct, frozen=True):
    """Done; what changed is the org's state."""


class Stale(msgspec.Struct, frozen=True):
    """Older than what was applied last (a tier decided before the current one): ignored."""


class OrgCreated(msgspec.Struct, frozen=True):
    org: OrgBillingActor
    created: bool  # False: the org existed, and is as it was


class Debited(msgspec.Struct, frozen=True):
    micros: int  # the quota part included


class LeaseGranted(msgspec.Struct, frozen=True):
    lease: Lease  # the live lease; copy it to keep it
    created: bool  # False: the same lease_id again, the lease as it is
    shadowed: Decision | None = None  # a shadow org's: what an enforced one would get (billing-rules 2.12)


class LeaseRenewed(msgspec.Struct, frozen=True):
    lease: Lease  # the live lease; copy it to keep it


class LeaseDenied(msgspec.Struct, frozen=True):
    decision: Decision


class Released(msgspec.Struct, frozen=True):
    released: bool  # False: already gone (a retried release)


class Booked(msgspec.Struct, frozen=True):
    entry: LedgerEntry
    balance_micros: int


class Imported(msgspec.Struct, frozen=True):
    org: OrgBillingActor
    created: bool  # the import made the org
    changed: list[str]  # what it changed (actors/imports.py names them); empty: unchanged


Outcome = (Applied | Stale | OrgCreated | Debited | LeaseGranted | LeaseRenewed | LeaseDenied | Released
           | Booked | Imported)

APPLIED = Applied()
STALE = Stale()


def execute(org: OrgBillingActor | None, command: Command, catalog: Catalog, now_us: int,
            fx: Effects, *, org_id: str | None = None, alerts: bool = True) -> Outcome:
    """Apply one command; returns its outcome. BillingError leaves time's effects applied.

    `org` is None only for a CreateOrg of an org that does not exist yet, named by `org_id`.
    `alerts` False: a command that is part of a larger one (the time applied before a usage
    command), whose alert check comes once, after the whole (billing-rules 2.9).
    """
    if org is None:
        assert isinstance(command, (CreateOrg, ImportOrg)) and org_id, (command, org_id)  # pragma: no mutate
        start = len(fx.events)
        if isinstance(command, ImportOrg):
            created, changed = imports.create_imported(org_id, command, catalog, now_us, fx)
            created.shadow_events(fx, start)  # (billing-rules 2.12)
            return Imported(created, True, changed)
        made = _create(org_id, command, catalog, now_us, fx)
        made.org.shadow_events(fx, start)
        return made
    start = len(fx.events)
    try:
        return _apply(org, command, catalog, now_us, fx)
    finally:  # after every command, also one refused after time's effects (billing-rules 2.9)
        if alerts:
            org.check_alerts(now_us, fx)
        if not isinstance(command, SetEnforcement):  # (which sorts its own: before and after its switch)
            org.shadow_events(fx, start)  # (billing-rules 2.12)


def _apply(org: OrgBillingActor, command: Command, catalog: Catalog, now_us: int, fx: Effects) -> Outcome:
    match command:
        case ApplyUsage(usages=usages):
            return Debited(org.apply_usage(usages, now_us, fx))
        case AcquireLease(lease_id=lease_id, resources=resources, ttl_s=ttl_s):
            decision, lease, created = org.acquire_lease(lease_id, resources, ttl_s, now_us, fx)
            if lease is None:
                return LeaseDenied(decision)
            return LeaseGranted(lease, created, decision)
        case RenewLease(lease_id=lease_id):
            return LeaseRenewed(org.renew_lease(lease_id, now_us, fx))
        case ReleaseLease(lease_id=lease_id):
            return Released(org.release_lease(lease_id, now_us, fx))
        case Credit(kind=kind, amount_micros=amount, expires_at_us=expires, note=note, payment_id=payment_id,
                    paid_micros=paid):
            if amount > 0:
                entry = org.credit(kind, amount, expires, note, now_us, fx, payment_id, paid)
            else:
                entry = org.debit(kind, -amount, note, now_us, fx)
            return Booked(entry, org.balance_micros)
        case RefundPayment(refund_id=refund_id, payment_id=payment_id, amount_micros=amount, note=note,
                           idempotency_key=key, grant_id=grant_id, credited_micros=credited, paid_micros=paid):
            entry, duplicate = org.refund_payment(refund_id, payment_id, amount, note, now_us, fx, key, grant_id,
                                                  credited, paid)
            if duplicate:
                return STALE
            if entry is not None:
                return Booked(entry, org.balance_micros)
        case ReverseRefund(refund_id=refund_id, payment_id=payment_id, idempotency_key=key):
            entry = org.reverse_refund(refund_id, payment_id, now_us, fx, key)
            if entry is not None:
                return Booked(entry, org.balance_micros)
        case DisputeFunds():
            entry, duplicate = org.dispute_funds(command, now_us, fx)
            if duplicate:
                return STALE
            if entry is not None:
                return Booked(entry, org.balance_micros)
        case SubscriptionChanged():
            if not org.subscription_changed(command, now_us, fx):
                return STALE
        case Halt():
            org.halt(now_us, fx)
        case Resume():
            org.resume(now_us, fx)
        case SetPlan(plan_id=plan_id, plan_version=version):
            org.set_plan(catalog.plan_version(plan_id, version), now_us, fx)
        case SetTier(tier=tier, max_concurrent=cap, as_of_us=as_of_us):
            if not org.set_tier(tier, cap, now_us, fx, as_of_us):
                return STALE
        case SetPaymentMethod(present=present):
            org.set_payment_method(present, now_us, fx)
        case SetAutoRecharge(enabled=enabled, threshold_micros=threshold, amount_micros=amount,
                             max_per_day=per_day, cooldown_s=cooldown, lift_dispute=lift_dispute,
                             threshold_runway_s=runway):
            org.configure_recharge(enabled, threshold, amount, per_day, cooldown, now_us, fx, lift_dispute, runway)
        case SettleRecharge(charge_id=charge_id, succeeded=ok, amount_micros=amount, payment_id=payment,
                            reason=reason):
            entry = org.settle_recharge(charge_id, ok, amount, payment, reason, now_us, fx)
            if entry is not None:
                return Booked(entry, org.balance_micros)
        case InvoiceFailed():
            org.invoice_failed(command.since_us, command.suspend_after_s, command.degrade_after_s,
                               command.downgrade_after_s,
                               catalog.plan_version(command.free_plan_id, command.free_plan_version), now_us, fx,
                               command.invoice_id, command.subscription_id)
        case InvoicePaid(as_of_us=as_of_us, invoice_id=invoice_id, amount_paid=amount_paid, settled_by=settled_by):
            org.invoice_paid(as_of_us, now_us, fx, invoice_id, amount_paid, settled_by)
        case ResetPeriod(anchor_us=anchor_us, end_us=end_us):
            org.reset_period(anchor_us, end_us, now_us, fx)
        case SetLimits(max_disk_mb=max_disk_mb, machine_quotas=quotas):
            org.set_limits(max_disk_mb, quotas, now_us, fx)
        case SetAlerts(low_balance_micros=threshold, runway_alert_s=runway):
            org.advance(now_us, fx)  # also when it changes nothing (billing-rules 1.1)
            if threshold >= 0:
                org.set_low_balance_alert(threshold, now_us, fx)
            if runway is not None:
                org.set_runway_alert(runway, now_us, fx)
        case Advance():
            org.advance(now_us, fx)
        case SetEnforcement(mode=mode, at_us=at_us, undo=undo):
            org.set_enforcement(mode, at_us, undo, now_us, fx)
        case ImportOrg():
            return Imported(org, False, imports.apply_import(org, command, catalog, now_us, fx))
        case CreateOrg():
            return OrgCreated(org, False)
        case _:
            raise AssertionError(f"unknown command {command!r}")
    return APPLIED


def _create(org_id: str, command: CreateOrg, catalog: Catalog, now_us: int, fx: Effects) -> OrgCreated:
    # The plan in effect now, looked up here: creation is never replayed (it is a snapshot).
    plan = catalog.current_plan(command.plan_id, now_us)
    if plan is None:
        raise UnknownPlan(f"plan {command.plan_id} is not in the catalog")
    org = OrgBillingActor.create(
        org_id, command.email, command.prepaid, plan, catalog.default_tier,
        catalog.tiers[catalog.default_tier], catalog.default_max_disk_mb,
        catalog.signup_grant_micros, now_us, fx, catalog.low_balance_micros, catalog.runway_alert_s,
        command.shadow)
    return OrgCreated(org, True)


def replay(org: OrgBillingActor, items: list[JournalItem], catalog: Catalog) -> None:
    """Re-apply journaled commands; their effects were written when they first ran."""
    sink = Effects()
    for item in items:
        assert not isinstance(item.command, CreateOrg), "creation is a snapshot, never journaled"
        try:
            execute(org, item.command, catalog, item.at_us, sink)
        except BillingError:
            pass  # it failed the same way the first time; its time effects are reapplied
