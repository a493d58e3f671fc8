"""Saved formats: every corpus of old bytes (tests/formats/v<N>/, written by the release of
that format and never rewritten) decodes and replays to the state its release computed; the
saved structs change only by appending defaulted fields (tests/formats/schema.lock.json);
fingerprints stay stable; one org's bad rows stay that org's (actors/formats.py)."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import msgspec
import pytest

from actors.commands import (Command, CreateOrg, Credit, InvoicePaid, JournalItem, SetPlan, execute,
                             fingerprint, legacy_fingerprint)
from actors.effects import Effects
from actors.formats import (OrgSnapshotV1, UnreadableOrg, decode_journal, decode_snapshot, encode_journal,
                            encode_snapshot, load_org, saved_version)
from actors.org import SNAPSHOT_VERSION, OrgBillingActor, PlanTerms
from actors.periods import DunningStep
from actors.recharge import AutoRecharge
from config.catalog import Catalog, Plan, load_catalog
from tests.formats import lock

CORPUS = Path(__file__).resolve().parent / "formats"
VERSIONS = sorted(int(path.name[1:]) for path in CORPUS.glob("v[0-9]*"))
SCENARIOS = [(version, path.name) for version in VERSIONS
             for path in sorted((CORPUS / f"v{version}").iterdir()) if (path / "snapshot.msgpack").exists()]
COMMAND_TYPES = {member.__name__ for member in Command.__args__}
COMMAND = msgspec.msgpack.Decoder(Command)
# Command types the release that wrote a corpus did not have yet (appended to the union since).
NEWER_THAN_CORPUS = {1: {"ImportOrg", "SetEnforcement"}, 2: {"ImportOrg", "SetEnforcement"}}


def catalog_of(version: int) -> Catalog:
    return load_catalog(CORPUS / f"v{version}" / "catalog.toml")


def rows_of(version: int, scenario: str) -> tuple[bytes, list[bytes]]:
    root = CORPUS / f"v{version}" / scenario
    return (root / "snapshot.msgpack").read_bytes(), [p.read_bytes() for p in sorted(root.glob("journal-*.msgpack"))]


def expected_of(version: int, scenario: str) -> dict:
    return json.loads((CORPUS / f"v{version}" / scenario / "expected.json").read_text())


def loaded(version: int, scenario: str, catalog: Catalog | None = None) -> OrgBillingActor:
    state, entries = rows_of(version, scenario)
    return load_org(f"org_{scenario}", state, entries, catalog or catalog_of(version))


# ----- the corpus ---------------------------------------------------------------------------


def test_the_corpus_holds_format_1_and_the_current_format_and_every_command_type():
    assert VERSIONS[0] == 1 and VERSIONS[-1] == SNAPSHOT_VERSION, VERSIONS
    for version in VERSIONS:
        journaled = {type(item.command).__name__ for _, scenario in (s for s in SCENARIOS if s[0] == version)
                     for entry in rows_of(version, scenario)[1] for item in decode_journal(entry)}
        known = COMMAND_TYPES - NEWER_THAN_CORPUS.get(version, set())
        assert journaled == known - {"CreateOrg"}, (version, known - journaled)
        alone = {path.stem for path in (CORPUS / f"v{version}" / "commands").glob("*.msgpack")}
        assert alone == known, (version, known ^ alone)


@pytest.mark.parametrize(("version", "scenario"), SCENARIOS)
def test_a_saved_org_decodes_and_replays_to_the_state_its_release_computed(version, scenario):
    state, entries = rows_of(version, scenario)
    assert saved_version(state) == version
    assert {saved_version(entry) for entry in entries} == {version}
    expected = expected_of(version, scenario)
    org = loaded(version, scenario)

    org.check_invariants()
    state_now = msgspec.to_builtins(org.state(expected["at_us"]))  # a field OrgState gains later is not compared
    recharge = expected["state"].get("recharge")
    if recharge is not None:  # nor one its auto-recharge (an array) gains: those hold their defaults
        appended = msgspec.structs.fields(AutoRecharge)[len(recharge):]
        assert state_now["recharge"][len(recharge):] == [field.default for field in appended]
        state_now["recharge"] = state_now["recharge"][:len(recharge)]
    assert {name: state_now[name] for name in expected["state"]} == expected["state"]
    dunning = org.dunning
    assert [org.plan.id, org.plan.version] == expected["plan"]
    assert (None if dunning is None else {
        "step": int(dunning.step), "free_plan": [dunning.free_plan.id, dunning.free_plan.version],
        "prior_plan": None if dunning.prior_plan is None else [dunning.prior_plan.id, dunning.prior_plan.version],
        "invoice_ids": dunning.invoice_ids}) == expected["dunning"]
    charge = org.pending_charge()
    assert (None if charge is None else [charge.charge_id, charge.amount_micros]) == expected["pending_charge"]
    assert sorted(r.refund_id for r in org.refunds or ()) == expected["refunds"]
    assert sorted(d.dispute_id for d in org.disputes or ()) == expected["disputes"]
    assert [[r.subscription_id, r.status] for r in org.subscriptions or ()] == expected["subscriptions"]
    assert org.settled_invoices == expected["settled_invoices"]
    assert [org.period_key, org.period_start_us, org.period_end_us, org.period_usage_micros] == expected["period"]
    # What is written now reads back as the same org.
    again = OrgBillingActor.from_snapshot(decode_snapshot(encode_snapshot(org.to_snapshot())), catalog_of(version))
    assert again.to_snapshot() == org.to_snapshot()


@pytest.mark.parametrize(("version", "scenario"), SCENARIOS)
def test_a_retry_of_a_saved_command_has_the_fingerprint_its_release_stored(version, scenario):
    """A ledger row keeps the fingerprint of its keyed command: the release of format 1 hashed
    the positional bytes (legacy_fingerprint, which actors/batch.py still accepts), every later
    one the canonical form, which must not move."""
    recorded = expected_of(version, scenario)["fingerprints"]
    _, entries = rows_of(version, scenario)
    now = {f"{n}:{i}": (legacy_fingerprint if version == 1 else fingerprint)(item.command)
           for n, entry in enumerate(entries, 1) for i, item in enumerate(decode_journal(entry))}
    assert now == recorded


@pytest.mark.parametrize("version", VERSIONS)
def test_every_command_type_decodes_alone_with_its_fingerprint(version):
    root = CORPUS / f"v{version}" / "commands"
    recorded = json.loads((root / "fingerprints.json").read_text())
    for type_name in sorted(COMMAND_TYPES - NEWER_THAN_CORPUS.get(version, set())):
        command = COMMAND.decode((root / f"{type_name}.msgpack").read_bytes())
        assert type(command).__name__ == type_name
        assert (legacy_fingerprint if version == 1 else fingerprint)(command) == recorded[type_name], type_name
        assert fingerprint(command) != legacy_fingerprint(command)


def test_corpus_orgs_hold_what_their_scenarios_made_them():
    """Values worked out by hand, not only read back from what the old release wrote."""
    snap = decode_snapshot(rows_of(1, "dunning")[0])
    assert (snap.dunning.step, snap.dunning.free_plan_id, snap.dunning.prior_plan_id) == (
        DunningStep.DOWNGRADED, "free", "hobby_weekly")
    assert (snap.plan_id, snap.suspended, snap.dunning.invoice_ids) == ("free", True, ["in_a1", "in_b1"])
    # Format 1 embedded the dunning plans: their terms are kept, the org's own plan had none.
    assert {(t.id, t.version, t.included_micros, t.overage) for t in snap.plans} == {
        ("free", 1, 1_000_000, False), ("hobby_weekly", 1, 5_000_000, True)}
    catalog = catalog_of(1)
    org = OrgBillingActor.from_snapshot(snap, catalog)
    assert org.dunning.prior_plan is catalog.plans[("hobby_weekly", 1)]  # the catalog's own, not a copy
    # Paying in_a1 and the end of sub_b (rule 8.4) end dunning: the prior plan is back.
    after = loaded(1, "dunning")
    assert (after.plan.id, after.suspended, after.dunning.invoice_ids, after.dunning.step) == (
        "hobby_weekly", False, ["in_a2"], DunningStep.SUSPENDED)

    recharge = decode_snapshot(rows_of(1, "recharge")[0])
    assert (recharge.recharge.pending_id, recharge.recharge.pending_micros, recharge.has_payment_method) == (
        "ar_1", 20_000_000, True)
    # 5 USD signup + 20 charged - 14 µUSD of cpu - 18 refunded; the second charge failed.
    assert loaded(1, "recharge").balance_micros == 5_000_000 + 20_000_000 - 14 - 18_000_000

    refunds = loaded(1, "refunds")
    # signup 5 + 10 + 7 bought; re_1 took 3 then gave it back; dp_1 took 7 then gave it back;
    # pi_late's 4 came and the refund waiting for it took 1; re_1 again is a duplicate.
    assert refunds.balance_micros == (5 + 10 + 7 - 3 - 7 + 3 + 7 + 4 - 1) * 1_000_000
    assert refunds.recharge.paused == "disputed"

    busy = decode_snapshot(rows_of(1, "busy")[0])
    assert (sorted(l.lease_id for l in busy.leases), busy.tier, busy.max_concurrent) == (["ls_1", "ls_2"], "pro", 100)
    assert busy.machine_quotas == {"us-east": {"a100": 3}}
    # 4 GiB for 1 h at 4,500 nano-USD/GiB-s = 64,800 µUSD; 7,200.123 vCPU-s at 14,000 = 100,801.722
    assert (busy.quota_used_micros, busy.thresholds_fired) == (64_800 + 100_801, 0)
    assert loaded(1, "busy").leases is None or not loaded(1, "busy").leases  # all expired three days later

    renewal = loaded(1, "renewal")
    # The renewal restarted the quota period: only the 10,000 vCPU-s after it (14 µUSD each) count.
    assert (renewal.period_key, renewal.period_usage_micros) == ("sub-2026-04-01", 140_000)

    months = loaded(1, "months")
    assert (months.tier, months.max_concurrent, months.plan.id) == ("base", 5, "payg")  # sub_m ended


def test_format_2_is_format_1_with_the_version_in_front_and_fields_appended():
    """Apart from the dunning state (its plans became ids), format 2 moved no field: the
    version is a new first element and `plans` a new last one."""
    old_bytes = rows_of(1, "busy")[0]
    new = msgspec.msgpack.decode(encode_snapshot(decode_snapshot(old_bytes)))
    old = msgspec.msgpack.decode(old_bytes)
    assert new[0] == 2 and appends_only(new[1:], old)
    dunning_at = OrgSnapshotV1.__struct_fields__.index("dunning")
    old_dunning = msgspec.msgpack.decode(rows_of(1, "dunning")[0])
    new_dunning = msgspec.msgpack.decode(encode_snapshot(decode_snapshot(rows_of(1, "dunning")[0])))[1:]
    assert all(appends_only(n, o) for position, (n, o) in enumerate(zip(new_dunning, old_dunning))
               if position != dunning_at)
    assert new_dunning[dunning_at][4:6] == ["free", 1]  # the free plan by id and version
    items = decode_journal(rows_of(1, "busy")[1][0])
    assert msgspec.msgpack.decode(encode_journal(items)) == [2, msgspec.msgpack.decode(rows_of(1, "busy")[1][0])]


def appends_only(new, old) -> bool:
    """Whether `new` is `old` with fields appended only (at any depth of positional structs)."""
    if isinstance(old, list) and isinstance(new, list):
        return len(new) >= len(old) and all(appends_only(n, o) for n, o in zip(new, old))
    return new == old


# ----- plans gone from the catalog ------------------------------------------------------------


def without(catalog: Catalog, *keys: tuple[str, int]) -> Catalog:
    trimmed = copy.copy(catalog)
    object.__setattr__(trimmed, "plans", {key: plan for key, plan in catalog.plans.items() if key not in keys})
    return trimmed


def test_an_org_whose_plan_versions_left_the_catalog_loads_on_the_terms_saved_with_it():
    catalog = catalog_of(1)
    org = loaded(1, "dunning")  # on hobby_weekly, in dunning towards free
    state = encode_snapshot(org.to_snapshot())
    gone = without(catalog, ("hobby_weekly", 1), ("free", 1))

    restored = load_org("org_dunning", state, [], gone)

    for plan, old in ((restored.plan, org.plan), (restored.dunning.free_plan, org.dunning.free_plan)):
        assert plan == old and plan is not old  # the saved terms, field for field
    now = org.period_start_us + 86_400_000_000
    assert restored.state(now) == org.state(now)
    # It goes on as it would have: the unpaid invoice paid, the same balance and plan.
    for target, on in ((org, catalog), (restored, gone)):
        execute(target, InvoicePaid(now, "in_a2", 1_000), on, now, Effects())
        execute(target, Credit("grant", 1_000_000), on, now, Effects())
    assert restored.to_snapshot() == org.to_snapshot()


def test_a_format_1_org_whose_own_plan_left_the_catalog_is_unreadable_alone_with_why():
    catalog = without(catalog_of(1), ("payg", 1))
    state, entries = rows_of(1, "busy")
    assert load_org("org_busy", state, entries, catalog).plan.id == "hobby_weekly"
    with pytest.raises(UnreadableOrg) as unreadable:
        loaded(1, "refunds", catalog)
    assert unreadable.value.org_id == "org_refunds"
    assert "'payg' version 1 is not in the catalog" in unreadable.value.reason


def test_plan_terms_keep_every_field_of_a_plan():
    assert set(Plan.__struct_fields__) <= set(PlanTerms.__struct_fields__)
    plan = catalog_of(1).plans[("hobby_weekly", 1)]
    assert PlanTerms.of(plan).plan() == plan


# ----- one org's bad rows -----------------------------------------------------------------------


def test_an_org_whose_rows_cannot_be_read_is_unreadable_with_its_id_and_the_reason():
    state, entries = rows_of(1, "busy")
    catalog = catalog_of(1)
    newer = msgspec.msgpack.encode([SNAPSHOT_VERSION + 1, "org_busy"])
    cases = {
        "garbage snapshot": (b"\x01\x02", entries, "snapshot does not decode"),
        "newer snapshot": (newer, entries, f"format {SNAPSHOT_VERSION + 1}: this code reads 1 to {SNAPSHOT_VERSION}"),
        "another org's snapshot": (rows_of(1, "months")[0], [], "snapshot is of org 'org_months'"),
        "truncated entry": (state, entries[:2] + [entries[2][:-3]], "journal entry 3 of 3 does not decode"),
        "newer entry": (state, [msgspec.msgpack.encode([9, []])], "journal row of format 9"),
        "entry that fails": (state, [encode_journal([JournalItem(1, SetPlan("gone", 7))])],
                             "journal entry 1 of 1 does not replay: CatalogError"),
    }
    for case, (snapshot, tail, reason) in cases.items():
        with pytest.raises(UnreadableOrg) as unreadable:
            load_org("org_busy", snapshot, tail, catalog)
        assert unreadable.value.org_id == "org_busy", case
        assert reason in unreadable.value.reason, (case, unreadable.value.reason)
    assert load_org("org_busy", state, entries, catalog).org_id == "org_busy"
    crossed = pickle.loads(pickle.dumps(unreadable.value))  # as Ray hands it to a caller
    assert (crossed.org_id, crossed.reason, str(crossed)) == (
        "org_busy", unreadable.value.reason, f"org org_busy: {unreadable.value.reason}")


# ----- fingerprints -------------------------------------------------------------------------------


def test_a_field_appended_with_a_default_leaves_the_fingerprint_as_it_was():
    fields = [(f.name, f.type, f.default) if f.default is not msgspec.NODEFAULT else (f.name, f.type)
              for f in msgspec.structs.fields(Credit)]
    Later = msgspec.defstruct("Credit", fields + [("currency", str, "usd")], tag="credit", array_like=True)
    now = Credit("topup", 5_000_000, None, "pack", "k1", "pi_1")
    later = Later("topup", 5_000_000, None, "pack", "k1", "pi_1")
    assert fingerprint(later) == fingerprint(now)
    assert legacy_fingerprint(later) != legacy_fingerprint(now)  # what the old form got wrong
    assert fingerprint(Later("topup", 5_000_000, None, "pack", "k1", "pi_1", "eur")) != fingerprint(now)
    assert fingerprint(Credit("topup", 5_000_001, None, "pack", "k1", "pi_1")) != fingerprint(now)
    assert fingerprint(CreateOrg("a@b.test", "payg", True)) != fingerprint(CreateOrg("a@b.test", "payg", False))


# ----- the lock ---------------------------------------------------------------------------------


def test_saved_structs_change_only_by_appending_fields_with_defaults():
    broken = lock.violations(json.loads(lock.LOCK.read_text()), lock.schema())
    assert not broken, "a saved struct changed against the rule:\n  " + "\n  ".join(broken) + "\nThe rule: " + lock.RULE


def test_the_schema_lock_records_every_saved_struct_as_it_is():
    assert json.loads(lock.LOCK.read_text()) == lock.schema(), (
        "a saved struct changed (or a new one is saved) and the lock does not record it: if the change only "
        "appends fields with defaults, record it with `PYTHONPATH=. .venv/bin/python tests/formats/lock.py`. "
        "The rule: " + lock.RULE)


def test_the_lock_check_finds_every_change_the_rule_forbids():
    locked = lock.schema()
    assert lock.violations(locked, locked) == []

    def changed(edit) -> list[str]:
        current = copy.deepcopy(locked)
        edit(current)
        return lock.violations(locked, current)

    fields = lambda s, name: s[name]["fields"]  # noqa: E731
    assert "field 1 was 'kind', now 'remaining_micros'" in changed(
        lambda s: fields(s, "Grant").insert(1, fields(s, "Grant").pop(2)))[0]
    assert "field 4 'payment_id' is gone" in changed(lambda s: fields(s, "Grant").pop())[0]
    assert "appended without a default" in changed(
        lambda s: fields(s, "Lease").append({"name": "gpu", "type": "int"}))[0]
    assert "type" in changed(lambda s: fields(s, "Lease")[1].update(type="str"))[0]
    assert "default changed" in changed(lambda s: fields(s, "AutoRecharge")[5].update(default="x"))[0]
    assert "HaltCause.BALANCE" in changed(lambda s: s["HaltCause"]["enum"].update(BALANCE="money"))[0]
    assert "gone" in changed(lambda s: s.pop("RefundRecord"))[0]
    assert changed(lambda s: fields(s, "Lease").append({"name": "gpu", "type": "int", "default": 0})) == []
    assert changed(lambda s: s["HaltCause"]["enum"].update(OTHER="other")) == []
    assert changed(lambda s: fields(s, "JournalItem")[1]["type"]["union"].append("NewCommand")) == []
