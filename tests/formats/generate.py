"""Write the saved-format corpus of the running code: snapshots and journal entries as Postgres
holds them, for every command type, into tests/formats/v<N>/ (N: the format version the code
writes; 1 is the code before actors/formats.py, which wrote no version).

    PYTHONPATH=. .venv/bin/python tests/formats/generate.py [DIR]   (DIR: a dry run elsewhere)

It never overwrites: a corpus is the bytes an older release wrote, kept so that every later
release proves it still reads them (tests/test_formats.py). Run it once per new format version.

Each scenario is an org created and driven through `execute` at fixed times:
  <scenario>/snapshot.msgpack   the org after its `setup` commands (OrgSnapshot, as the shard saves it)
  <scenario>/journal-NN.msgpack one journal entry each (a commit's items), applied after the snapshot
  <scenario>/expected.json      the org after the whole journal, read by today's code: its state
                                 (OrgState), a few fields OrgState does not show, and the old
                                 idempotency fingerprint of every keyed command of the journal
and, for the corpus as a whole, catalog.toml (the catalog the scenarios ran on) and
commands/<Type>.msgpack: every command type alone, and commands/fingerprints.json: the
idempotency fingerprint the release gave each.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import msgspec

from actors.commands import (JOURNAL_ENCODER, AcquireLease, Advance, ApplyUsage, CreateOrg, Credit, DisputeFunds,
                             Halt, InvoiceFailed, InvoicePaid, JournalItem, ReleaseLease, RenewLease, RefundPayment,
                             ResetPeriod, Resume, ReverseRefund, SetAlerts, SetAutoRecharge, SetLimits,
                             SetPaymentMethod, SetPlan, SetTier, SettleRecharge, SubscriptionChanged, execute,
                             fingerprint)
from actors.effects import Effects
from actors.metering import LeaseUsage
from actors.refusals import BillingError
from actors.timeutil import US_PER_S, rfc3339_to_us
from config.catalog import load_catalog
from config.settings import DEFAULT_CATALOG
from metergate_client.decision import Resources

try:  # the code before versioned formats wrote version 1 without saying so
    from actors.formats import SNAPSHOT_VERSION as VERSION
except ImportError:
    VERSION = 1

HERE = Path(__file__).resolve().parent
T0 = rfc3339_to_us("2026-03-02T09:00:00Z")  # a Monday, ISO week 2026-W10
S = US_PER_S
DAY = 86_400 * S
GPU = Resources(memory_mb=2048, cpu_count=2, machine_type="a100", region="us-east", quantity=2)
SMALL = Resources(memory_mb=512, cpu_count=1)
DUNNING_POLICY = (86_400, 2 * 86_400, 5 * 86_400)  # suspend, degrade, downgrade after (s)


def sub(sub_id: str, status: str, tier: str | None, cap: int, as_of_us: int, anchor_us: int | None = None,
        end_us: int | None = None) -> SubscriptionChanged:
    return SubscriptionChanged(sub_id, status, tier, cap, as_of_us, "base", 5, anchor_us, end_us)


def failed(since_us: int, invoice_id: str, subscription_id: str | None = None) -> InvoiceFailed:
    return InvoiceFailed(since_us, *DUNNING_POLICY, "free", 1, invoice_id, subscription_id)


# name -> (plan, prepaid, setup [(at_us, command)], journal [[(at_us, command)], ...] one list per entry)
SCENARIOS: dict[str, tuple[str, bool, list, list]] = {
    # Grants (one expiring), a tier, limits with a machine quota, two live leases, usage past 80 %
    # of the weekly quota; then every lease and money command, a halt and a resume, time.
    "busy": ("hobby_weekly", True, [
        (T0, Credit("grant", 700_000, T0 + 5 * DAY, "promo", "promo:1")),
        (T0, Credit("topup", 2_000_000, None, "top-up", "stripe:payment:pi_busy_1", "pi_busy_1")),
        (T0, SetLimits(10_000, {"us-east": {"a100": 3}})),
        (T0, SetTier("pro", 100, T0)),
        (T0, AcquireLease("ls_1", GPU, 600)),
        (T0, AcquireLease("ls_2", SMALL, 60)),
        (T0 + S, ApplyUsage([LeaseUsage("ls_1", memory_mb_ms=4096 * 3_600_000, cpu_ms=7_200_123,
                                        disk_mb_ms=777, ticks=3)])),
        (T0 + S, SetAlerts(1_500_000)),
    ], [
        [(T0 + 2 * S, AcquireLease("ls_3", SMALL, 300)), (T0 + 2 * S, RenewLease("ls_1"))],
        [(T0 + 3 * S, ApplyUsage([LeaseUsage("ls_1", cpu_ms=3_600_000, ticks=60),
                                  LeaseUsage("ls_3", memory_mb_ms=512 * 60_000, cpu_ms=60_000, ticks=1)]))],
        [(T0 + 4 * S, ReleaseLease("ls_2"))],
        [(T0 + 5 * S, Credit("refund", -250_000, None, "goodwill reversed", "adj:1"))],
        [(T0 + 6 * S, Halt())],
        [(T0 + 7 * S, Resume())],
        [(T0 + 8 * S, SetLimits(12_000, {"us-east": {"a100": 4}, "eu-west": {"h100": 1}}))],
        [(T0 + 9 * S, SetAlerts(0))],
        [(T0 + 3 * DAY, Advance())],  # the promo grant and the leases expire
    ]),
    # An org in dunning, downgraded to the free plan (its prior plan kept), with two unpaid
    # invoices of two subscriptions; then one is paid, one's subscription ends: dunning ends and
    # the prior plan comes back; later a new failure starts it again.
    "dunning": ("hobby_weekly", False, [
        (T0, SetPaymentMethod(True)),
        (T0, sub("sub_a", "active", "pro", 100, T0, T0, T0 + 30 * DAY)),
        (T0, ResetPeriod(T0, T0 + 30 * DAY)),
        (T0 + S, sub("sub_b", "active", "pro_plus", 600, T0 + S)),
        (T0 + 2 * S, failed(T0 + 2 * S, "in_a1", "sub_a")),
        (T0 + 3 * S, failed(T0 + 3 * S, "in_b1", "sub_b")),
        (T0 + 6 * DAY, Advance()),  # suspended? no (never paid an invoice): degraded, then downgraded
    ], [
        [(T0 + 6 * DAY + S, InvoicePaid(T0 + 6 * DAY + S, "in_a1", 2_000, "paid"))],
        [(T0 + 6 * DAY + 2 * S, sub("sub_b", "canceled", "pro_plus", 600, T0 + 6 * DAY + 2 * S))],
        [(T0 + 7 * DAY, failed(T0 + 7 * DAY, "in_a2", "sub_a"))],
        [(T0 + 8 * DAY + S, Advance())],  # suspended now? (paid an invoice: no) degraded
    ]),
    # Auto-recharge on, a card on file, the balance under the threshold: a charge asked for and
    # not settled is in the snapshot; then it succeeds, another fails and pauses, a new card lifts it.
    "recharge": ("payg", True, [
        (T0, SetPaymentMethod(True)),
        (T0, SetAutoRecharge(True, 10_000_000, 20_000_000, 3, 60)),  # balance 5 USD < 10: a charge
    ], [
        [(T0 + S, SettleRecharge.of_payment("ar_1", True, 20_000_000, "pi_ar_1"))],
        [(T0 + 2 * S, ApplyUsage([LeaseUsage("ls_gone", cpu_ms=1_000, ticks=1)]))],
        [(T0 + 10 * S, Credit("refund", -18_000_000, None, "operator refund", "adj:r1"))],
        [(T0 + 120 * S, Advance())],  # the cooldown is over: a second charge
        [(T0 + 121 * S, SettleRecharge.of_payment("ar_2", False, 20_000_000, "pi_ar_2",
                                                  "card_declined"))],
        [(T0 + 122 * S, SetPaymentMethod(True))],
        [(T0 + 123 * S, SetAutoRecharge(True, 1_000_000, 5_000_000, 2, 0, True))],
    ]),
    # Credits bought through Stripe, a refund of one, a dispute withdrawn on another, a refund
    # waiting for a payment not credited yet; then a refund reversed, a dispute reinstated.
    "refunds": ("payg", True, [
        (T0, Credit("topup", 10_000_000, None, None, "stripe:payment:pi_1", "pi_1")),
        (T0, Credit("topup", 7_000_000, T0 + 40 * DAY, "pack", "stripe:payment:pi_2", "pi_2")),
        (T0 + S, RefundPayment("re_1", "pi_1", 3_000_000, "refund", "stripe:refund:re_1")),
        (T0 + 2 * S, DisputeFunds("dp_1", "pi_2", 7_000_000, True, 7_000_000, None, "dispute",
                                  "stripe:dispute:dp_1:withdrawn")),
        (T0 + 3 * S, RefundPayment("re_w", "pi_late", 1_000_000, None, "stripe:refund:re_w")),
    ], [
        [(T0 + DAY, ReverseRefund("re_1", "pi_1", "stripe:refund:re_1:reversed"))],
        [(T0 + DAY + S, DisputeFunds("dp_1", "pi_2", 7_000_000, False, 7_000_000, None, "won",
                                     "stripe:dispute:dp_1:reinstated"))],
        [(T0 + DAY + 2 * S, Credit("topup", 4_000_000, None, None, "stripe:payment:pi_late", "pi_late"))],
        [(T0 + DAY + 3 * S, RefundPayment("re_1", "pi_1", 3_000_000, "refund again", "stripe:refund:re_1"))],
    ]),
    # Months of life on a subscription's cycle: periods rolled over, a plan change, tiers from
    # subscriptions and an operator, a stale tier ignored.
    "months": ("payg", False, [
        (T0, sub("sub_m", "active", "pro", 100, T0, T0, T0 + 30 * DAY)),
        (T0, ResetPeriod(T0, T0 + 30 * DAY)),
        (T0 + DAY, ApplyUsage([LeaseUsage("ls_x", cpu_ms=10_000_000, ticks=5)])),
        (T0 + 30 * DAY, sub("sub_m", "active", "pro", 100, T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY)),
        (T0 + 30 * DAY, ResetPeriod(T0 + 30 * DAY, T0 + 60 * DAY)),
        (T0 + 45 * DAY, SetPlan("hobby_weekly", 1)),
        (T0 + 61 * DAY, Advance()),
    ], [
        [(T0 + 62 * DAY, ApplyUsage([LeaseUsage("ls_y", memory_mb_ms=1024 * 3_600_000, ticks=2)]))],
        [(T0 + 63 * DAY, SetTier("custom", 42, T0 + 63 * DAY))],
        [(T0 + 63 * DAY + S, SetTier("base", 5, T0 + 62 * DAY))],  # older than the last: stale
        [(T0 + 64 * DAY, sub("sub_m", "canceled", "pro", 100, T0 + 64 * DAY))],
        [(T0 + 90 * DAY, SetPlan("payg", 1)), (T0 + 90 * DAY, Advance())],
    ]),
    # A subscription renewed: its new period restarts the quota period (ResetPeriod in the
    # journal), the same period reported again changes nothing. (Added to the format 1 corpus
    # after the others, written by that same code: its journals lacked ResetPeriod.)
    "renewal": ("hobby_weekly", True, [
        (T0, sub("sub_r", "active", "pro", 100, T0, T0, T0 + 30 * DAY)),
        (T0, ResetPeriod(T0, T0 + 30 * DAY)),
        (T0 + DAY, ApplyUsage([LeaseUsage("ls_r", cpu_ms=100_000_000, ticks=5)])),
    ], [
        [(T0 + 30 * DAY, sub("sub_r", "active", "pro", 100, T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY)),
         (T0 + 30 * DAY, ResetPeriod(T0 + 30 * DAY, T0 + 60 * DAY))],
        [(T0 + 31 * DAY, ApplyUsage([LeaseUsage("ls_r", cpu_ms=10_000_000, ticks=1)]))],
        [(T0 + 32 * DAY, ResetPeriod(T0 + 30 * DAY, T0 + 60 * DAY))],
    ]),
}


def run(org, command, at_us: int, catalog):
    try:
        execute(org, command, catalog, at_us, Effects())
    except BillingError:
        pass  # refused the same way at replay


def expected_of(org, at_us: int, journal: list) -> dict:
    dunning = org.dunning
    charge = org.pending_charge()
    return {
        "at_us": at_us,
        "state": msgspec.to_builtins(org.state(at_us)),
        "plan": [org.plan.id, org.plan.version],
        "dunning": None if dunning is None else {
            "step": int(dunning.step), "free_plan": [dunning.free_plan.id, dunning.free_plan.version],
            "prior_plan": None if dunning.prior_plan is None else [dunning.prior_plan.id,
                                                                   dunning.prior_plan.version],
            "invoice_ids": dunning.invoice_ids},
        "pending_charge": None if charge is None else [charge.charge_id, charge.amount_micros],
        "refunds": sorted(r.refund_id for r in org.refunds or ()),
        "disputes": sorted(d.dispute_id for d in org.disputes or ()),
        "subscriptions": [[r.subscription_id, r.status] for r in org.subscriptions or ()],
        "settled_invoices": org.settled_invoices,
        "period": [org.period_key, org.period_start_us, org.period_end_us, org.period_usage_micros],
        "fingerprints": {f"{n}:{i}": fingerprint(item.command)
                         for n, entry in enumerate(journal, 1) for i, item in enumerate(entry)},
    }


def write(path: Path, data: bytes | str) -> None:
    if path.exists():
        sys.exit(f"{path} exists: a corpus is never rewritten (it is the bytes an older release wrote)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / f"v{VERSION}"  # another place: a dry run
    if root.exists():
        sys.exit(f"{root} exists: the corpus of version {VERSION} is written once, never again")
    catalog = load_catalog(DEFAULT_CATALOG)
    seen: dict[str, object] = {"CreateOrg": CreateOrg("ops@acme.test", "payg", True)}
    for name, (plan_id, prepaid, setup, journal) in SCENARIOS.items():
        org = execute(None, CreateOrg(f"ops@{name}.test", plan_id, prepaid), catalog, T0, Effects(),
                      org_id=f"org_{name}").org
        for at_us, command in setup:
            run(org, command, at_us, catalog)
            seen.setdefault(type(command).__name__, command)
        write(root / name / "snapshot.msgpack", msgspec.msgpack.encode(org.to_snapshot()))
        entries = []
        for n, entry in enumerate(journal, 1):
            items = [JournalItem(at_us, command) for at_us, command in entry]
            for item in items:
                run(org, item.command, item.at_us, catalog)
                seen.setdefault(type(item.command).__name__, item.command)
            entries.append(items)
            write(root / name / f"journal-{n:02d}.msgpack", JOURNAL_ENCODER.encode(items))
        org.check_invariants()
        last_us = journal[-1][-1][0]
        write(root / name / "expected.json", json.dumps(expected_of(org, last_us, entries), indent=1) + "\n")
    for type_name, command in sorted(seen.items()):
        write(root / "commands" / f"{type_name}.msgpack", msgspec.msgpack.encode(command))
    prints = {type_name: fingerprint(command) for type_name, command in seen.items()}
    write(root / "commands" / "fingerprints.json", json.dumps(prints, indent=1, sort_keys=True) + "\n")
    shutil.copyfile(DEFAULT_CATALOG, root / "catalog.toml")
    print(f"wrote {root}: {len(SCENARIOS)} scenarios, {len(seen)} command types")


if __name__ == "__main__":
    main()
