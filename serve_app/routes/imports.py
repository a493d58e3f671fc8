"""POST /v1/import (admin token): orgs brought over from another biller, a chunk at a time
(`metergate import` streams a file through it). Each org is one command to its shard, applied
whole or refused whole (billing-rules 2.11); its Stripe customer is linked after it. A dry run
asks the shards what each import would change, from a copy of the org, and changes nothing."""

from __future__ import annotations

import asyncio

import msgspec
from fastapi import APIRouter, Request, Response

from actors import commands as cmd
from actors.clock import now_us
from actors.refusals import Refusal
from serve_app import openapi
from serve_app.bodies import parse_model
from serve_app.context import Context, json
from serve_app.errors import api_error_of
from serve_app.imports import BadLine, ImportBody, import_of
from storage import enforcement, stripe_customers

STRIPE_CUSTOMER = "stripe_customer"
AUTO_RECHARGE = "auto_recharge"  # what a no_stripe_customer pause lifted shows in `changed`
# A shard's answers that say nothing about the org: that org is answered `failed` (send it again;
# what did apply is unchanged the second time), the others as their shards answered. Only a
# request in which every org failed so is answered 503 as a whole: nothing of it applied.
RETRY = frozenset({Refusal.SHARD_BUSY, Refusal.SHARD_UNAVAILABLE, Refusal.WRONG_SHARD, Refusal.OUTCOME_UNKNOWN,
                   Refusal.SHARD_VERSION_MISMATCH, Refusal.INTERNAL_ERROR})


def _retry(result: dict) -> bool:
    error = result.get("error")
    return error is not None and Refusal(error["code"]) in RETRY


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["orgs"])

    @router.post("/v1/import", openapi_extra=openapi.with_body(
        ImportBody, {"200": ("Each org's outcome, in the order sent", openapi.ImportResult)}, openapi.ADMIN,
        ("500", "503")))
    async def post_import(request: Request) -> Response:
        """Up to 100 orgs; each answered created, updated, unchanged, refused, invalid or failed
        (with why). Idempotent per org and per amount: sending the same orgs again changes nothing."""
        ctx.admin(request)
        body = parse_model(ImportBody, await request.body())
        now = now_us()
        answers: list[dict] = []
        work: list[tuple[int, str, cmd.ImportOrg, str | None]] = []
        seen: set[str] = set()
        for index, raw in enumerate(body.orgs):
            try:
                raw, shadow = _enforcement_of(raw, ctx.settings.enforcement)
                org_id, command, customer = import_of(raw, ctx.catalog, ctx.settings, now)
                command = msgspec.structs.replace(command, shadow=shadow)
            except BadLine as bad:
                answers.append({"index": index, "status": "invalid", "org_id": bad.org_id, "why": bad.why})
                continue
            if org_id in seen:
                answers.append({"index": index, "status": "invalid", "org_id": org_id,
                                "why": "org_id: twice in one request"})
                continue
            seen.add(org_id)
            answers.append({"index": index, "org_id": org_id})
            work.append((index, org_id, command, customer))
        # A new org in shadow: the meter's row before the org (a crash between withholds, never
        # sends); an org that exists keeps its own enforcement (billing-rules 2.12).
        rows_made: list[str] = []
        if not body.dry_run and any(command.shadow for _, _, command, _ in work):
            async with (await ctx.db()).acquire() as conn:
                rows_made = await enforcement.shadow_new_orgs(
                    conn, [org_id for _, org_id, command, _ in work if command.shadow])
        results = await asyncio.gather(*(
            ctx.router.command(org_id, cmd.PreviewImport(command) if body.dry_run else command)
            for _, org_id, command, _ in work))
        if not body.dry_run:
            await _settle_enforcement_rows(ctx, work, results, set(rows_made))
        if work and all(map(_retry, results)):
            raise api_error_of(results[0]["error"])  # nothing applied: the request as a whole, again
        linked = await _link_customers(ctx, [(org_id, customer) for (_, org_id, _, customer), result
                                             in zip(work, results) if customer and "error" not in result],
                                       body.dry_run)
        # An org whose auto-recharge a failed charge paused for want of a customer (the link
        # after an earlier run's commit failed) has one now: the same import again lifts the pause.
        waiting = [(i, org_id, msgspec.structs.replace(command, customer_linked=True))
                   for i, ((_, org_id, command, _), result) in enumerate(zip(work, results))
                   if "error" not in result and result.get("waits_for_customer") and org_id in linked]
        if waiting and not body.dry_run:
            lifted = await asyncio.gather(*(ctx.router.command(org_id, command) for _, org_id, command in waiting))
            for (i, _, _), result in zip(waiting, lifted):
                results[i] = result if "error" in result else {
                    **result, "created": results[i]["created"], "changed": results[i]["changed"] + result["changed"]}
        for (index, org_id, _, customer), result in zip(work, results):
            answer = answers[index]
            if "error" in result:
                status = "failed" if _retry(result) else "refused"
                answer.update(status=status, why=f"{result['error']['code']}: {result['error']['message']}")
                continue
            changed = list(result["changed"])
            held = linked.get(org_id)
            if customer and held == (customer, True):
                changed.append(STRIPE_CUSTOMER)
            elif customer and (held is None or held[0] != customer):  # the first customer stored wins
                answer["why"] = (f"stripe_customer_id {customer} not linked: "
                                 + (f"the org has {held[0]}" if held else "another org has it"))
            if body.dry_run and result.get("waits_for_customer") and org_id in linked:
                changed.append(AUTO_RECHARGE)
            status = "created" if result["created"] else "updated" if changed else "unchanged"
            answer.update(status=status, changed=changed, balance_micros=result["balance_micros"])
        return json({"dry_run": body.dry_run, "orgs": answers})

    return router


