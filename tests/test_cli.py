"""The `metergate` command line, run as the installed console script against the session's
service: each command prints what it claims (checked against the HTTP API and Postgres), and
every failure is one line on stderr with a non-zero exit code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import psutil
import pytest
import ray

from actors.org import OrgSnapshot
from actors.placement import NAMESPACE, shard_name, slot_of
from cli.output import parse_usd, usd
from storage.db import migration_files
from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN, SIGNUP_MICROS, fake_sessions, free_port, wait_for

METERGATE = Path(sys.executable).parent / "metergate"  # the console script the project installs
WAIT_S = 60


def cli(service, *args: str, token: str | None = ADMIN_TOKEN, **env: str) -> subprocess.CompletedProcess:
    """Run `metergate ARGS` against the service; env adds or overrides variables."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("METERGATE_") and k not in ("COLUMNS", "LINES")}
    base.update({"METERGATE_URL": service.base_url, "COLUMNS": "200"})
    if token is not None:
        base["METERGATE_ADMIN_TOKEN"] = token
    return subprocess.run([str(METERGATE), *args], env={**base, **env}, capture_output=True, text=True, timeout=180,
                          check=False)


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a run that must have succeeded, quietly: nothing on stderr."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def ok_json(result: subprocess.CompletedProcess):
    return json.loads(ok(result))


