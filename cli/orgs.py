"""Orgs and their money: `orgs create|tier|show|list`, `credits grant`, `halt`, `resume`, `ledger`,
`tokens mint`. Each is one admin call (or a run of pages) to the HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.client import Api, CliError, JsonOption, TokenOption, UrlOption
from cli.output import Output, parse_usd, usd, when

orgs_app = typer.Typer(help="Create, show and list orgs.", no_args_is_help=True)
credits_app = typer.Typer(help="Give an org credit.", no_args_is_help=True)
tokens_app = typer.Typer(help="Org tokens (the billing page and self-serve endpoints of one org).",
                         no_args_is_help=True)

OrgArg = Annotated[str, typer.Argument(help="The org's id.", show_default=False)]
IdempotencyKey = Annotated[str | None, typer.Option(
    "--idempotency-key", help="Send this Idempotency-Key: the same key again returns the first answer "
                              "instead of doing it twice.")]
MAX_PAGE = 500


@orgs_app.command("create")
def create(org_id: OrgArg,
           email: Annotated[str, typer.Option("--email", help="The org's billing contact.", show_default=False)],
           plan: Annotated[str | None, typer.Option("--plan", help="A plan id of the catalog (default: the "
                                                                    "catalog's default plan).")] = None,
           postpaid: Annotated[bool, typer.Option("--postpaid", help="Bill usage afterwards instead of from "
                                                                     "prepaid credit.")] = False,
           idempotency_key: IdempotencyKey = None,
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Create an org; one that exists already is shown as it is.

    The signup grant of its plan is applied once."""
    body = {"org_id": org_id, "email": email, "billing_mode": "postpaid" if postpaid else "prepaid"}
    if plan:
        body["plan_id"] = plan
    with Api(url, token) as api:
        state = api.post("/v1/orgs", body, idempotency_key)
        created = api.last_status == 201
    out = Output(as_json)
    if out.as_json:
        return out.json(state)
    out.line(f"{'created' if created else 'already exists:'} {org_id}")
    show_state(out, state)


@orgs_app.command("tier")
def tier(org_id: OrgArg,
         tier_name: Annotated[str, typer.Argument(metavar="TIER", help="A paid tier of the catalog's "
                                                                       "[stripe_prices] or [tier_monthly_micros].",
                                                   show_default=False)],
         idempotency_key: IdempotencyKey = None,
         url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Put an org on a paid tier through Stripe.

    An org already subscribed has its one subscription moved to the tier's price (billed as
    METERGATE_STRIPE_PRORATION_BEHAVIOR says); otherwise this prints the Checkout URL its owner
    must open. The tier itself changes when Stripe reports the subscription. Back to the base
    tier is a cancel, in the customer portal."""
    with Api(url, token) as api:
        answer = api.post(f"/v1/orgs/{org_id}/checkout/tier", {"tier": tier_name}, idempotency_key)
    out = Output(as_json)
    if out.as_json:
        return out.json(answer)
    if "updated" not in answer:
        out.line(f"{org_id} has no subscription yet: its owner subscribes at {answer['url']}")
    elif answer["updated"]:
        out.line(f"{org_id}: subscription {answer['subscription_id']} moved from {answer.get('previous_tier')} to "
                 f"{answer['tier']} ({answer.get('proration_behavior')}); the tier follows when Stripe reports it")
    else:
        out.line(f"{org_id}: subscription {answer['subscription_id']} is on {answer['tier']} already")


@orgs_app.command("show")
def show(org_id: OrgArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Show an org: balance, grants, period, halt, leases, plan."""
    with Api(url, token) as api:
        state = api.get(f"/v1/orgs/{org_id}")
    out = Output(as_json)
    if out.as_json:
        return out.json(state)
    show_state(out, state)


