"""What several routes ask of the shards and of storage: an org's state, a command answered
with the org's view, the check that an org exists."""

from __future__ import annotations

from fastapi import Request, Response

from serve_app.context import Context, json
from serve_app.errors import raise_for_shard_error, unknown_org
from serve_app.idempotency import idempotent
from serve_app.views import org_view
from storage import orgs


async def org_state(ctx: Context, org_id: str):
    """The org's state, read from its shard's memory like the gate (once the org's commands in
    flight are answered, so a read never shows what a failed commit would take back)."""
    return raise_for_shard_error(await ctx.router.state(org_id))["state"]


async def state_command(ctx: Context, request: Request, org_id: str, command) -> Response:
    """A command whose answer is the org's state after it (idempotent by key)."""
    async def run() -> Response:
        return json(org_view(raise_for_shard_error(await ctx.router.command(org_id, command))["state"]))

    return await idempotent(ctx, request, run)


async def require_org(ctx: Context, org_id: str) -> None:
    async with (await ctx.db()).acquire() as conn:
        if not await orgs.exists(conn, org_id):
            raise unknown_org(org_id)
