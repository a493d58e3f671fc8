"""`metergate check` on a database of its own: clean after real traffic, then one corruption
at a time, each written straight into Postgres and repaired after, must be named (org and
invariant) with exit code 3; a database it cannot read is exit code 1, one line.

The traffic is a real ShardActor run in this process on the database (orgs, operator grants,
a Stripe payment and its refund, a grant that lapses, a lease and ticks), stopped as after
kill -9 so that journal tails are left behind its snapshots for the check to replay. The
command runs as the installed console script, reading Postgres directly: no service serves
this database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from actors import shard_residency as shard_module
from actors.commands import AcquireLease, CreateOrg, Credit, Halt, RefundPayment, Resume, fingerprint
from actors.formats import decode_snapshot, encode_snapshot
from actors.org import OrgBillingActor, Resources
from actors.placement import SLOT_COUNT, slot_of
from actors.shard import ShardActor
from actors.ticks import TICKS_ENCODER, Tick
from config.catalog import load_catalog
from config.settings import Settings
from tests.differential import CATALOG_PATH
from tests.helpers import Sql, database_url_named

METERGATE = Path(sys.executable).parent / "metergate"
US = 1_000_000
USD = 1_000_000
ORGS = 8  # more than one page of --batch 3


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_") and k not in ("COLUMNS", "LINES")}
    return {**env, "METERGATE_CATALOG": str(CATALOG_PATH), "COLUMNS": "250", **extra}


def check(url: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`metergate check` on the database at `url` (None: as configured by `env`)."""
    where = ["--database-url", url] if url is not None else []
    return subprocess.run([str(METERGATE), "check", *where, *args], env=_env(env), capture_output=True, text=True,
                          timeout=180, check=False)


def findings_of(url: str) -> set[tuple[str | None, str]]:
    """(org, invariant) of every finding; asserts exit code 3 and a consistent report."""
    result = check(url, "--json", "--batch", "3")
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert not report["clean"] and report["orgs_checked"] == ORGS
    assert report["findings_total"] == len(report["findings"]) > 0
    return {(f["org_id"], f["invariant"]) for f in report["findings"]}


async def _traffic(url: str) -> dict[str, str]:
    """Real commands through a real shard; returns the roles of the orgs the tests corrupt."""
    settings = Settings(database_url=url, shards=1, catalog=CATALOG_PATH, snapshot_every_entries=4,
                        passivate_after_s=3_600, service_token="s" * 20, admin_token="a" * 20,
                        org_token_secret="o" * 32)
    shard = ShardActor(0, settings.model_dump_json())
    await shard.ready()

    async def run(org_id: str, command) -> dict:
        (answer,) = await shard.submit([(org_id, command, fingerprint(command))])
        assert "error" not in answer, (org_id, command, answer)
        return answer

    orgs = [f"chk_{n:02d}" for n in range(ORGS)]
    try:
        now = int(time.time() * US)
        for n, org_id in enumerate(orgs):
            await run(org_id, CreateOrg(f"{org_id}@example.test", "payg", n % 3 != 2))
            await run(org_id, Credit("grant", 50 * USD, note="welcome"))
            await run(org_id, Credit("grant", 1 * USD, now - US, "lapsed at once"))  # credited, then expired
            lease = f"lease_{org_id}"
            await run(org_id, AcquireLease(lease, Resources(memory_mb=4096, cpu_count=2), 600))
            ticks = [Tick(f"t{k}_{org_id}", org_id, lease, now - (60 - k) * US, 1_000, 4096, 2, 0, None, k)
                     for k in range(n + 1)]
            answer = await shard.usage(TICKS_ENCODER.encode(ticks))
            assert answer["accepted"] == len(ticks), answer
            if n == 1:  # outbound events
                await run(org_id, Halt())
                await run(org_id, Resume())
            if n % 2 == 0:  # a Stripe payment, refunded in part
                payment = f"pi_{org_id}"
                await run(org_id, Credit("topup", 20 * USD, None, f"Stripe checkout of {org_id}",
                                         f"stripe:payment:{payment}", payment))
                refund = RefundPayment(f"re_{org_id}", payment, 5 * USD, f"Stripe refund of {payment}",
                                       f"stripe:refund:re_{org_id}")
                assert (await run(org_id, refund))["entry"]["amount_micros"] == -5 * USD
    finally:  # as after kill -9: the orgs' journal tails stay behind their snapshots
        shard.loop_task.cancel()
        await asyncio.gather(shard.loop_task, return_exceptions=True)
        await shard.pool.close()
    return {"paid": orgs[0], "other": orgs[3]}