def one_error_line(result: subprocess.CompletedProcess, exit_code: int = 1) -> str:
    """A failed run: the exit code, nothing on stdout, exactly one line on stderr, no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def new_org_id(prefix: str = "cli") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextmanager
def kept_in_memory(compute, org_id: str):
    """Gate checks every 0.2 s: the org stays loaded (the session passivates orgs idle for 1 s)."""
    stop = threading.Event()

    def touch() -> None:
        while not stop.is_set():
            compute.post("/v1/gate", json={"org_id": org_id, "action": "create"})
            stop.wait(0.2)

    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----- money for people ---------------------------------------------------------------------


def test_money_prints_rounded_to_the_cent_and_parses_exactly():
    assert usd(4_668_800) == "$4.67"
    assert usd(4_665_000) == "$4.67" and usd(-4_665_000) == "-$4.67"  # half a cent away from zero
    assert usd(4_664_999) == "$4.66"
    assert usd(-1_234_567_890) == "-$1,234.57"
    assert usd(0) == usd(-4_999) == "$0.00"  # no sign on what rounds to nothing
    assert usd(5_000) == "$0.01"
    assert parse_usd("12.50") == parse_usd("$12.5") == 12_500_000
    assert parse_usd("0.000001") == 1 and parse_usd("7") == 7_000_000
    for bad in ("", "1.2345678", "-1", "1e3", "1,000", "$", ".5"):
        with pytest.raises(ValueError):
            parse_usd(bad)


# ----- orgs, credit, halt, ledger, tokens ---------------------------------------------------


def test_the_console_script_is_installed():
    assert METERGATE.is_file(), f"{METERGATE} is missing: pip install -e . installs it"


def test_orgs_create_then_show_the_balance_and_a_grant_changes_it(service, admin, compute):
    org = new_org_id()
    created = ok_json(cli(service, "orgs", "create", org, "--email", f"{org}@example.com", "--json"))
    assert created["org_id"] == org and created["balance_micros"] == SIGNUP_MICROS
    assert ok_json(cli(service, "orgs", "show", org, "--json")) == admin.get(f"/v1/orgs/{org}").json()

    again = ok(cli(service, "orgs", "create", org, "--email", f"{org}@example.com"))
    assert f"already exists: {org}" in again and "$5.00" in again

    entry = ok_json(cli(service, "credits", "grant", org, "2.50", "--note", "from the cli", "--json"))
    assert (entry["kind"], entry["amount_micros"], entry["note"]) == ("grant", 2_500_000, "from the cli")
    assert entry["balance_micros"] == SIGNUP_MICROS + 2_500_000
    exact = ok_json(cli(service, "credits", "grant", org, "1234567", "--micros", "--json"))
    assert exact["amount_micros"] == 1_234_567

    balance = SIGNUP_MICROS + 2_500_000 + 1_234_567  # 8.734567 USD
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == balance
    assert ok_json(cli(service, "orgs", "show", org, "--json"))["balance_micros"] == balance
    shown = ok(cli(service, "orgs", "show", org))
    assert "$8.73" in shown and "8.734567" not in shown and "8734567" not in shown
    assert "none (nothing running" in shown
    assert compute.post("/v1/leases", json={"org_id": org, "lease_id": "sbx_cli", "ttl_s": 600, "resources": {
        "memory_mb": 4096, "cpu_count": 2}}).status_code == 201
    assert "3164 min at $0.17/h" in ok(cli(service, "orgs", "show", org))  # 8,734,567 × 3,600 / 165,600 s
    assert "granted $1.23 to" in ok(cli(service, "credits", "grant", org, "1.23"))


def test_orgs_list_pages_in_org_id_order(service, admin):
    prefix = new_org_id("cli_list")
    orgs = [f"{prefix}_{n}" for n in range(3)]
    for org in orgs:
        ok(cli(service, "orgs", "create", org, "--email", f"{org}@example.com", "--postpaid", "--json"))

    first = ok_json(cli(service, "orgs", "list", "--cursor", prefix, "--limit", "2", "--json"))
    assert [o["org_id"] for o in first["orgs"]] == orgs[:2]
    assert first["has_more"] and first["next_cursor"] == orgs[1]
    listed = first["orgs"][0]
    assert listed["email"] == f"{orgs[0]}@example.com" and listed["billing_mode"] == "postpaid"
    assert listed["shard"] == service.slot_map[slot_of(orgs[0])]

    rest = ok_json(cli(service, "orgs", "list", "--cursor", first["next_cursor"], "--limit", "2", "--all", "--json"))
    ids = [o["org_id"] for o in rest["orgs"]]
    assert ids[0] == orgs[2] and ids == sorted(set(ids)) and rest["next_cursor"] is None

    table = ok(cli(service, "orgs", "list", "--cursor", prefix, "--limit", "2"))
    assert orgs[0] in table and orgs[1] in table and orgs[2] not in table
    assert f"more with --cursor {orgs[1]}" in table


def test_halt_makes_the_gate_deny_and_resume_lifts_it(service, compute, new_org):
    org = new_org()
    assert f"{org}: halted (admin)" in ok(cli(service, "halt", org))
    decision = compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()
    assert (decision["allowed"], decision["reason"]) == (False, "halted")

    resumed = ok_json(cli(service, "resume", org, "--json"))
    assert resumed["is_halted"] is False
    assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).json()["allowed"] is True


def test_orgs_tier_opens_a_checkout_then_changes_the_one_subscription(service, admin, new_org):
    org = new_org()
    first = ok(cli(service, "orgs", "tier", org, "pro"))
    assert f"{org} has no subscription yet: its owner subscribes at http" in first
    (session,) = [s for s in fake_sessions(service, org) if s["mode"] == "subscription"]
    subscribed = httpx.post(f"{service.settings.stripe_api_base}/_fake/sessions/{session['id']}/complete",
                            timeout=30).json()
    changed = ok(cli(service, "orgs", "tier", org, "pro_plus"))
    assert f"subscription {subscribed['subscription']} moved from pro to pro_plus (create_prorations)" in changed
    again = ok_json(cli(service, "orgs", "tier", org, "pro_plus", "--json"))
    assert (again["updated"], again["tier"]) == (False, "pro_plus")


def test_ledger_lists_the_grant_newest_first(service, new_org):
    org = new_org()
    ok(cli(service, "credits", "grant", org, "3", "--note", "welcome back"))
    page = ok_json(cli(service, "ledger", org, "--json"))
    kinds = [(e["kind"], e["amount_micros"]) for e in page["entries"]]
    assert kinds == [("grant", 3_000_000), ("signup_grant", SIGNUP_MICROS)]
    assert page["entries"][0]["note"] == "welcome back" and page["has_more"] is False

    table = ok(cli(service, "ledger", org))
    assert "grant" in table and "$3.00" in table and "welcome back" in table and "$5.00" in table
    assert "2 entries" in table


def test_a_minted_token_opens_the_org_billing_page(service, new_org):
    org, other = new_org(), new_org()
    minted = ok_json(cli(service, "tokens", "mint", org, "--ttl", "600", "--json"))
    assert minted["org_id"] == org and minted["token"].startswith("mgo_")
    headers = {"Authorization": f"Bearer {minted['token']}"}
    assert httpx.get(f"{service.base_url}/billing/{org}", headers=headers, timeout=30).status_code == 200
    with httpx.Client(follow_redirects=True, timeout=30) as browser:  # the link: the token in its query
        assert browser.get(minted["billing_url"]).status_code == 200
    assert httpx.get(f"{service.base_url}/billing/{other}", headers=headers, timeout=30).status_code == 403

    printed = ok(cli(service, "tokens", "mint", org)).splitlines()
    assert printed[0].startswith("mgo_") and printed[2].startswith(f"billing page: {service.base_url}/billing/{org}")


# ----- the outbox ---------------------------------------------------------------------------


def test_outbox_lists_the_halt_event_and_retry_sends_a_dead_letter_again(service, sql, new_org):
    org = new_org()
    ok(cli(service, "halt", org))

    def halted_event(status: str):
        events = ok_json(cli(service, "outbox", "list", "--status", status, "--limit", "500", "--json"))["events"]
        return next((e for e in events if e["org_id"] == org and e["type"] == "org.halted"), None)

    event = wait_for("the org.halted event to be delivered", lambda: halted_event("delivered"), WAIT_S)
    assert event["id"] in ok(cli(service, "outbox", "list", "--status", "delivered", "--limit", "500"))
    refused = one_error_line(cli(service, "outbox", "retry", event["id"]))
    assert refused == f"error: not_dead: {event['id']} is delivered, not dead"

    sql.val("UPDATE outbox SET status = 'dead' WHERE message_id = $1 RETURNING id", event["id"])
    assert halted_event("dead")["id"] == event["id"]
    assert f"{event['id']}: pending again" in ok(cli(service, "outbox", "retry", event["id"]))
    wait_for("the retried event to be delivered again", lambda: sql.val(
        "SELECT status FROM outbox WHERE message_id = $1", event["id"]) == "delivered", WAIT_S)


# ----- parity and replay --------------------------------------------------------------------


def test_parity_over_every_shard_reports_no_drift(service, compute, new_org):
    org = new_org()
    shard = service.slot_map[slot_of(org)]
    with kept_in_memory(compute, org):
        def run():
            report = ok_json(cli(service, "parity", "--json"))
            return report if report["shards"][shard]["checked"] >= 1 else None

        report = wait_for("a parity run that checked the org's shard", run, WAIT_S)
        assert report["shard_count"] == service.settings.shards
        assert [s["shard"] for s in report["shards"]] == list(range(service.settings.shards))
        assert report["drift"] == [] and report["checked"] == sum(s["checked"] for s in report["shards"])

        one = ok_json(cli(service, "parity", "--shard", str(shard), "--json"))
        assert [s["shard"] for s in one["shards"]] == [shard] and one["drift"] == []
        assert "0 drift" in ok(cli(service, "parity"))
    assert "must be between" in one_error_line(cli(service, "parity", "--shard", "99"))


def test_replay_matches_memory_and_finds_an_org_whose_journal_differs(service, admin, compute, sql, new_org):
    org = new_org()
    shard = service.slot_map[slot_of(org)]
    assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000}).status_code == 201
    # Compacted to a snapshot first: no later snapshot of memory can undo the change below.
    wait_for("the org's journal to be compacted", lambda: sql.val(
        "SELECT count(*) FROM org_journal WHERE org_id = $1", org) == 0, WAIT_S)

    report = ok_json(cli(service, "replay", org, "--json"))
    assert report == {"shard": shard, "org_id": org, "match": True}
    assert f"{org} (shard {shard}): rebuilt from its snapshot and journal, matches memory" in ok(
        cli(service, "replay", org))

    handle = ray.get_actor(shard_name(shard), namespace=NAMESPACE)
    stored = sql.fetch("SELECT state FROM org_snapshots WHERE org_id = $1", org)[0]["state"]
    with kept_in_memory(compute, org):
        wait_for("the org in memory", lambda: ray.get(handle.loaded.remote([org])) == [True], WAIT_S)
        drifted = msgspec.msgpack.decode(stored, type=OrgSnapshot)
        drifted.grants[0].remaining_micros += 1  # Postgres now says one micro-USD more than memory
        sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", org,
                msgspec.msgpack.encode(drifted))
        try:
            found = cli(service, "replay", org, "--json")
            assert found.returncode == 3, (found.stdout, found.stderr)
            assert json.loads(found.stdout) == {"shard": shard, "org_id": org, "match": False}
            assert "DIFFERS from memory" in cli(service, "replay", org).stdout
        finally:
            sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", org, stored)
        assert ok_json(cli(service, "replay", org, "--json"))["match"] is True

    assert "unknown_org" in one_error_line(cli(service, "replay", "cli_no_such_org"))


# ----- failures: one line, a non-zero exit --------------------------------------------------


@pytest.mark.parametrize("args", [["orgs", "list"], ["orgs", "show", "org_x"], ["parity", "--json"],
                                  ["outbox", "list"], ["credits", "grant", "org_x", "1"]])
def test_a_bad_token_is_one_line_and_exit_1(service, args, tmp_path):
    held = tmp_path / "token"
    held.write_text("mg_adm_not-the-token-0123456789\n")  # from a file: a command line shows in `ps`
    line = one_error_line(cli(service, *args, "--token-file", str(held)))
    assert line.startswith("error: unauthorized: invalid token")


def test_a_service_token_is_refused_by_the_admin_commands(service):
    assert one_error_line(cli(service, "orgs", "list", token=SERVICE_TOKEN)).startswith("error: forbidden:")


def test_a_service_that_is_down_is_one_line_and_exit_1(service):
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["orgs", "list"], ["replay", "org_x", "--json"], ["parity"]):
        line = one_error_line(cli(service, *args, "--url", url))
        assert line == f"error: cannot reach metergate at {url}: connection refused"


def test_unknown_orgs_and_bad_usage_are_one_line(service):
    assert one_error_line(cli(service, "orgs", "show", "cli_nobody")) == \
        "error: unknown_org: org cli_nobody does not exist"
    assert "Missing argument" in one_error_line(cli(service, "orgs", "show"), exit_code=2)
    assert "No such command" in one_error_line(cli(service, "orgs", "delete", "x"), exit_code=2)
    assert "USD" in one_error_line(cli(service, "credits", "grant", "x", "1.5.0"), exit_code=2)


def test_without_a_token_the_one_make_up_keeps_in_the_data_dir_is_used(service, new_org, tmp_path):
    org = new_org()
    missing = one_error_line(cli(service, "orgs", "show", org, token=None, METERGATE_DATA_DIR=str(tmp_path)))
    assert "no admin token" in missing and str(tmp_path / "tokens.json") in missing
    (tmp_path / "tokens.json").write_text(json.dumps({"service_token": SERVICE_TOKEN, "admin_token": ADMIN_TOKEN}))
    shown = ok_json(cli(service, "orgs", "show", org, "--json", token=None, METERGATE_DATA_DIR=str(tmp_path)))
    assert shown["org_id"] == org


# ----- migrate, up, bench -------------------------------------------------------------------


def _on_postgres(url: str, statement: str):
    async def run():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(statement)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_migrate_applies_every_migration_to_a_fresh_database_once(service):
    every = [name for _, name, _ in migration_files()]
    server_url = service.settings.database_url
    name = f"metergate_cli_{uuid.uuid4().hex[:10]}"
    url = urlsplit(server_url)._replace(path=f"/{name}").geturl()  # the embedded one's host is a path
    _on_postgres(server_url, f'CREATE DATABASE "{name}"')
    try:
        first = ok_json(cli(service, "migrate", "--json", METERGATE_DATABASE_URL=url))
        assert first["applied"] == every and first["migrations"] == every
        rows = _on_postgres(url, "SELECT name FROM schema_migrations ORDER BY version")
        assert [r["name"] for r in rows] == every
        assert ok_json(cli(service, "migrate", "--json", METERGATE_DATABASE_URL=url))["applied"] == []
        assert "is up to date" in ok(cli(service, "migrate", METERGATE_DATABASE_URL=url))
    finally:
        _on_postgres(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_without_a_database_url_uses_the_embedded_postgres(service, tmp_path):
    report = ok_json(cli(service, "migrate", "--json", METERGATE_DATA_DIR=str(tmp_path)))
    assert report["applied"] == [name for _, name, _ in migration_files()]
    assert report["database"] == f"the embedded Postgres in {tmp_path / 'pg'}"
    assert ok_json(cli(service, "migrate", "--json", METERGATE_DATA_DIR=str(tmp_path)))["applied"] == []
    bad = cli(service, "migrate", METERGATE_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert "cannot migrate postgresql://nobody@127.0.0.1" in one_error_line(bad)


def test_up_and_bench_explain_themselves(service):
    assert "python -m serve_app.main" in ok(cli(service, "up", "--help"))
    bench = ok(cli(service, "bench", "--help"))
    for name in ("gate", "usage", "memory", "recovery", "all"):
        assert name in bench
    assert "bench all prints a summary" in one_error_line(cli(service, "bench", "all", "--json"), exit_code=2)
    assert "nosuch" in one_error_line(cli(service, "bench", "nosuch"), exit_code=2)


def test_the_benchmark_runner_keeps_stdout_for_the_json_result_and_dies_with_the_cli(tmp_path):
    """What `metergate bench` starts: with --json, all a benchmark and its processes print goes
    to stderr and its result to stdout; and it gets SIGTERM once the CLI is gone (kill -9)."""
    env = {**os.environ, "METERGATE_BENCH_PARENT": str(os.getpid())}
    run = subprocess.run([sys.executable, "-m", "cli.bench_run", "tests.cli_bench_probe", "--json"], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
                         check=True)
    assert json.loads(run.stdout) == {"ticks_per_s": 12_345, "rounds": [1, 2, 3]}
    for line in ("probe: measuring", "probe: a log line", "probe: from a child process"):
        assert line in run.stderr

    stand_in = ("import os, subprocess, sys, time\n"  # starts the runner as the CLI does, prints its pid, waits
                "env = {**os.environ, 'METERGATE_BENCH_PARENT': str(os.getpid()), 'PROBE_SLEEP_S': '120'}\n"
                "runner = subprocess.Popen([sys.executable, '-m', 'cli.bench_run', 'tests.cli_bench_probe'], env=env)\n"
                "print(runner.pid, flush=True)\n"
                "time.sleep(120)\n")
    cli_stand_in = subprocess.Popen([sys.executable, "-c", stand_in], cwd=Path(__file__).resolve().parent.parent,
                                    stdout=subprocess.PIPE, text=True)
    runner = psutil.Process(int(cli_stand_in.stdout.readline()))
    try:
        wait_for("the runner to start the probe", lambda: "tests.cli_bench_probe" in " ".join(runner.cmdline()), 30)
        cli_stand_in.kill()
        cli_stand_in.wait()
        wait_for("the orphaned runner to end", lambda: not runner.is_running()
                 or runner.status() == psutil.STATUS_ZOMBIE, 30)
    finally:
        if cli_stand_in.poll() is None:
            cli_stand_in.kill()
        if runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE:
            runner.kill()
