"""`parity` and `replay`: memory against the journal, checked by the running shards.

Both exit 3 when they find a difference, so a script tells a finding (3) from a failure to
check (1)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.client import SLOW_TIMEOUT_S, Api, CliError, JsonOption, TokenOption, UrlOption
from cli.output import Output

DRIFT_EXIT_CODE = 3


def parity(shard: Annotated[int | None, typer.Option("--shard", min=0, help="Check this shard only.")] = None,
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Compare every org in memory with its journal, shard by shard.

    Each shard rebuilds the orgs it holds in memory from their snapshot and journal and
    compares (as the scheduler does every 5 minutes). Orgs not in memory are not checked:
    they will load from that very journal. Exit code 3 when an org differs."""
    out = Output(as_json)
    with Api(url, token) as api, out.progress("parity: shard 0") as tracker:
        reports = [api.get("/v1/parity", {"shard": shard or 0}, timeout_s=SLOW_TIMEOUT_S)]
        count = reports[0]["shard_count"]
        tracker.advance(total=1 if shard is not None else count)
        for k in range(1, count) if shard is None else ():
            tracker.advance(0, description=f"parity: shard {k}")
            reports.append(api.get("/v1/parity", {"shard": k}, timeout_s=SLOW_TIMEOUT_S))
            tracker.advance()
    shards = [s for r in reports for s in r["shards"]]
    drift = sorted(org_id for s in shards for org_id in s["drift"])
    checked = sum(s["checked"] for s in shards)
    if out.as_json:
        out.json({"shard_count": count, "checked": checked, "drift": drift, "shards": shards})
    else:
        out.table(None, ["shard", "orgs checked", "drift"],
                  [[str(s["shard"]), str(s["checked"]), ", ".join(s["drift"]) or "0"] for s in shards],
                  right=("shard", "orgs checked"))
        out.line(f"parity: {checked} org{'' if checked == 1 else 's'} in memory checked on {len(shards)} of "
                 f"{count} shard{'' if count == 1 else 's'}: "
                 + (f"{len(drift)} differ from their journal: {', '.join(drift)}" if drift else "0 drift"))
    if drift:
        raise typer.Exit(DRIFT_EXIT_CODE)


def replay(org_id: Annotated[str, typer.Argument(help="The org's id.", show_default=False)],
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Rebuild one org from its journal and compare it with memory.

    The org's shard rebuilds it from its snapshot and journal and compares the result with
    what it holds in memory (it loads the org first if it is not there). Exit code 3 when
    they differ."""
    out = Output(as_json)
    with Api(url, token) as api, out.progress(f"replaying {org_id}"):
        report = api.get(f"/v1/orgs/{org_id}/replay", timeout_s=SLOW_TIMEOUT_S)
    if not isinstance(report.get("match"), bool):
        raise CliError(f"unexpected answer to replay of {org_id}: {report}")
    if out.as_json:
        out.json(report)
    else:
        out.line(f"{org_id} (shard {report['shard']}): rebuilt from its snapshot and journal, "
                 + ("matches memory" if report["match"] else "DIFFERS from memory"))
    if not report["match"]:
        raise typer.Exit(DRIFT_EXIT_CODE)
