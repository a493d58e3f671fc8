"""`parity`: bare, memory against the journal on every shard (cli/checks.py, as before);
`parity usage`, metergate's usage against the platform's own per org and hour; `parity usage
post FILE`, the platform's usage from a JSON-lines file (docs/operations/parity.md).

`parity` and `parity usage` exit 3 when they find a difference, as `replay` does."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from cli import checks
from cli.client import Api, CliError, JsonOption, TokenOption, UrlOption
from cli.output import Output

# As the server takes them (serve_app/usage_parity.py): at most this many org-hours per post, and
# well under the default METERGATE_MAX_BODY_BYTES (64 KiB) per body.
POST_ORG_HOURS = 200
POST_BYTES = 48 * 1024
DEFAULT_TOLERANCE_PPM = 100
JSON_SPACE = " \t\r"  # JSON's whitespace, besides the LF that ends a line
MAX_SHOWN = 10  # org-hours named when a file gives some twice
QUANTITIES = (("memory_mb_ms", "memory MB·ms"), ("cpu_ms", "vCPU·ms"), ("disk_mb_ms", "disk MB·ms"))

parity_app = typer.Typer(no_args_is_help=False)
usage_app = typer.Typer(no_args_is_help=False)
parity_app.add_typer(usage_app, name="usage")


@parity_app.callback(invoke_without_command=True)
def parity(context: typer.Context,
           shard: Annotated[int | None, typer.Option("--shard", min=0, help="Check this shard only.")] = None,
           url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Compare every org in memory with its journal, shard by shard (`parity usage`: usage against
    the platform's own numbers).

    Each shard rebuilds the orgs it holds in memory from their snapshot and journal and
    compares (as the scheduler does every 5 minutes). Orgs not in memory are not checked:
    they will load from that very journal. Exit code 3 when an org differs."""
    if context.invoked_subcommand is None:
        checks.parity(shard=shard, url=url, token=token, as_json=as_json)


HourOption = "An hour's start: RFC 3339 (2026-12-07T10:00:00Z) or Unix seconds."