def _enforcement_of(raw: dict, default: str) -> tuple[dict, bool]:
    """A line's `enforcement` (`shadow` or `enforce`; absent: METERGATE_ENFORCEMENT), taken out
    of the line: whether a new org is created in shadow (billing-rules 2.12)."""
    if "enforcement" not in raw:
        return raw, default == "shadow"
    mode = raw["enforcement"]
    if mode not in ("shadow", "enforce"):
        org_id = raw.get("org_id") if isinstance(raw.get("org_id"), str) else None
        raise BadLine("enforcement: must be shadow or enforce", org_id)
    return {k: v for k, v in raw.items() if k != "enforcement"}, mode == "shadow"


async def _settle_enforcement_rows(ctx: Context, work: list, results: list[dict], made: set[str]) -> None:
    """After the orgs' commands, the meter's row of each org imported is its state's (an org
    that existed keeps its own enforcement; one imported enforced loses a shadow row an earlier
    run left, e.g. one that crashed after making it); a shadow row made for an org that was
    refused goes. An org whose outcome is unknown keeps its row (withheld until the import
    runs again)."""
    rows: dict[str, enforcement.Row | None] = {}
    for (_, org_id, _, _), result in zip(work, results):
        if "error" in result:
            if org_id in made and not _retry(result):
                rows[org_id] = None
        elif "enforcement" in result:
            rows[org_id] = enforcement.row_of(result["enforcement"], result["cutover_us"])
        elif org_id in made and not result["created"]:  # a shard from before `enforcement` in its answer
            rows[org_id] = None
    if rows:
        async with (await ctx.db()).acquire() as conn:
            await enforcement.write_many(conn, rows)


async def _link_customers(ctx: Context, pairs: list[tuple[str, str]], dry_run: bool) -> dict[str, tuple[str, bool]]:
    """Each org's Stripe customer after the import, and whether the import linked it (a dry run
    links nothing: whether it would); an org without one after it is left out."""
    if not pairs:
        return {}
    async with (await ctx.db()).acquire() as conn:
        if dry_run:
            held = await stripe_customers.customers_of(conn, [org for org, _ in pairs])
            taken = await stripe_customers.orgs_of_customers(conn, [cus for _, cus in pairs])
            return {org: (held[org], False) if org in held else (cus, True) for org, cus in pairs
                    if org in held or cus not in taken}
        new, held = await stripe_customers.remember_many(conn, pairs)
    return {org: (held[org], org in new) for org, _ in pairs if org in held}