@pytest.fixture(scope="module")
def traffic(shard_database):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_module, "IDLE_SNAPSHOT_AFTER_S", 3_600)  # no idle snapshot eats the tails
        roles = asyncio.run(_traffic(shard_database))
    sql = Sql(shard_database)
    with_tail = sql.val("SELECT min(j.org_id) FROM org_journal j JOIN org_snapshots s USING (org_id)"
                        " WHERE j.seq > s.seq")
    assert with_tail is not None, "the traffic left no journal tail: the check would replay nothing"
    snapshotted = sql.val("SELECT count(*) FROM org_snapshots WHERE seq > 0")
    assert snapshotted > 0, "no org crossed a snapshot"
    assert sql.val("SELECT count(*) FROM outbox") > 0, "no outbound event"
    return shard_database, sql, {**roles, "with_tail": with_tail}


def test_a_database_after_real_traffic_has_every_invariant_holding(traffic):
    url, sql, _ = traffic
    result = check(url, "--batch", "3")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"check: {ORGS} orgs in " in result.stdout and "every invariant holds" in result.stdout
    report = json.loads(check(url, "--json").stdout)
    assert report.pop("database").endswith(url.rpartition("@")[2])  # a password would show as ***
    assert report == {"orgs_checked": ORGS, "clean": True, "findings_total": 0, "findings": []}
    assert sql.val("SELECT count(*) FROM ledger WHERE kind IN ('usage', 'refund', 'expiration', 'topup')") > ORGS


def _live_credit_row(sql: Sql, org_id: str) -> dict:
    """The ledger row of the org's 50 USD operator grant (promotional credit after the signup
    grant: a few cents of usage leave it live)."""
    (row,) = sql.fetch("SELECT * FROM ledger WHERE org_id = $1 AND kind = 'grant' AND amount_micros = $2",
                       org_id, 50 * USD)
    return dict(row)


