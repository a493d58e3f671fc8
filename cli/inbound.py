"""`inbound list`: the Stripe events metergate answered but did not apply (the dead letters,
and the ignored), newest first, with why."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from cli.client import SLOW_TIMEOUT_S, Api, CliError, JsonOption, TokenOption, UrlOption
from cli.orgs import more, pages
from cli.output import Output, when

inbound_app = typer.Typer(help="Inbound Stripe events that were not applied: dead letters and ignored ones.",
                          no_args_is_help=True)
MAX_PAGE = 500


class Outcome(str, Enum):
    dead_letter = "dead_letter"
    ignored = "ignored"


@inbound_app.command("list")
def list_events(outcome: Annotated[Outcome | None, typer.Option("--outcome", help="Only these (default: both).",
                                                                show_default=False)] = None,
                limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE, help="Events per page.")] = 50,
                cursor: Annotated[str | None, typer.Option("--cursor", help="The next_cursor of a page.")] = None,
                every: Annotated[bool, typer.Option("--all", help="Every page, not just one.")] = False,
                url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List Stripe events answered but not applied, newest first, with the reason.

    A dead letter names something metergate cannot apply (an unknown org, a field it cannot
    read); an ignored event had nothing to do here (no org, another livemode)."""
    out = Output(as_json)
    params = {"limit": limit, **({"outcome": outcome.value} if outcome else {})}
    with Api(url, token) as api:
        events, next_cursor = pages(out, "listing inbound events", "events", every,
                                    lambda after: api.get("/v1/webhooks/inbound", {**params, "cursor": after}), cursor)
    if out.as_json:
        return out.json({"events": events, "next_cursor": next_cursor, "has_more": next_cursor is not None})
    out.table(f"inbound Stripe events: {outcome.value if outcome else 'not applied'}",
              ["event", "type", "outcome", "received", "reason"],
              [[e["id"], e["type"], e["outcome"], when(e["received_at"]), e["reason"] or ""] for e in events],
              wrap=("reason",))
    more(out, len(events), "event", next_cursor)


def _instant(text: str) -> int:
    """Unix seconds from Unix seconds or an ISO 8601 time with its offset."""
    from datetime import datetime

    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter("give Unix seconds or an ISO 8601 time, like 2026-12-07T09:30:00Z") from None
    if moment.tzinfo is None:
        raise typer.BadParameter("say the time's offset (Z for UTC): a restore point is an instant")
    return int(moment.timestamp())


@inbound_app.command("reconcile")
def reconcile(since: Annotated[str, typer.Option("--since", help="The restore point, or earlier: Unix seconds or "
                                                                  "an ISO 8601 time with offset.", show_default=False)],
              url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """After a database restore: apply every event Stripe sent since the restore point, then
    read its meters back.

    Stripe keeps 30 days of events. Those the restored database records already are skipped;
    the others apply as their delivery would have (payments credit once, by their key). Then,
    for postpaid orgs, what Stripe's meter holds beyond the database's meter events is recorded
    as sent, so usage sent again is not billed twice. Starting earlier than needed, or running
    it twice, changes nothing."""
    out = Output(as_json)
    since_s = _instant(since)
    totals = {"events": 0, "applied": 0, "ignored": 0, "dead_letter": 0, "seen": 0}
    after, page = None, {}
    with Api(url, token) as api, out.progress("reading Stripe's events") as tracker:
        while True:
            page = api.call("POST", "/v1/stripe/reconcile", body={
                "since": since_s, "starting_after": after, "started_at": page.get("started_at")},
                timeout_s=SLOW_TIMEOUT_S)
            totals["events"] += page["events"]
            for outcome, count in page["outcomes"].items():
                totals[outcome] += count
            tracker.advance(page["events"], description=f"reading Stripe's events: {totals['events']}")
            after = page["next"]
            if after is None:
                break
        tracker.advance(0, description="reading Stripe's meters back")
        meters = api.call("POST", "/v1/stripe/reconcile-meters", body={"since": since_s}, timeout_s=SLOW_TIMEOUT_S)
    totals["meters"] = meters
    needed = [t for t in (page.get("read_back_from"), meters.get("read_back_from")) if t is not None]
    still_held = bool(page.get("charges_held") or meters.get("meters_held"))
    totals["holds_released"] = not still_held
    if out.as_json:
        out.json(totals)
    else:
        out.line(f"{totals['events']} Stripe events since {since}: {totals['applied']} applied, {totals['seen']} "
                 f"known already, {totals['ignored']} ignored, {totals['dead_letter']} dead letters "
                 "(`metergate inbound list --outcome dead_letter` shows why)")
        out.line(f"meters: {meters['orgs']} orgs read back ({meters.get('skipped', 0)} skipped); Stripe held more "
                 f"than the database in {meters['hours']} hours ({meters['recorded_micros']} µUSD), recorded as sent")
    if meters.get("skipped"):
        raise CliError(f"Stripe refused to show the meter of {meters['skipped']} orgs (the scheduler's log names "
                       "them): the hold on meter events stays on; run this again once Stripe shows them")
    if still_held and not needed:
        raise CliError("a hold was put on again while Stripe was read (another failover?): run this again")
    if needed:
        raise CliError(f"the restore's holds on charges and meter events stay on: read Stripe back from "
                       f"{min(needed)} (Unix seconds) or earlier: `metergate inbound reconcile --since {min(needed)}`")
