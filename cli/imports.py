"""`metergate import FILE` and `metergate import --from-stripe`: existing customers brought into
metergate (billing-rules 2.11), through POST /v1/import a chunk at a time.

The file is read a line at a time (JSON lines, one org per line) and never held whole: memory
stays that of one chunk whatever the file's size. A bad line (not JSON, or refused by the
service: a field wrong, a cap passed) is reported with its line number and skipped; the
others are imported. Each org is applied whole or not at all, and a re-run changes nothing, so
an import that stopped half-way (Ctrl-C, a restart) is finished by running it again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Iterator

import typer

from cli.client import Api, CliError, JsonOption, TokenOption, UrlOption
from cli.output import Output

CHUNK_ORGS = 100  # the most POST /v1/import takes at once
CHUNK_BYTES = 56 * 1024  # under the service's default body limit (64 KiB)
RETRIES = 5  # a 503 (a shard busy or restarting) is retried: what applied is unchanged the second time
PROGRESS_EVERY_S = 2.0
CENT_MICROS = 10_000


@dataclass
class Tally:
    lines: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: list[dict] = field(default_factory=list)  # {"line", "org_id", "why"}
    changes: list[dict] = field(default_factory=list)  # a dry run's: {"line", "org_id", "status", "changed"}
    notes: list[dict] = field(default_factory=list)  # an org imported with a why: {"line", "org_id", "status", "why"}

    def as_json(self, dry_run: bool) -> dict:
        out = {"dry_run": dry_run, "lines": self.lines, "created": self.created, "updated": self.updated,
               "unchanged": self.unchanged, "bad": len(self.bad), "bad_lines": self.bad, "notes": self.notes}
        if dry_run:
            out["changes"] = self.changes
        return out


def import_orgs(
    file: Annotated[str | None, typer.Argument(metavar="FILE", show_default=False,
                                               help="JSON lines: one org per line ('-': standard input).")] = None,
    from_stripe: Annotated[bool, typer.Option(
        "--from-stripe", help="Read Stripe's customers whose metadata names an org_id, with their credit balance "
                              "and credit grants (METERGATE_STRIPE_SECRET_KEY), instead of a file.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what each org's import would change; change nothing.")] = False,
    url: UrlOption = None, token_file: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """Import existing customers: balance, grants, tier, plan, card, auto-recharge, past due."""
    if (file is None) == (not from_stripe):
        raise CliError("name a FILE or --from-stripe (one of them)", exit_code=2)
    out = Output(as_json)
    if from_stripe and not dry_run:
        print(STRIPE_STILL_HOLDS, file=sys.stderr)
    lines = stripe_lines() if from_stripe else file_lines(file)
    tally = Tally()
    with Api(url, token_file) as api:
        run(api, lines, dry_run, tally, out)
    if as_json:
        out.json(tally.as_json(dry_run))
    else:
        for bad in tally.bad:
            out.line(f"line {bad['line']}: {bad['org_id'] or '-'}: {bad['why']}")
        for note in tally.notes:
            out.line(f"line {note['line']}: {note['org_id']}: {note['status']}: {note['why']}")
        for change in tally.changes:
            out.line(f"line {change['line']}: {change['org_id']}: would be {change['status']}: "
                     + ", ".join(change["changed"]))
        verb = "would be " if dry_run else ""
        out.line(f"{tally.lines} lines: {tally.created} {verb}created, {tally.updated} {verb}updated, "
                 f"{tally.unchanged} unchanged, {len(tally.bad)} bad (skipped)")
    if tally.bad:
        raise typer.Exit(1)


def run(api: Api, lines: Iterator[tuple[int, dict | str]], dry_run: bool, tally: Tally, out: Output) -> None:
    """Send the lines in chunks; a line that is not an org object is bad at once."""
    chunk: list[tuple[int, dict]] = []
    size = 0
    shown_at = time.monotonic()
    for number, line in lines:
        tally.lines += 1
        if isinstance(line, str):
            tally.bad.append({"line": number, "org_id": None, "why": line})
            continue
        line_bytes = len(json.dumps(line))
        if line_bytes > CHUNK_BYTES:
            tally.bad.append({"line": number, "org_id": line.get("org_id"),
                              "why": f"{line_bytes} bytes: a line is at most {CHUNK_BYTES}"})
            continue
        if len(chunk) == CHUNK_ORGS or size + line_bytes > CHUNK_BYTES:
            send(api, chunk, dry_run, tally)
            chunk, size = [], 0
        chunk.append((number, line))
        size += line_bytes + 2
        if not out.as_json and time.monotonic() - shown_at > PROGRESS_EVERY_S:
            shown_at = time.monotonic()
            print(f"... {tally.lines} lines: {tally.created} created, {tally.updated} updated, "
                  f"{tally.unchanged} unchanged, {len(tally.bad)} bad", file=sys.stderr, flush=True)
    if chunk:
        send(api, chunk, dry_run, tally)


def send(api: Api, chunk: list[tuple[int, dict]], dry_run: bool, tally: Tally) -> None:
    """One chunk; an org answered `failed` (its shard busy, away or in error: nothing of it
    said) is sent again with the others that failed, RETRIES times, then reported bad."""
    for attempt in range(RETRIES + 1):
        try:
            answer = api.post("/v1/import", {"orgs": [line for _, line in chunk], "dry_run": dry_run})
        except CliError:
            if api.last_status != 503 or attempt == RETRIES:
                raise
            time.sleep(0.5 * 2 ** attempt)
            continue
        again = []
        for org in answer["orgs"]:
            number, line = chunk[org["index"]]
            if org["status"] == "failed" and attempt < RETRIES:
                again.append((number, line))
            else:
                _count(org, number, dry_run, tally)
        if not again:
            return
        chunk = again
        time.sleep(0.5 * 2 ** attempt)


def _count(org: dict, number: int, dry_run: bool, tally: Tally) -> None:
    status = org["status"]
    if status in ("invalid", "refused", "failed"):
        tally.bad.append({"line": number, "org_id": org.get("org_id"), "why": org["why"]})
        return
    setattr(tally, status, getattr(tally, status) + 1)
    if org.get("why"):  # imported, with something to say (a Stripe customer not linked)
        tally.notes.append({"line": number, "org_id": org["org_id"], "status": status, "why": org["why"]})
    if dry_run and status != "unchanged":
        tally.changes.append({"line": number, "org_id": org["org_id"], "status": status,
                              "changed": org["changed"]})


def file_lines(path: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, the org, or why the line is bad), blank lines skipped."""
    try:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="strict")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        number = 0
        while True:
            try:
                text = handle.readline()
            except UnicodeDecodeError:
                number += 1
                yield number, "not UTF-8"
                continue
            if not text:
                return
            number += 1
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError as exc:
                yield number, f"not JSON: {exc}"
                continue
            yield number, line if isinstance(line, dict) else "not a JSON object"


