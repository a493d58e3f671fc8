"""`metergate cutover`: orgs in shadow (billing-rules 2.12) billed for real from a whole UTC hour
on, one org or a file of them, or an undo back to shadow. Each org is one
`PUT /v1/orgs/{id}/enforcement`; one org failing does not stop the others."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer

from actors.ticks import ID_PATTERN
from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from cli.client import Api, CliError, JsonOption, TokenOption, UrlOption
from cli.output import Output, when

HOUR_US = 3_600 * 1_000_000
ORG_ID = re.compile(ID_PATTERN)
MAX_ID_CHARS = 128


def cutover(orgs: Annotated[list[str] | None, typer.Argument(
                metavar="[ORG]...", help="The orgs' ids.", show_default=False)] = None,
            at: Annotated[str | None, typer.Option(
                "--at", metavar="TIME", help="The cutover: a whole UTC hour, RFC 3339 (like 2026-12-08T10:00:00Z). "
                                             "Default: the next whole hour of the service's clock, the same for every org of the run.",
                show_default=False)] = None,
            undo: Annotated[bool, typer.Option(
                "--undo", help="Back to shadow: refused (cutover_charged) once a charge was asked or a Stripe "
                               "meter event of an hour from the cutover on was sent.")] = False,
            file: Annotated[Path | None, typer.Option(
                "--file", metavar="FILE", help="Also every org of FILE: one org id per line (blank lines and "
                                               "lines starting with # are skipped).", show_default=False)] = None,
            url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Cut orgs over from shadow to enforce at a whole UTC hour.

    Usage before the hour stays shadow (never charged, never sent to Stripe's meter); from it
    on it is billed, exactly once across the seam. An org already enforced is left as it is.
    With --undo, back to shadow while nothing was charged or sent since the cutover. Prints
    each org, then a summary; exits 1 if any org failed."""
    if undo and at is not None:
        raise CliError("--undo goes back to shadow: it takes no --at", exit_code=2)
    ids = list(orgs or []) + (_read_file(file) if file is not None else [])
    if not ids:
        raise CliError("name the orgs: ORG... or --file FILE", exit_code=2)
    bad = [org for org in ids if not _is_id(org)]
    if bad:
        raise CliError(f"not an org id: {bad[0]!r}", exit_code=2)
    ids = list(dict.fromkeys(ids))  # each org once, in the order given
    at_text = None if at is None else _whole_hour(at)
    out = Output(as_json)
    results: list[dict] = []
    with Api(url, token) as api, out.progress("undo" if undo else "cutover", total=len(ids)) as bar:
        if at_text is None and not undo:  # decided once, sent to each org: never an org's own (old) cutover
            at_text = us_to_rfc3339((_service_now_us(api) // HOUR_US + 1) * HOUR_US)
        for org_id in ids:
            body = {"mode": "shadow", "undo": True} if undo else {"mode": "enforce"}
            if at_text is not None:
                body["at"] = at_text
            try:
                state = api.call("PUT", f"/v1/orgs/{org_id}/enforcement", body)
            except CliError as exc:
                result = {"org_id": org_id, "ok": False, "error": str(exc)}
            else:
                result = {"org_id": org_id, "ok": True, "enforcement": state["enforcement"],
                          "cutover_at": state["cutover_at"]}
            results.append(result)
            if not out.as_json:
                bar.say(_line(result, undo), stderr=not result["ok"])
            bar.advance()
    failed = [r for r in results if not r["ok"]]
    summary = {"orgs": len(results), "done": len(results) - len(failed), "failed": len(failed),
               "cutover_at": None if undo else at_text}
    if out.as_json:
        out.json({"results": results, "summary": summary})
    else:
        what = "back in shadow" if undo else f"cut over at {when(at_text)}" if at_text else "cut over"
        out.line(f"{summary['done']} of {summary['orgs']} org(s) {what}; {summary['failed']} failed")
    if failed:
        raise typer.Exit(1)


def _service_now_us(api: Api) -> int:
    """The service's time (its test clock when it runs one: GET /v1/test-clock; else the `Date`
    header of that answer, the service's real clock), not this machine's."""
    path = "/v1/test-clock"
    try:
        response = api.http.get(path)
    except httpx.HTTPError:
        api.call("GET", path)  # raises the CLI's error for it
        raise
    if response.status_code == 200:
        return int(api._answer("GET", path, response)["now_us"])
    if response.status_code != 404:
        api._answer("GET", path, response)  # 401, 403, 503...: raises
    try:
        return int(parsedate_to_datetime(response.headers["date"]).timestamp()) * 1_000_000
    except (KeyError, TypeError, ValueError):
        raise CliError("cannot tell the service's time (no test clock, no Date header): give --at") from None


def _is_id(text: str) -> bool:
    return len(text) <= MAX_ID_CHARS and ORG_ID.fullmatch(text) is not None


def _line(result: dict, undo: bool) -> str:
    org_id = result["org_id"]
    if not result["ok"]:
        return f"{org_id}: failed: {result['error']}"
    if result["enforcement"] == "shadow":
        if result["cutover_at"]:
            return f"{org_id}: shadow until {when(result['cutover_at'])}, enforced from then"
        return f"{org_id}: shadow" + ("" if undo else " (not cut over)")
    cut = f" (cut over at {when(result['cutover_at'])})" if result["cutover_at"] else " (never in shadow)"
    return f"{org_id}: enforced{cut}"


def _whole_hour(text: str) -> str:
    try:
        at_us = parse_time_us(text)
    except BadTime as exc:
        raise CliError(f"--at: {exc}", exit_code=2) from None
    if at_us % HOUR_US:
        raise CliError(f"--at {text}: a cutover is at a whole UTC hour (like {us_to_rfc3339(at_us // HOUR_US * HOUR_US)})",
                       exit_code=2)
    return us_to_rfc3339(at_us)


def _read_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    ids = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _is_id(line):
            raise CliError(f"{path}:{number}: not an org id: {line[:80]!r} (one org id per line)", exit_code=2)
        ids.append(line)
    return ids