@orgs_app.command("list")
def list_orgs(limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE, help="Orgs per page.")] = 100,
              cursor: Annotated[str | None, typer.Option("--cursor", help="Start after this org id (the "
                                                                           "next_cursor of a page).")] = None,
              every: Annotated[bool, typer.Option("--all", help="Every page, not just one.")] = False,
              url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List orgs in org_id order, a page at a time.

    Each with its email, billing mode and shard; `orgs show` has the balance."""
    out = Output(as_json)
    with Api(url, token) as api:
        orgs, next_cursor = pages(out, "listing orgs", "orgs", every,
                                  lambda after: api.get("/v1/orgs", {"limit": limit, "cursor": after}), cursor)
    if out.as_json:
        return out.json({"orgs": orgs, "next_cursor": next_cursor, "has_more": next_cursor is not None})
    out.table(None, ["org", "email", "billing", "shard", "created"],
              [[o["org_id"], o["email"], o["billing_mode"], str(o["shard"]), when(o["created_at"])] for o in orgs],
              right=("shard",), wrap=("email",))
    more(out, len(orgs), "org", next_cursor)


@credits_app.command("grant")
def grant(org_id: OrgArg,
          amount: Annotated[str, typer.Argument(help="USD, like 25 or 12.50 (with --micros: integer micro-USD).",
                                                show_default=False)],
          micros: Annotated[bool, typer.Option("--micros", help="AMOUNT is in micro-USD.")] = False,
          expires_at: Annotated[str | None, typer.Option("--expires-at", help="When the grant lapses "
                                                                               "(RFC 3339 or epoch).")] = None,
          note: Annotated[str | None, typer.Option("--note", help="Shown in the ledger.")] = None,
          idempotency_key: IdempotencyKey = None,
          url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Grant an org promotional credit.

    It is spent after the period's quota and expiring grants, before purchased credit."""
    amount_micros = _amount(amount, micros)
    body = {"kind": "grant", "amount_micros": amount_micros}
    body.update({k: v for k, v in (("expires_at", expires_at), ("note", note)) if v is not None})
    with Api(url, token) as api:
        entry = api.post(f"/v1/orgs/{org_id}/credits", body, idempotency_key)
    out = Output(as_json)
    if out.as_json:
        return out.json(entry)
    lapses = f", lapses {when(entry['expires_at'])}" if entry.get("expires_at") else ""
    out.line(f"granted {usd(entry['amount_micros'])} to {org_id} ({entry['entry_id']}{lapses}); "
             f"balance {usd(entry['balance_micros'])}")


def halt(org_id: OrgArg, idempotency_key: IdempotencyKey = None,
         url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Halt an org: the gate denies it (halted) until `resume`."""
    _halt_or_resume("halt", org_id, idempotency_key, url, token, as_json)


def resume(org_id: OrgArg, idempotency_key: IdempotencyKey = None,
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Lift an admin halt.

    It wakes nothing; a prepaid org that is out of money stays halted for its balance."""
    _halt_or_resume("resume", org_id, idempotency_key, url, token, as_json)


def _halt_or_resume(action: str, org_id: str, idempotency_key: str | None, url: str | None, token: str | None,
                    as_json: bool) -> None:
    with Api(url, token) as api:
        state = api.post(f"/v1/orgs/{org_id}/{action}", None, idempotency_key)
    out = Output(as_json)
    if out.as_json:
        return out.json(state)
    out.line(f"{org_id}: {status_text(state)}")


def ledger(org_id: OrgArg,
           limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE, help="Entries per page.")] = 50,
           cursor: Annotated[str | None, typer.Option("--cursor", help="The next_cursor of a page.")] = None,
           every: Annotated[bool, typer.Option("--all", help="Every page, not just one.")] = False,
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Show an org's ledger, newest first.

    Grants, top-ups, refunds, expirations, and usage as one entry per minute."""
    out = Output(as_json)
    with Api(url, token) as api:
        entries, next_cursor = pages(out, f"reading the ledger of {org_id}", "entries", every,
                                     lambda after: api.get(f"/v1/orgs/{org_id}/ledger",
                                                           {"limit": limit, "cursor": after}), cursor)
    if out.as_json:
        return out.json({"entries": entries, "next_cursor": next_cursor, "has_more": next_cursor is not None})
    out.table(f"ledger of {org_id}", ["when", "kind", "amount", "entry", "note"],
              [[when(e["created_at"]), e["kind"], usd(e["amount_micros"]), e["entry_id"], _entry_note(e)]
               for e in entries], right=("amount",), wrap=("note",))
    more(out, len(entries), "entry", next_cursor, plural="entries")


@tokens_app.command("mint")
def mint(org_id: OrgArg,
         ttl_s: Annotated[int, typer.Option("--ttl", min=60, max=30 * 86_400,
                                            help="Seconds until the token expires.")] = 3600,
         url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Mint an org token, and the billing page link that carries it.

    The token opens that org's billing page and self-serve endpoints, nothing else."""
    with Api(url, token) as api:
        minted = api.post(f"/v1/orgs/{org_id}/tokens", {"ttl_s": ttl_s})
        billing_url = f"{api.url}/billing/{org_id}?token={minted['token']}"
    out = Output(as_json)
    if out.as_json:
        return out.json({**minted, "billing_url": billing_url})
    out.line(minted["token"])
    out.line(f"expires {when(minted['expires_at'])}")
    out.line(f"billing page: {billing_url}")


