"""What `metergate check` asserts of a whole database, as pure comparisons.

storage/check.py reads the rows (a page of orgs at a time, and a few global tables); this
module says, for each invariant, what was expected and what was found. Nothing here reads
Postgres or a clock. The org is rebuilt by actors/formats.py's `load_org`, the one-org load
over the same decoders a shard's load runs (every saved format version, upcast), so the check
fails where a shard's load would, and agrees where a shard's memory would.

The invariants (names as they appear in findings):
  per org   snapshot_present, rebuilds (the snapshot is the org's and decodes, the journal tail
            replays, the core's own `check_invariants` hold), journal_contiguous,
            balance_equals_ledger (billing-rules 2.1: the balance, every grant held counted, minus
            debt, is SUM(ledger.amount_micros)), slot_of_org, billing_mode_matches,
            grant_has_credit, grant_within_credit, grant_matches_credit, grant_not_expired,
            grant_seq_covers_ledger, usage_not_in_future
  global    payment_credited_once, slot_map_complete, slot_shard_owned, outbox_status_valid,
            journal_has_org, migrations_contiguous, migrations_match_code
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from actors.money import CREDIT_KINDS, IMPORT_KIND, REVERSAL_KINDS
from actors.org import OrgBillingActor
from actors.placement import slot_of
from actors.formats import UnreadableOrg, load_org
from actors.retry import DEAD, PENDING
from config.catalog import Catalog

DELIVERED = "delivered"
OUTBOX_STATUSES = frozenset({PENDING, DELIVERED, DEAD})
# The clocks of the hosts that wrote usage and of the database may differ by this much.
MAX_CLOCK_SKEW_US = 300 * 1_000_000
MAX_FINDINGS_KEPT = 10_000  # past this, findings are counted, not kept: memory stays bounded
GRANT_PREFIX = "gr_"


class Invariant(StrEnum):
    SNAPSHOT_PRESENT = "snapshot_present"
    REBUILDS = "rebuilds"
    JOURNAL_CONTIGUOUS = "journal_contiguous"
    BALANCE_EQUALS_LEDGER = "balance_equals_ledger"
    SLOT_OF_ORG = "slot_of_org"
    BILLING_MODE_MATCHES = "billing_mode_matches"
    GRANT_HAS_CREDIT = "grant_has_credit"
    GRANT_WITHIN_CREDIT = "grant_within_credit"
    GRANT_MATCHES_CREDIT = "grant_matches_credit"
    GRANT_NOT_EXPIRED = "grant_not_expired"
    GRANT_SEQ_COVERS_LEDGER = "grant_seq_covers_ledger"
    USAGE_NOT_IN_FUTURE = "usage_not_in_future"
    PAYMENT_CREDITED_ONCE = "payment_credited_once"
    SLOT_MAP_COMPLETE = "slot_map_complete"
    SLOT_SHARD_OWNED = "slot_shard_owned"
    OUTBOX_STATUS_VALID = "outbox_status_valid"
    JOURNAL_HAS_ORG = "journal_has_org"
    MIGRATIONS_CONTIGUOUS = "migrations_contiguous"
    MIGRATIONS_MATCH_CODE = "migrations_match_code"


@dataclass(frozen=True, slots=True)
class Finding:
    org_id: str | None  # None: a finding about the database as a whole
    invariant: Invariant
    expected: str
    found: str


@dataclass(frozen=True, slots=True)
class StoredOrg:
    """One org as Postgres holds it, with its ledger summed (storage/check.py reads it)."""

    org_id: str
    slot: int
    billing_mode: str
    snapshot_seq: int | None  # None: no snapshot row
    state: bytes | None
    journal: list[tuple[int, bytes]]  # (seq, entry) after the snapshot's seq, in seq order
    ledger_micros: int  # SUM(amount_micros), 0 without rows
    ledger_grant_no: int  # the highest n of a gr_<n> its ledger names, 0 if none
    future_usage_rows: int  # usage rows after the cut-off given to the read
    newest_usage_us: int | None


@dataclass(frozen=True, slots=True)
class GrantEntry:
    """A ledger row that names a grant (its credit, its expiration, a refund or dispute of it)."""

    grant_id: str
    kind: str
    amount_micros: int
    expires_us: int | None


@dataclass
class Findings:
    """Every finding counted; the first MAX_FINDINGS_KEPT kept."""

    kept: list[Finding] = field(default_factory=list)
    total: int = 0

    def add(self, findings: list[Finding]) -> None:
        self.total += len(findings)
        self.kept += findings[:max(0, MAX_FINDINGS_KEPT - len(self.kept))]


def usage_cutoff_us(database_now_us: int, clock_offset_us: int) -> int:
    """Usage later than this is in the future: the service's clock (the database's now, moved
    by the test clock's offset when one is set) plus what clocks may differ by."""
    return database_now_us + clock_offset_us + MAX_CLOCK_SKEW_US


# ----- one org ----------------------------------------------------------------------------