STRIPE_STILL_HOLDS = (
    "note: Stripe still holds these customers' credit balances and credit grants after the import, and applies "
    "them to their invoices as well; void the grants and zero the balances in Stripe once the orgs are billed "
    "by metergate (docs/operations/import.md)")


def stripe_lines() -> Iterator[tuple[int, dict | str]]:
    """Stripe's customers as import lines, numbered in the order Stripe lists them: the org of
    `metadata.org_id` (a customer without one is skipped as a bad line), its email, its credit
    balance (Stripe's customer balance, negative when it is credit) and its live credit grants
    (`paid` ones as topup, `promotional` as grant), a card on file if it has a default payment
    method (none leaves the org's as it is); `metadata.tier`, `metadata.plan_id` and `metadata.billing_mode` when there."""
    from config.settings import SettingsError, load_settings, stripe_client

    try:
        client = stripe_client(load_settings(), max_network_retries=2)
    except (SettingsError, ValueError) as exc:
        raise CliError(f"--from-stripe: {exc}") from None
    if client is None:
        raise CliError("--from-stripe needs METERGATE_STRIPE_SECRET_KEY")
    now_s = time.time()
    for number, customer in enumerate(client.customers.list({"limit": 100}).auto_paging_iter(), start=1):
        yield number, _line_of(client, customer.to_dict(), now_s)


def _left_of(client, customer_id: str, grant_id: str) -> int:
    """What is left of a credit grant, in cents: its amount less what invoices used (Stripe's
    credit balance summary of that grant), never the amount it was issued for."""
    summary = client.v1.billing.credit_balance_summary.retrieve(
        {"customer": customer_id, "filter": {"type": "credit_grant", "credit_grant": grant_id}}).to_dict()
    return sum(int(((b.get("available_balance") or {}).get("monetary") or {}).get("value") or 0)
               for b in summary.get("balances") or ())


def _line_of(client, customer, now_s: float) -> dict | str:
    metadata = dict(customer.get("metadata") or {})
    org_id = metadata.get("org_id")
    if not org_id:
        return f"customer {customer['id']}: no metadata.org_id"
    if customer.get("balance") and (customer.get("currency") or "usd").lower() != "usd":
        return f"customer {customer['id']}: its balance is in {customer['currency']}, not USD"
    grants = []
    listed = client.v1.billing.credit_grants.list({"customer": customer["id"], "limit": 100}).auto_paging_iter()
    for grant in (g.to_dict() for g in listed):
        if grant.get("voided_at") or (grant.get("expires_at") and grant["expires_at"] <= now_s):
            continue
        if grant.get("effective_at") and grant["effective_at"] > now_s:
            continue  # not spendable yet: the org gets it only if imported again once it is
        monetary = (grant.get("amount") or {}).get("monetary") or {}
        if (monetary.get("currency") or "usd").lower() != "usd":
            return f"customer {customer['id']}: credit grant {grant['id']} is not in USD"
        grants.append({"id": grant["id"], "kind": "topup" if grant.get("category") == "paid" else "grant",
                       "amount_micros": _left_of(client, customer["id"], grant["id"]) * CENT_MICROS,
                       **({"expires_at": int(grant["expires_at"])} if grant.get("expires_at") else {})})
    grants = [g for g in grants if g["amount_micros"] > 0]
    credit = -int(customer.get("balance") or 0) * CENT_MICROS  # Stripe: negative is what the customer has
    invoice_settings = customer.get("invoice_settings") or {}
    line = {"org_id": org_id, "email": customer.get("email") or f"{org_id}@unknown.invalid",
            "source_id": customer["id"], "stripe_customer_id": customer["id"],
            "balance_micros": credit + sum(g["amount_micros"] for g in grants), "grants": grants}
    if invoice_settings.get("default_payment_method") or customer.get("default_source"):
        line["card_on_file"] = True  # none in Stripe says nothing of a card metergate may hold
    for name in ("tier", "plan_id", "billing_mode"):
        if metadata.get(name):
            line[name] = metadata[name]
    return line
