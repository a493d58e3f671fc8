"""`metergate check`: every invariant of the database, read from Postgres directly.

For after a restore, a failover or a bug: it needs no running service (the restore runbook
runs it with the shards stopped), only the database, which it never writes. Orgs are read a
page at a time (keyset by org id), each page in one read-only repeatable-read transaction,
and rebuilt as a shard would load them. Exit code 3 when something is inconsistent (a
finding), 1 when the check could not be made.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated

import typer

from cli.client import CliError, JsonOption
from cli.local import database
from cli.output import Output, Tracker

FINDINGS_EXIT_CODE = 3
BATCH_ORGS = 500
GLOBAL_ROWS_SHOWN = 1_000  # duplicate payments and journal orphans listed at most


def check(database_url: Annotated[str | None, typer.Option(
              "--database-url", show_default=False, metavar="URL",
              help="The database. Default: $METERGATE_DATABASE_URL, else the embedded Postgres of `make up` in "
                   "$METERGATE_DATA_DIR/pg (started for the run if it is not running).")] = None,
          batch: Annotated[int, typer.Option("--batch", min=1, max=10_000,
                                             help="Orgs read per page (memory grows with it).")] = BATCH_ORGS,
          as_json: JsonOption = False) -> None:
    """Verify every invariant over the whole database, org by org.

    Each org's snapshot must decode and its journal tail replay (as a shard loads it), with
    its seqs contiguous; its balance must equal SUM(ledger.amount_micros); each grant it holds
    must match its credit entry; its slot must be its hash's. Then the whole: the slot map,
    Stripe payments credited once, outbox statuses, schema_migrations. Works with the
    service stopped; catalog from $METERGATE_CATALOG, as the shards read it. Exit code 3
    when a finding is made, 1 when the check could not run."""
    from config.catalog import CatalogError, load_catalog
    from config.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        catalog = load_catalog(settings.catalog)
    except (SettingsError, CatalogError) as exc:
        raise CliError(str(exc)) from None
    out = Output(as_json)
    with out.progress("check: connecting") as tracker, database(settings, database_url) as (url, where):
        try:
            report = asyncio.run(_check(url, catalog, batch, tracker))
        except CliError as exc:
            raise CliError(f"cannot check {where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - asyncpg and OS errors alike: one line naming the database
            raise CliError(f"cannot check {where}: {type(exc).__name__}: {exc}") from None
    orgs, findings = report
    _print(out, where, orgs, findings)
    if findings.total:
        raise typer.Exit(FINDINGS_EXIT_CODE)


async def _check(url: str, catalog, batch: int, tracker: Tracker):
    import asyncpg

    from actors import check as rules
    from storage import check as reads
    from storage import clock_offset
    from storage.db import migration_files
    from storage.slots import SLOT_COUNT

    findings = rules.Findings()
    conn = await asyncpg.connect(url)
    try:
        if not await reads.is_migrated(conn):
            raise CliError("it holds no schema_migrations table (not a metergate database, or never migrated: "
                           "metergate migrate)")
        known = [(version, name) for version, name, _ in migration_files()]
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            findings.add(rules.check_migrations(await reads.applied_migrations(conn), known))
            slots, owned = await reads.slot_map(conn)
            findings.add(rules.check_slot_map(slots, owned, SLOT_COUNT))
            findings.add(rules.check_outbox(await reads.outbox_statuses(conn)))
            findings.add(rules.check_journal_orphans(await reads.journal_orphans(conn, GLOBAL_ROWS_SHOWN)))
            findings.add(rules.check_payments(await reads.payments_credited_twice(conn, GLOBAL_ROWS_SHOWN)))
            now_us, org_count = await reads.now_and_org_count(conn)
            cutoff_us = rules.usage_cutoff_us(now_us, await clock_offset.offset_us(conn))
        tracker.advance(0, description="check: orgs", total=org_count)
        checked, after = 0, None
        while True:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                page = await reads.org_page(conn, after, batch)
                if not page:
                    break
                findings.add(await _check_page(conn, page, catalog, cutoff_us))
            checked += len(page)
            after = page[-1].org_id
            tracker.advance(len(page), total=max(org_count, checked))
    finally:
        await conn.close()
    return checked, findings


async def _check_page(conn, page, catalog, cutoff_us: int) -> list:
    """One page of orgs: snapshots (read with the page), journal tails, ledger sums, then the
    ledger rows of the grants the rebuilt orgs hold."""
    from actors import check as rules
    from storage import check as reads

    org_ids = [row.org_id for row in page]
    tails = await reads.journal_tails(conn, org_ids)
    sums = await reads.ledger_sums(conn, org_ids, cutoff_us)
    found, rebuilt = [], []
    for row in page:
        total = sums.get(row.org_id) or reads.LedgerSums(0, 0, 0, None)
        stored = rules.StoredOrg(row.org_id, row.slot, row.billing_mode, row.snapshot_seq, row.state,
                                 tails.get(row.org_id, []), total.balance_micros, total.newest_grant_no,
                                 total.future_usage_rows, total.newest_usage_us)
        org_findings, org = rules.check_org(stored, catalog)
        found += org_findings
        if org is not None:
            rebuilt.append(org)
    pairs = [(org.org_id, grant_id) for org in rebuilt for grant_id in rules.grants_to_look_up(org)]
    entries = await reads.grant_entries(conn, pairs)
    for org in rebuilt:
        found += rules.check_grants(org, [rules.GrantEntry(*e) for e in entries.get(org.org_id, [])])
    return found


def _print(out: Output, where: str, orgs: int, findings) -> None:
    kept = findings.kept
    if out.as_json:
        out.json({"database": where, "orgs_checked": orgs, "clean": findings.total == 0,
                  "findings_total": findings.total, "findings": [asdict(f) for f in kept]})
        return
    if kept:
        out.table(None, ["org", "invariant", "expected", "found"],
                  [[f.org_id or "(database)", str(f.invariant), f.expected, f.found] for f in kept],
                  wrap=("expected", "found"))
    plural = "" if orgs == 1 else "s"
    if not findings.total:
        out.line(f"check: {orgs} org{plural} in {where}: every invariant holds")
        return
    shown = "" if len(kept) == findings.total else f", {len(kept)} shown"
    of_orgs = len({f.org_id for f in kept if f.org_id is not None})
    of_database = any(f.org_id is None for f in kept)
    out.line(f"check: {orgs} org{plural} in {where}: {findings.total} finding{'' if findings.total == 1 else 's'}"
             f" ({of_orgs} org{'' if of_orgs == 1 else 's'}{', and the database as a whole' if of_database else ''}"
             f"{shown})")
