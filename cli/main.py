"""`metergate`: the operator's command line.

Every command but `up`, `migrate`, `check`, `bench` and `relay` is an admin call to the running
service's HTTP API. A failure prints one line on stderr (`error: ...`) and exits non-zero, never with a
traceback: 1 when the command could not do its work, 2 for a usage error, 3 when `parity` or
`replay` found an org whose memory differs from its journal, `parity usage` an org-hour outside
its tolerance, or `check` an inconsistency, 130
when interrupted (Ctrl-C; Typer ends the command with it, and an end of input at a prompt
ends with it too). `up` runs the service and ends with its codes (serve_app/main.py).
"""

from __future__ import annotations

import os
import sys

import typer

from cli import checks, cutover, db_check, imports, inbound, local, orgs, outbox, parity_usage, relay, restore, stripe_catalog
from cli.client import CliError
from cli.output import error_line

DEBUG_ENV = "METERGATE_CLI_DEBUG"
# Every usage error (a missing argument, an unknown option) is a ClickException. Typer
# re-exports one of them, BadParameter; its base is found from it whether or not this Typer
# version vendors its own copy of click.
USAGE_ERROR = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")

app = typer.Typer(
    name="metergate", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    help="metergate: run the service, and operate it over its HTTP API (admin token). Tables for "
         "people, --json for scripts. Exit codes: 0 done, 1 failed, 2 bad usage, 3 drift found, 130 interrupted.")
app.command("up")(local.up)
app.command("migrate")(local.migrate)
app.add_typer(orgs.orgs_app, name="orgs")
app.add_typer(orgs.credits_app, name="credits")
app.command("halt")(orgs.halt)
app.command("resume")(orgs.resume)
app.command("ledger")(orgs.ledger)
app.add_typer(orgs.tokens_app, name="tokens")
app.add_typer(parity_usage.parity_app, name="parity")  # bare: cli/checks.py; `parity usage`
app.command("replay")(checks.replay)
app.command("check")(db_check.check)
app.add_typer(outbox.outbox_app, name="outbox")
app.add_typer(inbound.inbound_app, name="inbound")
app.add_typer(restore.restore_app, name="restore")
app.add_typer(stripe_catalog.stripe_app, name="stripe")
app.command("import")(imports.import_orgs)
app.command("cutover")(cutover.cutover)
app.command("bench")(local.bench)
app.command("relay")(relay.relay)


def main(args: list[str] | None = None) -> int:
    """The console script: run the command, and turn every failure into one line on stderr."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="metergate", standalone_mode=False)
    except CliError as exc:
        error_line(str(exc))
        return exc.exit_code
    except typer.Abort:
        error_line("aborted")
        return 130
    except USAGE_ERROR as exc:
        context = getattr(exc, "ctx", None)
        error_line(f"{exc.format_message()} (see {context.command_path if context else 'metergate'} --help)")
        return exc.exit_code
    except Exception as exc:  # a bug of the CLI: still one line, unless asked for all of it
        if os.environ.get(DEBUG_ENV):
            raise
        error_line(f"unexpected {type(exc).__name__}: {exc} (a bug in metergate's CLI; set {DEBUG_ENV}=1 "
                   "for the traceback)")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