def _delete_ledger_row(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    row = _live_credit_row(sql, roles["other"])
    assert sql.val("DELETE FROM ledger WHERE entry_id = $1 RETURNING 1", row["entry_id"]) == 1
    columns = list(row)

    def repair() -> None:
        places = ", ".join(f"${i + 1}" for i in range(len(columns)))
        sql.val(f"INSERT INTO ledger ({', '.join(columns)}) VALUES ({places})", *row.values())

    return repair, {(roles["other"], "balance_equals_ledger"), (roles["other"], "grant_has_credit")}


def _snapshot_of_an_altered_org(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    org_id = roles["paid"]
    stored = sql.val("SELECT state FROM org_snapshots WHERE org_id = $1", org_id)
    org = OrgBillingActor.from_snapshot(decode_snapshot(stored), load_catalog(CATALOG_PATH))
    richest = max(org.grants, key=lambda g: g.remaining_micros)
    richest.remaining_micros -= 1  # a micro-USD the ledger never took
    assert sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", org_id,
                   encode_snapshot(org.to_snapshot())) == 1
    return (lambda: sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", org_id, stored),
            {(org_id, "balance_equals_ledger")})


def _journal_gap(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    org_id = roles["with_tail"]
    last = sql.val("SELECT max(seq) FROM org_journal WHERE org_id = $1", org_id)
    assert sql.val("UPDATE org_journal SET seq = seq + 1 WHERE org_id = $1 AND seq = $2 RETURNING 1", org_id, last) == 1
    return (lambda: sql.val("UPDATE org_journal SET seq = $2 WHERE org_id = $1 AND seq = $2 + 1 RETURNING 1",
                            org_id, last),
            {(org_id, "journal_contiguous")})


def _undecodable_journal_row(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    org_id = roles["with_tail"]
    seq, entry = sql.fetch("SELECT seq, entry FROM org_journal WHERE org_id = $1 ORDER BY seq DESC LIMIT 1", org_id)[0]
    assert sql.val("UPDATE org_journal SET entry = $3 WHERE org_id = $1 AND seq = $2 RETURNING 1", org_id, seq,
                   b"\xc1") == 1  # 0xc1: the one byte msgpack never uses
    return (lambda: sql.val("UPDATE org_journal SET entry = $3 WHERE org_id = $1 AND seq = $2 RETURNING 1", org_id,
                            seq, entry),
            {(org_id, "rebuilds")})


def _slot_moved(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    org_id = roles["other"]
    assert sql.val("UPDATE orgs SET slot = $2 WHERE org_id = $1 RETURNING 1", org_id,
                   (slot_of(org_id) + 1) % SLOT_COUNT) == 1
    return (lambda: sql.val("UPDATE orgs SET slot = $2 WHERE org_id = $1 RETURNING 1", org_id, slot_of(org_id)),
            {(org_id, "slot_of_org")})


def _payment_credited_in_a_second_org(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    paid, other = roles["paid"], roles["other"]
    assert sql.val("INSERT INTO ledger (entry_id, org_id, kind, amount_micros, idempotency_key, created_at)"
                   " VALUES ('chk_twice', $1, 'adjustment', 0, $2, now()) RETURNING 1", other,
                   f"stripe:payment:pi_{paid}") == 1
    return (lambda: sql.val("DELETE FROM ledger WHERE entry_id = 'chk_twice' RETURNING 1"),
            {(paid, "payment_credited_once"), (other, "payment_credited_once")})


def _slot_unmapped(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    assert sql.val("DELETE FROM slots WHERE slot = 7 RETURNING 1") == 1
    return lambda: sql.val("INSERT INTO slots (slot, shard) VALUES (7, 0) RETURNING 1"), {(None, "slot_map_complete")}


def _outbox_status_unknown(sql: Sql, roles: dict) -> tuple[Callable[[], None], set]:
    first = sql.val("SELECT min(id) FROM outbox")
    assert sql.val("UPDATE outbox SET status = 'sent' WHERE id = $1 RETURNING 1", first) == 1
    return (lambda: sql.val("UPDATE outbox SET status = 'pending' WHERE id = $1 RETURNING 1", first),
            {(None, "outbox_status_valid")})


@pytest.mark.parametrize("corrupt", [_delete_ledger_row, _snapshot_of_an_altered_org, _journal_gap,
                                     _undecodable_journal_row, _slot_moved, _payment_credited_in_a_second_org,
                                     _slot_unmapped, _outbox_status_unknown],
                         ids=lambda f: f.__name__.strip("_"))
def test_one_corruption_is_named_with_its_org_and_invariant(traffic, corrupt):
    url, sql, roles = traffic
    repair, expected = corrupt(sql, roles)
    try:
        assert findings_of(url) == expected
    finally:
        repair()


def test_a_finding_prints_a_table_naming_org_and_invariant(traffic):
    url, sql, roles = traffic
    repair, _ = _slot_moved(sql, roles)
    try:
        result = check(url)
    finally:
        repair()
    assert result.returncode == 3, (result.stdout, result.stderr)
    row = next(line for line in result.stdout.splitlines() if roles["other"] in line)
    assert "slot_of_org" in row and f"slot {slot_of(roles['other'])}" in row
    assert result.stdout.rstrip().endswith("1 finding (1 org)")


def test_the_database_is_clean_again_after_every_repair(traffic):
    url, _, _ = traffic
    result = check(url, "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["clean"] is True


@pytest.mark.parametrize("where", ["no such database", "nothing listening"])
def test_a_database_it_cannot_read_is_exit_code_1_and_one_line(traffic, where):
    url = database_url_named(traffic[0], "metergate_no_such_db") if where == "no such database" \
        else "postgresql://nobody@127.0.0.1:9/metergate"
    result = check(url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == "" and result.stderr.startswith("error: cannot check ") and result.stderr.count("\n") == 1


# ----- the embedded Postgres of `make up` -----------------------------------------------------


def test_without_a_database_url_it_checks_the_embedded_postgres_of_make_up(tmp_path):
    env = {"METERGATE_DATA_DIR": str(tmp_path)}
    never_migrated = check(None, **env)
    assert never_migrated.returncode == 1 and "never migrated" in never_migrated.stderr, never_migrated
    migrated = subprocess.run([str(METERGATE), "migrate"], env=_env(env), capture_output=True, text=True,
                              timeout=180, check=False)
    assert migrated.returncode == 0, migrated
    result = check(None, "--json", **env)  # migrated, but no service ever made its slot map
    assert result.returncode == 3, result
    report = json.loads(result.stdout)
    assert report["database"] == f"the embedded Postgres in {tmp_path / 'pg'}" and report["orgs_checked"] == 0
    assert {(f["org_id"], f["invariant"]) for f in report["findings"]} == {(None, "slot_map_complete")}


# ----- the comparisons alone ------------------------------------------------------------------


def _org_with_grants() -> OrgBillingActor:
    from actors.commands import execute
    from actors.effects import Effects

    catalog = load_catalog(CATALOG_PATH)
    now = int(time.time() * US)
    org = execute(None, CreateOrg("a@example.test", "payg", True), catalog, now, Effects(), org_id="org_g").org
    execute(org, Credit("grant", 7 * USD, now + 3_600 * US), catalog, now, Effects())
    return org


def test_each_grant_is_held_to_the_one_credit_entry_that_made_it():
    from actors.check import GrantEntry, check_grants

    org = _org_with_grants()
    signup, pack = org.grants
    credits = [GrantEntry(signup.grant_id, "signup_grant", signup.remaining_micros, None),
               GrantEntry(pack.grant_id, "grant", 7 * USD, pack.expires_at_us)]
    assert check_grants(org, credits) == []
    assert [(f.org_id, f.invariant) for f in check_grants(org, credits[:1])] == [("org_g", "grant_has_credit")]
    smaller = [credits[0], GrantEntry(pack.grant_id, "grant", 7 * USD - 1, pack.expires_at_us)]
    assert [f.invariant for f in check_grants(org, smaller)] == ["grant_within_credit"]
    other_expiry = [credits[0], GrantEntry(pack.grant_id, "grant", 7 * USD, None)]
    assert [f.invariant for f in check_grants(org, other_expiry)] == ["grant_matches_credit"]
    given_back = [credits[0], GrantEntry(pack.grant_id, "refund_reversal", 7 * USD, pack.expires_at_us)]
    assert check_grants(org, given_back) == []
    lapsed = credits + [GrantEntry(pack.grant_id, "expiration", -7 * USD, pack.expires_at_us)]
    assert [f.invariant for f in check_grants(org, lapsed)] == ["grant_not_expired"]


def test_the_database_wide_comparisons_name_what_differs():
    from actors.check import check_migrations, check_outbox, check_slot_map

    known = [(1, "0001_core.sql"), (2, "0002_x.sql"), (3, "0003_y.sql")]
    assert check_migrations(known, known) == []
    assert [f.invariant for f in check_migrations([known[0], known[2]], known)] == [
        "migrations_contiguous", "migrations_match_code"]
    assert "0004_z.sql applied" in check_migrations(known + [(4, "0004_z.sql")], known)[0].found
    full = {slot: slot % 2 for slot in range(SLOT_COUNT)}
    assert check_slot_map(full, {0, 1}, SLOT_COUNT) == []
    assert [f.invariant for f in check_slot_map(full, {0}, SLOT_COUNT)] == ["slot_shard_owned"]
    assert "missing 3" in check_slot_map({s: 0 for s in full if s != 3}, {0}, SLOT_COUNT)[0].found
    assert check_outbox([("pending", False, 4), ("delivered", True, 9), ("dead", False, 1)]) == []
    assert len(check_outbox([("delivered", False, 2), ("pending", True, 1), ("sent", False, 1)])) == 3
