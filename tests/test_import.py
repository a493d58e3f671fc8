"""`metergate import` (issue 22 part 2, billing-rules 2.11) against the session's service, real
Postgres, Ray and Serve: the file through the installed console script, the answers checked
against Postgres (the ledger sums to each balance) and the HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from tests.helpers import ADMIN_TOKEN

METERGATE = Path(sys.executable).parent / "metergate"


def cli(service, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update({"METERGATE_URL": service.base_url, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"})
    return subprocess.run([str(METERGATE), *args], env=env, capture_output=True, text=True, timeout=900, check=False)


def run_json(service, *args: str, code: int = 0) -> dict:
    result = cli(service, *args, "--json")
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(result.stdout)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def org_line(prefix: str, n: int) -> dict:
    """An org of the source: a balance, now and then a grant that expires, a debt, a tier, a card
    with auto-recharge, a past-due state."""
    org_id = f"{prefix}_{n}"
    line = {"org_id": org_id, "email": f"{org_id}@example.com", "balance_micros": 1_000_000 + n}
    if n % 3 == 0:
        line["grants"] = [{"id": f"{org_id}_g1", "kind": "grant", "amount_micros": 500_000,
                           "expires_at": "2031-01-01T00:00:00Z"}]
    if n % 11 == 0:  # a debt: no grants
        line["balance_micros"] = -5_000 - n
        line.pop("grants", None)
    if n % 5 == 0:
        line["tier"] = "pro"
    if n % 7 == 0:
        line["card_on_file"] = True
        line["auto_recharge"] = {"enabled": True, "threshold_micros": 1_000, "amount_micros": 5_000_000}
    if n % 13 == 0:
        line["past_due_since"] = "2026-01-05T00:00:00Z"
        line["stripe_customer_id"] = f"cus_{prefix}{n}"
    return line


def ledger_sums(sql, prefix: str) -> dict[str, int]:
    rows = sql.fetch("SELECT org_id, sum(amount_micros)::bigint AS total, count(*) AS entries FROM ledger"
                     " WHERE org_id LIKE $1 GROUP BY org_id", prefix + "\\_%")
    return {row["org_id"]: (row["total"], row["entries"]) for row in rows}


def test_ten_thousand_orgs_imported_twice_the_second_run_changes_nothing_and_every_balance_equals_the_file(
        service, sql, admin, tmp_path):
    prefix = f"imp{uuid.uuid4().hex[:6]}"
    lines = [org_line(prefix, n) for n in range(10_000)]
    path = write_lines(tmp_path / "orgs.jsonl", lines)

    first = run_json(service, "import", str(path))
    assert (first["lines"], first["created"], first["updated"], first["unchanged"], first["bad"]) == (
        10_000, 10_000, 0, 0, 0), {k: v for k, v in first.items() if k != "bad_lines"}
    after_first = ledger_sums(sql, prefix)
    assert {org: total for org, (total, _) in after_first.items()} == {
        line["org_id"]: line["balance_micros"] for line in lines}
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id LIKE $1 AND kind <> 'import'", prefix + "\\_%") == 0

    second = run_json(service, "import", str(path))
    assert (second["created"], second["updated"], second["unchanged"], second["bad"]) == (0, 0, 10_000, 0)
    assert ledger_sums(sql, prefix) == after_first  # not one entry more, every balance as it was

    for line in lines[:: 997]:  # the balance the shard holds, not only the ledger's sum
        org = admin.get(f"/v1/orgs/{line['org_id']}").json()
        assert org["balance_micros"] == line["balance_micros"], (line, org)
    pro = admin.get(f"/v1/orgs/{prefix}_35").json()  # n % 5 == 0 and n % 7 == 0
    assert (pro["tier"], pro["has_payment_method"], pro["auto_recharge"]["enabled"]) == ("pro", True, True)
    assert sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", f"{prefix}_13") == f"cus_{prefix}13"
    assert admin.get(f"/v1/orgs/{prefix}_13").json()["past_due_since"] is not None


def test_a_file_with_three_bad_lines_imports_the_rest_and_names_the_three(service, sql, tmp_path):
    prefix = f"bad{uuid.uuid4().hex[:6]}"
    lines: list = [org_line(prefix, n) for n in range(1, 21)]
    lines[3] = '{"org_id": "broken", '  # line 4: not JSON
    lines[8] = {**org_line(prefix, 9), "balance_micros": 100}  # line 9: its grant is more than its balance
    lines[14] = {**org_line(prefix, 15), "tier": "gold"}  # line 15: no such tier
    result = run_json(service, "import", str(write_lines(tmp_path / "bad.jsonl", lines)), code=1)
    assert [bad["line"] for bad in result["bad_lines"]] == [4, 9, 15], result["bad_lines"]
    assert (result["created"], result["bad"]) == (17, 3)
    imported = {f"{prefix}_{n}" for n in range(1, 21)} - {f"{prefix}_4", f"{prefix}_9", f"{prefix}_15"}
    assert set(ledger_sums(sql, prefix)) == imported
    assert {row["org_id"] for row in sql.fetch("SELECT org_id FROM orgs WHERE org_id LIKE $1", prefix + "\\_%")} \
        == imported


def test_a_dry_run_says_what_would_change_and_changes_nothing(service, sql, tmp_path):
    prefix = f"dry{uuid.uuid4().hex[:6]}"
    known = org_line(prefix, 3)  # a grant and a balance
    run_json(service, "import", str(write_lines(tmp_path / "first.jsonl", [known])))
    before = ledger_sums(sql, prefix)
    grown = {**known, "balance_micros": known["balance_micros"] + 250_000,
             "grants": known["grants"] + [{"id": f"{prefix}_3_g2", "kind": "topup", "amount_micros": 250_000}]}
    path = write_lines(tmp_path / "dry.jsonl", [org_line(prefix, 1), grown, org_line(prefix, 2)])

    result = run_json(service, "import", str(path), "--dry-run")
    assert (result["created"], result["updated"], result["unchanged"]) == (2, 1, 0)
    assert {c["line"]: (c["status"], c["changed"]) for c in result["changes"]} == {
        1: ("created", [f"import:{prefix}_1:balance"]),
        2: ("updated", [f"import:{prefix}_3_g2"]),
        3: ("created", [f"import:{prefix}_2:balance"])}
    assert ledger_sums(sql, prefix) == before
    assert sql.val("SELECT count(*) FROM orgs WHERE org_id LIKE $1", prefix + "\\_%") == 1
    text = cli(service, "import", str(path), "--dry-run")
    assert text.returncode == 0 and f"line 2: {prefix}_3: would be updated: import:{prefix}_3_g2" in text.stdout


def test_a_grant_new_in_the_source_is_imported_alone_on_a_re_run(service, sql, admin, tmp_path):
    prefix = f"grn{uuid.uuid4().hex[:6]}"
    line = org_line(prefix, 3)
    run_json(service, "import", str(write_lines(tmp_path / "a.jsonl", [line])))
    grown = {**line, "balance_micros": line["balance_micros"] + 250_000,
             "grants": line["grants"] + [{"id": f"{prefix}_3_g2", "kind": "topup", "amount_micros": 250_000}]}
    again = run_json(service, "import", str(write_lines(tmp_path / "b.jsonl", [grown, grown | {"org_id": None}])),
                     code=1)
    assert (again["updated"], again["bad"]) == (1, 1)
    keys = [row["idempotency_key"] for row in sql.fetch(
        "SELECT idempotency_key FROM ledger WHERE org_id = $1 ORDER BY created_at, idempotency_key", f"{prefix}_3")]
    assert sorted(keys) == sorted([f"import:{prefix}_3_g1", f"import:{prefix}_3:balance", f"import:{prefix}_3_g2"])
    assert admin.get(f"/v1/orgs/{prefix}_3").json()["balance_micros"] == grown["balance_micros"]
    third = run_json(service, "import", str(write_lines(tmp_path / "c.jsonl", [grown])))
    assert third["unchanged"] == 1


def test_an_org_with_one_bad_grant_or_one_refused_part_imports_nothing_of_it(service, sql, admin, new_org, tmp_path):
    prefix = f"atm{uuid.uuid4().hex[:6]}"
    bad_second = {"org_id": f"{prefix}_1", "email": "a@example.com", "balance_micros": 3_000_000,
                  "grants": [{"id": f"{prefix}_ok", "kind": "grant", "amount_micros": 1_000_000},
                             {"id": f"{prefix}_bad", "kind": "bonus", "amount_micros": 1_000_000}]}
    postpaid = new_org(billing_mode="postpaid", org_id=f"{prefix}_2")
    entries = sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", postpaid)
    balance = admin.get(f"/v1/orgs/{postpaid}").json()["balance_micros"]
    refused = {"org_id": postpaid, "email": "b@example.com", "balance_micros": 7_000_000, "billing_mode": "prepaid",
               "tier": "pro", "card_on_file": True}
    result = run_json(service, "import", str(write_lines(tmp_path / "atomic.jsonl", [bad_second, refused])), code=1)
    assert [(bad["line"], bad["org_id"]) for bad in result["bad_lines"]] == [(1, f"{prefix}_1"), (2, postpaid)]
    assert "grants.1.kind" in result["bad_lines"][0]["why"] and "billing mode" in result["bad_lines"][1]["why"]
    assert sql.val("SELECT count(*) FROM orgs WHERE org_id = $1", f"{prefix}_1") == 0
    assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", postpaid) == entries
    org = admin.get(f"/v1/orgs/{postpaid}").json()
    assert (org["balance_micros"], org["tier"], org["has_payment_method"]) == (balance, "base", False)


def test_the_import_endpoint_refuses_a_body_it_cannot_read_and_too_many_orgs(admin):
    assert admin.post("/v1/import", content=b"{").status_code == 400
    assert admin.post("/v1/import", json={"orgs": []}).status_code == 422
    assert admin.post("/v1/import", json={"orgs": [{}] * 101}).status_code == 422
    answer = admin.post("/v1/import", json={"orgs": [{"org_id": "x y"}]}).json()
    assert answer["orgs"][0]["status"] == "invalid" and answer["orgs"][0]["why"].startswith("org_id")
    # A misspelt dry run is refused, never taken as a real import.
    org = {"org_id": f"typo{uuid.uuid4().hex[:8]}", "email": "a@example.com", "balance_micros": 1_000_000}
    for typo in ({"dryrun": True}, {"dry-run": True}, {"dry_run": "yes"}):
        response = admin.post("/v1/import", json={"orgs": [org], **typo})
        assert response.status_code == 422, (typo, response.text)
    assert admin.get(f"/v1/orgs/{org['org_id']}").status_code == 404


def test_a_new_org_with_an_expired_grant_listed_first_is_never_halted_by_its_own_import(admin, sql):
    """The edge orders the amounts: spendable money first, expired grants (credited and lapsed
    at once) after it, debts last; before, the expired grant alone halted the new org and the
    balance after it resumed it: two events to the compute plane for nothing."""
    org_id = f"exp{uuid.uuid4().hex[:8]}"
    line = {"org_id": org_id, "email": "a@example.com", "balance_micros": 5_000_100,
            "grants": [{"id": f"{org_id}_old", "kind": "grant", "amount_micros": 100, "expires_at": "2023-01-01T00:00:00Z"}]}
    assert admin.post("/v1/import", json={"orgs": [line]}).json()["orgs"][0]["status"] == "created"
    state = admin.get(f"/v1/orgs/{org_id}").json()
    assert (state["balance_micros"], state["is_halted"]) == (5_000_000, False)
    assert sql.val("SELECT count(*) FROM outbox WHERE org_id = $1 AND type IN ('org.halted', 'org.resumed')",
                   org_id) == 0


def test_the_rest_of_the_balance_is_booked_once_whatever_source_id_a_re_run_names(admin):
    """The balance beyond the grants is keyed by the org: a re-run that adds a source id (or
    comes from Stripe after a file) finds it booked."""
    org_id = f"src{uuid.uuid4().hex[:8]}"
    line = {"org_id": org_id, "email": "a@example.com", "balance_micros": 12_500_000}
    assert admin.post("/v1/import", json={"orgs": [line]}).json()["orgs"][0]["status"] == "created"
    for source in ("acme-42", "cus_X"):
        again = admin.post("/v1/import", json={"orgs": [{**line, "source_id": source}]}).json()["orgs"][0]
        assert again["status"] == "unchanged", again
    assert admin.get(f"/v1/orgs/{org_id}").json()["balance_micros"] == 12_500_000


def test_from_stripe_imports_customers_with_their_credit_balance_and_credit_grants(service, admin, sql):
    """Customers whose metadata names an org, and their credit grants (tests/stripe_front.py
    serves those: localstripe has none). localstripe's customer shows no `balance` (only the
    legacy `account_balance`), so the customer balance is not part of this test."""
    import stripe

    settings = service.settings
    client = stripe.StripeClient(settings.stripe_secret_key, base_addresses={"api": settings.stripe_api_base})
    prefix = f"stp{uuid.uuid4().hex[:6]}"
    customer = client.customers.create({"email": f"{prefix}@example.com",
                                        "metadata": {"org_id": f"{prefix}_1", "tier": "pro"}})
    paid = client.billing.credit_grants.create({
        "customer": customer.id, "category": "paid", "applicability_config": {"scope": {"price_type": "metered"}},
        "amount": {"type": "monetary", "monetary": {"value": 2_800, "currency": "usd"}}, "expires_at": 1_924_992_000})
    # Invoices used 8 USD of it: what is left is imported, never the amount it was issued for.
    assert httpx.post(f"{settings.stripe_api_base}/_fake/credit_grants/{paid.id}", json={"used": 800},
                      timeout=10).status_code == 200
    client.billing.credit_grants.create({  # not in effect yet: left out
        "customer": customer.id, "category": "paid", "applicability_config": {"scope": {"price_type": "metered"}},
        "amount": {"type": "monetary", "monetary": {"value": 5_000, "currency": "usd"}},
        "effective_at": int(time.time()) + 30 * 86_400})
    promo = client.billing.credit_grants.create({
        "customer": customer.id, "category": "promotional", "applicability_config": {"scope": {"price_type": "metered"}},
        "amount": {"type": "monetary", "monetary": {"value": 1_000, "currency": "usd"}}})
    stranger = client.customers.create({"email": f"{prefix}_x@example.com"})
    env = {"METERGATE_STRIPE_SECRET_KEY": settings.stripe_secret_key,
           "METERGATE_STRIPE_API_BASE": settings.stripe_api_base}

    def run(*args: str) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
        base.update({"METERGATE_URL": service.base_url, "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN, **env})
        result = subprocess.run([str(METERGATE), "import", "--from-stripe", "--json", *args], env=base,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode in (0, 1) and result.stdout.startswith("{"), (result.returncode, result.stderr)
        return json.loads(result.stdout)

    first = run()
    assert any(bad["why"] == f"customer {stranger.id}: no metadata.org_id" for bad in first["bad_lines"])
    org = admin.get(f"/v1/orgs/{prefix}_1").json()
    assert "balance_micros" in org, [bad for bad in first["bad_lines"] if customer.id in bad["why"]
                                     or bad["org_id"] == f"{prefix}_1"]
    assert org["balance_micros"] == (2_000 + 1_000) * 10_000
    assert org["tier"] == "pro"
    assert sorted((g["kind"], g["remaining_micros"]) for g in org["grants"]) == [
        ("grant", 10_000_000), ("topup", 20_000_000)]
    keys = {row["idempotency_key"] for row in sql.fetch("SELECT idempotency_key FROM ledger WHERE org_id = $1",
                                                        f"{prefix}_1")}
    assert keys == {f"import:{paid.id}", f"import:{promo.id}"}
    assert sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", f"{prefix}_1") == customer.id
    again = run()
    assert again["created"] == 0 and again["updated"] == 0
    assert not [bad for bad in again["bad_lines"] if bad["org_id"] == f"{prefix}_1"], again["bad_lines"]
    assert admin.get(f"/v1/orgs/{prefix}_1").json()["balance_micros"] == org["balance_micros"]


def test_metergate_check_matches_an_imported_grant_to_its_import_entry():
    """actors/check.py: a grant made by an import is held to its `import` ledger entry (its
    kind is the grant's, not the entry's), and one without it is still a finding."""
    from actors.check import GrantEntry, Invariant, check_grants
    from actors.commands import ImportAmount, ImportOrg, execute
    from actors.effects import Effects
    from config.catalog import load_catalog
    from config.settings import DEFAULT_CATALOG

    fx = Effects()
    org = execute(None, ImportOrg("a@example.com", [ImportAmount("g1", "grant", 5_000_000, 1_924_992_000_000_000),
                                                    ImportAmount("o:balance", "adjustment", 7)]),
                  load_catalog(DEFAULT_CATALOG), 1_800_000_000_000_000, fx, org_id="org_check").org
    entries = [GrantEntry(e.grant_id, e.kind, e.amount_micros, e.expires_at_us) for _, e in fx.ledger if e.grant_id]
    assert [e.kind for e in entries] == ["import", "import"]
    assert check_grants(org, entries) == []
    assert [f.invariant for f in check_grants(org, entries[1:])] == [Invariant.GRANT_HAS_CREDIT]
