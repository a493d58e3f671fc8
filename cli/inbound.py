"""`inbound list`: the Stripe events metergate answered but did not apply (the dead letters,
and the ignored), newest first, with why."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from cli.client import Api, JsonOption, TokenOption, UrlOption
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
