"""POST /v1/import (admin token): orgs brought over from another biller, a chunk at a time
(`metergate import` streams a file through it). Each org is one command to its shard, applied
whole or refused whole (billing-rules 2.11); its Stripe customer is linked after it. A dry run
asks the shards what each import would change, from a copy of the org, and changes nothing."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from actors import commands as cmd
from actors.clock import now_us
from actors.refusals import Refusal
from serve_app import openapi
from serve_app.bodies import parse_model
from serve_app.context import Context, json
from serve_app.errors import api_error_of
from serve_app.imports import BadLine, ImportBody, import_of
from storage import stripe_customers

STRIPE_CUSTOMER = "stripe_customer"
# A shard's answers that say nothing about the org: the request is answered 503, and a retry
# (the CLI's) applies what is missing; what did apply is unchanged the second time.
RETRY = frozenset({Refusal.SHARD_BUSY, Refusal.SHARD_UNAVAILABLE, Refusal.WRONG_SHARD, Refusal.OUTCOME_UNKNOWN,
                   Refusal.SHARD_VERSION_MISMATCH, Refusal.INTERNAL_ERROR})


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["orgs"])

    @router.post("/v1/import", openapi_extra=openapi.with_body(
        ImportBody, {"200": ("Each org's outcome, in the order sent", openapi.ImportResult)}, openapi.ADMIN,
        ("500", "503")))
    async def post_import(request: Request) -> Response:
        """Up to 100 orgs; each answered created, updated, unchanged, refused or invalid (with
        why). Idempotent per org and per amount: sending the same orgs again changes nothing."""
        ctx.admin(request)
        body = parse_model(ImportBody, await request.body())
        now = now_us()
        answers: list[dict] = []
        work: list[tuple[int, str, cmd.ImportOrg, str | None]] = []
        seen: set[str] = set()
        for index, raw in enumerate(body.orgs):
            try:
                org_id, command, customer = import_of(raw, ctx.catalog, ctx.settings, now)
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
        results = await asyncio.gather(*(
            ctx.router.command(org_id, cmd.PreviewImport(command) if body.dry_run else command)
            for _, org_id, command, _ in work))
        for result in results:
            error = result.get("error")
            if error is not None and Refusal(error["code"]) in RETRY:
                raise api_error_of(error)
        linked = await _link_customers(ctx, [(org_id, customer) for (_, org_id, _, customer), result
                                             in zip(work, results) if customer and "error" not in result],
                                       body.dry_run)
        for (index, org_id, _, customer), result in zip(work, results):
            answer = answers[index]
            if "error" in result:
                answer.update(status="refused", why=f"{result['error']['code']}: {result['error']['message']}")
                continue
            changed = list(result["changed"])
            held = linked.get(org_id)
            if customer and held == (customer, True):
                changed.append(STRIPE_CUSTOMER)
            elif customer and (held is None or held[0] != customer):  # the first customer stored wins
                answer["why"] = (f"stripe_customer_id {customer} not linked: "
                                 + (f"the org has {held[0]}" if held else "another org has it"))
            status = "created" if result["created"] else "updated" if changed else "unchanged"
            answer.update(status=status, changed=changed, balance_micros=result["balance_micros"])
        return json({"dry_run": body.dry_run, "orgs": answers})

    return router


async def _link_customers(ctx: Context, pairs: list[tuple[str, str]], dry_run: bool) -> dict[str, tuple[str, bool]]:
    """Each org's Stripe customer after the import, and whether the import linked it (a dry run
    links nothing: whether it would)."""
    if not pairs:
        return {}
    async with (await ctx.db()).acquire() as conn:
        if dry_run:
            held = await stripe_customers.customers_of(conn, [org for org, _ in pairs])
            taken = await stripe_customers.orgs_of_customers(conn, [cus for _, cus in pairs])
            return {org: (held[org], False) if org in held else (cus, cus not in taken) for org, cus in pairs}
        new, held = await stripe_customers.remember_many(conn, pairs)
    return {org: (held[org], org in new) for org, _ in pairs if org in held}