def check_org(stored: StoredOrg, catalog: Catalog) -> tuple[list[Finding], OrgBillingActor | None]:
    """The findings of one org read from Postgres, and the org rebuilt (None if it cannot be)
    for the grant checks that need its ledger rows."""
    org_id = stored.org_id
    slot = slot_of(org_id)
    found: list[Finding] = []
    if stored.slot != slot:
        found.append(Finding(org_id, Invariant.SLOT_OF_ORG, f"slot {slot}", f"slot {stored.slot}"))
    if stored.future_usage_rows:
        found.append(Finding(org_id, Invariant.USAGE_NOT_IN_FUTURE, "no usage row after now",
                             f"{stored.future_usage_rows} row(s), the newest at {stored.newest_usage_us} µs"))
    if stored.snapshot_seq is None or stored.state is None:
        found.append(Finding(org_id, Invariant.SNAPSHOT_PRESENT, "a snapshot row", "none"))
        return found, None
    found += _journal_gaps(org_id, stored.snapshot_seq, [seq for seq, _ in stored.journal])
    entries = [entry for _, entry in stored.journal]
    try:
        org = load_org(org_id, stored.state, entries, catalog)
    except Exception as exc:  # noqa: BLE001 - whatever a shard's load would fail with is the finding
        why = exc.reason if isinstance(exc, UnreadableOrg) else f"{type(exc).__name__}: {exc}"
        found.append(Finding(org_id, Invariant.REBUILDS,
                             f"the snapshot (seq {stored.snapshot_seq}) is the org's and decodes, and {len(entries)} "
                             "journal entries replay, the core's invariants holding", why))
        return found, None
    mode = "prepaid" if org.prepaid else "postpaid"
    if stored.billing_mode != mode:
        found.append(Finding(org_id, Invariant.BILLING_MODE_MATCHES, f"orgs.billing_mode {mode}",
                             f"orgs.billing_mode {stored.billing_mode}"))
    balance = org.balance_micros
    if balance != stored.ledger_micros:
        found.append(Finding(org_id, Invariant.BALANCE_EQUALS_LEDGER,
                             f"balance_micros = SUM(ledger.amount_micros) = {stored.ledger_micros}",
                             f"balance_micros {balance} (rebuilt from snapshot seq {stored.snapshot_seq} and "
                             f"{len(entries)} journal entries)"))
    if stored.ledger_grant_no > org.grant_seq:
        found.append(Finding(org_id, Invariant.GRANT_SEQ_COVERS_LEDGER,
                             f"grant_seq >= {stored.ledger_grant_no} (the ledger names {GRANT_PREFIX}"
                             f"{stored.ledger_grant_no})", f"grant_seq {org.grant_seq}"))
    return found, org


def _journal_gaps(org_id: str, snapshot_seq: int, seqs: list[int]) -> list[Finding]:
    """The tail must go on from the snapshot one seq at a time: a shard numbers the next
    command from snapshot seq + tail length, so a gap hides a command or repeats a seq."""
    for expected, seq in enumerate(seqs, start=snapshot_seq + 1):
        if seq != expected:
            return [Finding(org_id, Invariant.JOURNAL_CONTIGUOUS, f"seq {expected} after snapshot seq {snapshot_seq}"
                            + (f" and {expected - snapshot_seq - 1} entries" if expected > snapshot_seq + 1 else ""),
                            f"seq {seq}")]
    return []


def grants_to_look_up(org: OrgBillingActor) -> list[str]:
    return [grant.grant_id for grant in org.grants or ()]


def check_grants(org: OrgBillingActor, entries: list[GrantEntry]) -> list[Finding]:
    """Each grant the org holds was made by one credit entry of the ledger (billing-rules 2.3
    step 4, 3.5, 3.6, 2.11: its kind, or a reversal's or an import's, and its expiry), holds no more than that
    credit, and has not expired in the ledger (2.6 removes the grant with its entry).
    `entries`: the ledger rows that name one of the org's grants."""
    by_grant: dict[str, list[GrantEntry]] = {}
    for entry in entries:
        by_grant.setdefault(entry.grant_id, []).append(entry)
    found = []
    org_id = org.org_id
    for grant in org.grants or ():
        named = by_grant.get(grant.grant_id, [])
        credits = [e for e in named if e.amount_micros > 0 and e.kind in _GRANT_MAKING_KINDS]
        if len(credits) != 1:
            found.append(Finding(org_id, Invariant.GRANT_HAS_CREDIT, f"one credit entry naming {grant.grant_id}",
                                 f"{len(credits)}"))
            continue
        credit = credits[0]
        if grant.remaining_micros > credit.amount_micros:
            found.append(Finding(org_id, Invariant.GRANT_WITHIN_CREDIT,
                                 f"{grant.grant_id} remaining_micros <= its credit {credit.amount_micros}",
                                 f"remaining_micros {grant.remaining_micros}"))
        kind_ok = credit.kind == grant.kind or credit.kind in REVERSAL_KINDS or credit.kind == IMPORT_KIND
        if not kind_ok or (credit.expires_us or None) != (grant.expires_at_us or None):
            found.append(Finding(org_id, Invariant.GRANT_MATCHES_CREDIT,
                                 f"{grant.grant_id}: kind {credit.kind}, expires {credit.expires_us} (its credit)",
                                 f"kind {grant.kind}, expires {grant.expires_at_us}"))
        if any(e.kind == "expiration" for e in named):
            found.append(Finding(org_id, Invariant.GRANT_NOT_EXPIRED,
                                 f"{grant.grant_id} held: no expiration entry", "an expiration entry"))
    return found


