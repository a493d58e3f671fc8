"""`outbox list|retry`: the outbound webhook events by delivery status, and a dead letter sent again."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from cli.client import Api, JsonOption, TokenOption, UrlOption
from cli.output import Output, when

outbox_app = typer.Typer(help="Outbound webhook events: list them, send a dead letter again.", no_args_is_help=True)
MAX_PAGE = 500


class Status(str, Enum):
    dead = "dead"
    pending = "pending"
    delivered = "delivered"


@outbox_app.command("list")
def list_events(status: Annotated[Status, typer.Option("--status", help="Which events.")] = Status.dead,
                limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE, help="At most this many, "
                                                                                        "newest first.")] = 50,
                url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List outbound webhook events by status, newest first (dead letters by default)."""
    with Api(url, token) as api:
        answer = api.get("/v1/webhooks/outbox", {"status": status.value, "limit": limit})
    out = Output(as_json)
    if out.as_json:
        return out.json(answer)
    events = answer["events"]
    out.table(f"outbox: {status.value}", ["id", "org", "type", "attempts", "created", "delivered", "last error"],
              [[e["id"], e["org_id"], e["type"], str(e["attempts"]), when(e["created_at"]), when(e["delivered_at"]),
                e["last_error"] or ""] for e in events], right=("attempts",), wrap=("last error",))
    out.line(f"{len(events)} {status.value} event{'' if len(events) == 1 else 's'}")


@outbox_app.command("retry")
def retry(message_id: Annotated[str, typer.Argument(help="The event's id, as `outbox list` shows it (msg_…).", show_default=False)],
          url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Send a dead letter again.

    It goes back to pending and keeps its message id, so receivers still dedupe it."""
    with Api(url, token) as api:
        answer = api.post(f"/v1/webhooks/outbox/{message_id}/retry")
    out = Output(as_json)
    if out.as_json:
        return out.json(answer)
    out.line(f"{answer['id']}: {answer['status']} again; the outbox job sends it within a second")
