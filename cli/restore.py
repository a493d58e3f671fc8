"""`restore begin`: the first step after restoring the database from a backup (the whole
runbook is docs/operations/restore.md). Run with metergate stopped, against the restored
database: it fences every shard process that may still run from before the restore, and holds
new auto-recharge charges and meter events until Stripe's record since the restore point has
been read back (`metergate inbound reconcile --since`): a charge the restore forgot would
otherwise be asked for again and made twice, and usage sent again billed twice."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli.client import CliError, JsonOption
from cli.local import database
from cli.output import Output

restore_app = typer.Typer(help="After restoring the database from a backup (docs/operations/restore.md).",
                          no_args_is_help=True)


@restore_app.command("begin")
def begin(database_url: Annotated[str | None, typer.Option(
              "--database-url", show_default=False, metavar="URL",
              help="The restored database. Default: $METERGATE_DATABASE_URL, else the embedded Postgres of "
                   "`make up` in $METERGATE_DATA_DIR/pg.")] = None,
          as_json: JsonOption = False) -> None:
    """Fence every shard from before the restore; hold auto-recharge charges and meter events.

    Run it after the restore and before metergate starts on the restored database. Then:
    `metergate check`, start metergate, and `metergate inbound reconcile --since <restore
    point>`, which applies what Stripe did since and lets charges go again."""
    from config.settings import SettingsError, load_settings
    from storage import holds, slots

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    async def run(url: str) -> tuple[int, int]:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                fenced = await slots.fence_every_shard(conn)
                for name in holds.AFTER_A_RESTORE:
                    read_back_from = await holds.hold(
                        conn, name, "restored from a backup (`metergate restore begin`): "
                        "`metergate inbound reconcile --since <restore point>` takes this off")
            return fenced, int(read_back_from.timestamp())
        finally:
            await conn.close()

    with database(settings, database_url) as (url, where):
        try:
            fenced, read_back_from = asyncio.run(run(url))
        except Exception as exc:  # noqa: BLE001 - asyncpg and OS errors alike: one line naming the database
            raise CliError(f"cannot begin the restore on {where}: {type(exc).__name__}: {exc}") from None
    out = Output(as_json)
    if out.as_json:
        return out.json({"shards_fenced": fenced, "held": list(holds.AFTER_A_RESTORE),
                         "read_back_from": read_back_from})
    out.line(f"{where}: {fenced} shards fenced (epochs moved on by {slots.RESTORE_EPOCH_STEP}); new auto-recharge charges and "
             "meter events held.")
    out.line("Next: `metergate check`, start metergate, then `metergate inbound reconcile --since "
             f"{read_back_from}` (or earlier: the restore point at the latest, and no later than this, the last "
             "Stripe event the restored database recorded less the 3 days Stripe may take to deliver one).")