# Ledger kinds whose positive entry makes a grant: a credit's own kind, money given back
# (3.5, 3.6) and an import (2.11), whose grant keeps the source's kind.
_GRANT_MAKING_KINDS = CREDIT_KINDS | REVERSAL_KINDS | {IMPORT_KIND}


# ----- the database as a whole ------------------------------------------------------------


def check_payments(credited_twice: list[tuple[str, list[str]]]) -> list[Finding]:
    """A Stripe payment buys credit once, in one org: `stripe:payment:<id>` keys that more
    than one org's ledger holds, as (key, the orgs)."""
    return [Finding(org_id, Invariant.PAYMENT_CREDITED_ONCE, f"{key} in one org's ledger",
                    f"in {len(orgs)} orgs: {', '.join(orgs)}")
            for key, orgs in credited_twice for org_id in orgs]


def check_slot_map(slots: dict[int, int], owned: set[int], slot_count: int) -> list[Finding]:
    """Every slot 0..slot_count-1 maps to a shard, and each such shard has its fencing row."""
    found = []
    missing = [s for s in range(slot_count) if s not in slots]
    extra = sorted(s for s in slots if not 0 <= s < slot_count)
    if missing or extra:
        found.append(Finding(None, Invariant.SLOT_MAP_COMPLETE, f"slots 0..{slot_count - 1}",
                             f"{len(slots)} slots" + (f", missing {_some(missing)}" if missing else "")
                             + (f", out of range {_some(extra)}" if extra else "")))
    unowned = sorted({shard for shard in slots.values()} - owned)
    for shard in unowned:
        mapped = sorted(s for s, k in slots.items() if k == shard)
        found.append(Finding(None, Invariant.SLOT_SHARD_OWNED, f"a shard_owners row for shard {shard}",
                             f"none; slots {_some(mapped)} map to it"))
    return found


def check_outbox(counts: list[tuple[str, bool, int]]) -> list[Finding]:
    """(status, delivered_at set, rows): each status is one the jobs write, and only a
    delivered event has its delivery time."""
    found = []
    for status, has_delivered_at, rows in counts:
        if status not in OUTBOX_STATUSES:
            found.append(Finding(None, Invariant.OUTBOX_STATUS_VALID, f"status in {', '.join(sorted(OUTBOX_STATUSES))}",
                                 f"{rows} row(s) with status {status!r}"))
        elif has_delivered_at != (status == DELIVERED):
            found.append(Finding(None, Invariant.OUTBOX_STATUS_VALID,
                                 f"delivered_at {'set' if status == DELIVERED else 'null'} when {status}",
                                 f"{rows} row(s) {status} with delivered_at {'set' if has_delivered_at else 'null'}"))
    return found


def check_journal_orphans(orphans: list[tuple[str, int]]) -> list[Finding]:
    """Journal rows of org ids the orgs table does not hold, as (org id, rows)."""
    return [Finding(org_id, Invariant.JOURNAL_HAS_ORG, "an orgs row", f"none, and {rows} journal row(s)")
            for org_id, rows in orphans]


def check_migrations(applied: list[tuple[int, str]], known: list[tuple[int, str]]) -> list[Finding]:
    """schema_migrations holds 1..n with no gap, each the file of that number this code has,
    and every file of the code is applied (a database ahead of the code, or behind it, is a
    finding: the service would refuse it, or migrate it at its start)."""
    found = []
    versions = sorted(v for v, _ in applied)
    gaps = sorted(set(range(1, versions[-1] + 1)) - set(versions)) if versions else []
    if gaps:
        found.append(Finding(None, Invariant.MIGRATIONS_CONTIGUOUS, f"versions 1..{versions[-1]}",
                             f"missing {_some(gaps)}"))
    files = dict(known)
    for version, name in sorted(applied):
        if files.get(version) != name:
            found.append(Finding(None, Invariant.MIGRATIONS_MATCH_CODE,
                                 files.get(version, f"no migration {version} in this code"), f"{name} applied"))
    done = {v for v, _ in applied}
    pending = [name for version, name in sorted(known) if version not in done]
    if pending:
        found.append(Finding(None, Invariant.MIGRATIONS_MATCH_CODE, "every migration of this code applied",
                             f"not applied: {_some(pending)}"))
    return found


def _some(items: list, shown: int = 8) -> str:
    head = ", ".join(str(i) for i in items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")