@tokens_app.command("revoke")
def revoke(org_id: OrgArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Void every token of the org minted until now (a link mailed to the wrong person, a
    leaked cookie); a new one can be minted at once. Every replica refuses them within a second."""
    with Api(url, token) as api:
        revoked = api.post(f"/v1/orgs/{org_id}/tokens/revoke", {})
    out = Output(as_json)
    if out.as_json:
        return out.json(revoked)
    out.line(f"tokens of {org_id} minted before {when(revoked['tokens_valid_after'])} are revoked")


# ----- shared by the commands above ------------------------------------------------------


def pages(out: Output, what: str, key: str, every: bool, fetch, cursor: str | None) -> tuple[list, str | None]:
    """One page from `cursor`, or with `every` all of them (a spinner meanwhile)."""
    found: list = []
    with out.progress(what) as tracker:
        while True:
            page = fetch(cursor)
            found += page[key]
            tracker.advance(len(page[key]))
            cursor = page["next_cursor"]
            if not (every and cursor):
                return found, cursor


def more(out: Output, count: int, noun: str, next_cursor: str | None, plural: str | None = None) -> None:
    out.line(f"{count} {noun if count == 1 else plural or noun + 's'}"
             + (f"; more with --cursor {next_cursor} (or --all)" if next_cursor else ""))


def status_text(state: dict) -> str:
    """The org's standing in words: active, halted (why), suspended, degraded, past due."""
    words = []
    if state["suspended"]:
        words.append("suspended")
    if state["is_halted"]:
        words.append(f"halted ({state['halt_reason']})")
    if state["degraded"]:
        words.append("degraded")
    if state["past_due_since"]:
        words.append(f"past due since {when(state['past_due_since'])}")
    return ", ".join(words) or "active"


def show_state(out: Output, state: dict) -> None:
    period = state["period"]
    quota = f" of {usd(period['quota_micros'])} quota" if period["quota_micros"] else ""
    recharge = state["auto_recharge"]
    pairs = [
        ("org", state["org_id"]),
        ("email", state["email"]),
        ("billing", f"{state['billing_mode']}, plan {state['plan']['id']} v{state['plan']['version']}"),
        ("tier", f"{state['tier']} ({state['max_concurrent']} concurrent)"),
        ("balance", usd(state["balance_micros"])),
    ]
    if state["debt_micros"]:
        pairs.append(("debt", usd(state["debt_micros"])))
    pairs += [
        ("status", status_text(state)),
        ("period", f"{period['key']}: {usd(period['usage_micros'])} used{quota}, resets {when(period['resets_at'])}"),
        ("leases", f"{state['active_leases']} of {state['max_concurrent']}"),
        ("runway", _runway_text(state.get("runway") or {})),
        ("card on file", "yes" if state["has_payment_method"] else "no"),
        ("auto-recharge", _recharge_text(recharge)),
        ("enforcement", enforcement_text(state)),
        ("created", when(state["created_at"])),
    ]
    out.fields(None, pairs)
    if state["grants"]:
        out.table("credit by grant", ["grant", "kind", "remaining", "expires"],
                  [[g["grant_id"], g["kind"], usd(g["remaining_micros"]), when(g["expires_at"]) or "never"]
                   for g in state["grants"]], right=("remaining",))


def enforcement_text(state: dict) -> str:
    """Billing-rules 2.12: shadow (billed beside another biller) or enforce, and the cutover."""
    mode, cutover = state.get("enforcement", "enforce"), state.get("cutover_at")
    if mode == "shadow":
        return f"shadow until {when(cutover)}, enforced from then" if cutover else "shadow (no cutover set)"
    return f"enforce (cut over at {when(cutover)})" if cutover else "enforce"


def _runway_text(runway: dict) -> str:
    """Billing-rules 2.10: how long the money lasts at the burn of the live leases."""
    if runway.get("runway_s") is None:
        return "none (nothing running, or billed afterwards)"
    ends = f", runs out {when(runway['runs_out_at'])}" if runway["runs_out_at"] else ""
    return f"{runway['runway_s'] // 60} min at {usd(runway['burn_micros_per_hour'])}/h{ends}"


def _recharge_text(recharge: dict) -> str:
    if not recharge["enabled"]:
        return "off"
    text = (f"under {usd(recharge['threshold_micros'])} add {usd(recharge['amount_micros'])}, "
            f"at most {recharge['max_per_day']} a day")
    return text + (f" (paused: {recharge['paused']})" if recharge.get("paused") else "")


def _entry_note(entry: dict) -> str:
    parts = [entry.get("note") or "", f"lapses {when(entry['expires_at'])}" if entry.get("expires_at") else ""]
    return "; ".join(p for p in parts if p)


def _amount(text: str, micros: bool) -> int:
    if micros:
        if not text.isdigit():
            raise CliError(f"with --micros the amount is a whole number of micro-USD, not {text!r}", exit_code=2)
        return int(text)
    try:
        return parse_usd(text)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