@usage_app.callback(invoke_without_command=True)
def usage(context: typer.Context,
          from_: Annotated[str | None, typer.Option("--from", help=f"First hour of the report. {HourOption}",
                                                    show_default=False)] = None,
          to: Annotated[str | None, typer.Option("--to", help=f"End of the report (not in it). {HourOption}",
                                                 show_default=False)] = None,
          tolerance_ppm: Annotated[int, typer.Option(
              "--tolerance-ppm", min=0, max=1_000_000,
              help="A quantity is within it when |ours - theirs| x 1,000,000 <= it x the larger of the two.")
          ] = DEFAULT_TOLERANCE_PPM,
          org: Annotated[str | None, typer.Option("--org", help="This org only.", show_default=False)] = None,
          url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Compare metergate's usage with the platform's, per org and UTC hour.

    Every org and hour from --from to --to that metergate metered or the platform posted
    (`parity usage post`): ours, theirs, the difference and the ratio of memory, vCPU, disk
    and each unit. Exit code 3 when an org-hour is outside the tolerance."""
    if context.invoked_subcommand is not None:
        return
    if from_ is None or to is None:
        raise CliError("--from and --to are required for a report (see metergate parity usage --help)", exit_code=2)
    params = {"from": from_, "to": to, "tolerance_ppm": tolerance_ppm, "org_id": org}
    with Api(url, token) as api:
        report = api.get("/v1/parity/usage", params)
    out = Output(as_json)
    if out.as_json:
        out.json(report)
    else:
        show_report(out, report)
    if report["outside_tolerance"]:
        raise typer.Exit(checks.DRIFT_EXIT_CODE)


def show_report(out: Output, report: dict) -> None:
    rows = []
    for hour in report["org_hours"]:
        cells = [_quantity(hour[field]) for field, _ in QUANTITIES]
        units = ", ".join(f"{name} {_quantity(q)}" for name, q in hour["units"].items())
        state = "ok" if hour["within_tolerance"] else "OUTSIDE"
        rows.append([hour["hour"], hour["org_id"], *cells, units, state + (f" (only {hour['only']})"
                                                                           if hour["only"] else "")])
    if rows:
        out.table(None, ["hour", "org", *(title for _, title in QUANTITIES), "units", "parity"], rows,
                  right=tuple(title for _, title in QUANTITIES), wrap=("units",))
    checked, outside = report["checked"], report["outside_tolerance"]
    out.line(f"usage parity {report['from']} to {report['to']}: {checked} org-hour{'' if checked == 1 else 's'} "
             f"compared, {outside} outside {report['tolerance_ppm']} ppm (only in metergate: "
             f"{report['only_metergate']}, only posted by the platform: {report['only_platform']})")


def _quantity(q: dict) -> str:
    """'1,000' when both sides agree, else 'ours vs theirs (ratio)'."""
    if q["difference"] == 0:
        return f"{q['ours']:,}"
    return f"{q['ours']:,} vs {q['theirs']:,} ({q['ratio'] or 'no ratio'})"


@usage_app.command("post")
def post(file: Annotated[Path, typer.Argument(metavar="FILE", help="JSON lines: one org and hour a line, as POST "
                                                   "/v1/parity/usage takes each.", show_default=False)],
         url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Post the platform's usage per org and hour from a JSON-lines file.

    Each line is one org and UTC hour ({"org_id", "hour", "memory_mb_ms", "cpu_ms",
    "disk_mb_ms", "units"}, or memory_gib_s, cpu_vcpu_s, disk_gib_s as decimal strings). Sent in
    posts of at most 200 lines; an org and hour posted before is replaced. Every line is read
    before anything is sent, and an org and hour on two lines is refused naming the lines (as
    the service refuses one twice in a post). A line the service refuses stops the run there,
    and the posts before it stay (running the file again is safe)."""
    items = read_lines(file)
    totals = {"stored": 0, "created": 0, "replaced": 0, "replaced_org_hours": []}
    with Api(url, token) as api:
        for chunk in chunks(items):
            try:
                answer = api.post("/v1/parity/usage", {"usage": [item for _, item in chunk]})
            except CliError as exc:
                raise CliError(_at_line(str(exc), chunk, totals["stored"])) from None
            for name in ("stored", "created", "replaced"):
                totals[name] += answer[name]
            totals["replaced_org_hours"] += answer["replaced_org_hours"]
    out = Output(as_json)
    if out.as_json:
        return out.json(totals)
    out.line(f"posted {totals['stored']} org-hour{'' if totals['stored'] == 1 else 's'} from {file}: "
             f"{totals['created']} new, {totals['replaced']} replaced what an earlier post said")


def read_lines(file: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a CliError naming the first bad line, or
    every org and hour that is on more than one line.

    Lines end at LF only (a CR before it is JSON whitespace): not str.splitlines(), which also
    ends a line at U+2028, U+0085 and other separators that JSON allows inside a string.
    An org and hour twice in a file is refused, as the service refuses it twice in one post:
    which line should count is for the platform to say, not for the order of the posts."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    items = []
    lines_of: dict[tuple, list[int]] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip(JSON_SPACE):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            raise CliError(f"{file}:{number}: not a JSON object; nothing was posted")
        items.append((number, item))
        lines_of.setdefault(_org_hour(item), []).append(number)
    if not items:
        raise CliError(f"{file} has no lines to post")
    twice = [(key, numbers) for key, numbers in lines_of.items() if len(numbers) > 1]
    if twice:
        shown = "; ".join(f"{key[0]} at {_hour_text(key[1])} on lines {', '.join(map(str, numbers))}"
                          for key, numbers in twice[:MAX_SHOWN])
        more = f" (and {len(twice) - MAX_SHOWN} more)" if len(twice) > MAX_SHOWN else ""
        raise CliError(f"{file}: {len(twice)} org-hour{'' if len(twice) == 1 else 's'} on more than one line: "
                       f"{shown}{more}. Give each org and hour once; nothing was posted")
    return items


def _org_hour(item: dict) -> tuple:
    """The org and hour of a line, the hour as µs when it reads as a time (so "10:00:00Z" and
    the same epoch are one hour), else as given (the service names what is wrong with it)."""
    org_id, hour = item.get("org_id"), item.get("hour")
    try:
        hour = parse_time_us(hour)
    except (BadTime, ValueError, OverflowError):
        hour = json.dumps(hour)
    return org_id if isinstance(org_id, str) else json.dumps(org_id), hour


def _hour_text(hour: int | str) -> str:
    return us_to_rfc3339(hour) if isinstance(hour, int) else hour


def chunks(items: list[tuple[int, dict]]) -> Iterator[list[tuple[int, dict]]]:
    """The lines of each post: at most POST_ORG_HOURS of them and POST_BYTES."""
    size, chunk = 0, []
    for number, item in items:
        length = len(json.dumps(item)) + 2
        if chunk and (len(chunk) == POST_ORG_HOURS or size + length > POST_BYTES):
            yield chunk
            size, chunk = 0, []
        chunk.append((number, item))
        size += length
    yield chunk


def _at_line(message: str, chunk: list[tuple[int, dict]], stored: int) -> str:
    """The service's error, its `usage.K.` (the K-th of the post) told as the file's line."""
    match = re.search(r"\busage\.(\d+)\.", message)
    if match and int(match.group(1)) < len(chunk):
        message = message.replace(match.group(0), f"line {chunk[int(match.group(1))][0]}: ", 1)
    return f"{message} ({stored} org-hours before line {chunk[0][0]} were posted; posting the file again is safe)"
