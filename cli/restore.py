"""`restore begin`: the first step after restoring the database from a backup (the whole
runbook is docs/operations/restore.md). Run with metergate stopped, against the restored
database: it fences every shard process that may still run from before the restore, and holds
new auto-recharge charges until Stripe's record since the restore point has been read back
(`metergate inbound reconcile --since`), since a charge the restore forgot would otherwise be
asked for again and made twice."""

from __future__ import annotations

import asyncio
import warnings
from typing import Annotated

import typer

from cli.client import CliError, JsonOption
from cli.local import _without_password
from cli.output import Output

restore_app = typer.Typer(help="After restoring the database from a backup (docs/operations/restore.md).",
                          no_args_is_help=True)
EPOCH_STEP = 1_000  # above any epoch a process from before could have claimed since the backup


@restore_app.command("begin")
def begin(database_url: Annotated[str | None, typer.Option(
              "--database-url", show_default=False, metavar="URL",
              help="The restored database. Default: $METERGATE_DATABASE_URL, else the embedded Postgres of "
                   "`make up` in $METERGATE_DATA_DIR/pg.")] = None,
          as_json: JsonOption = False) -> None:
    """Fence every shard from before the restore, and hold auto-recharge charges.

    Run it after the restore and before metergate starts on the restored database. Then:
    `metergate check`, start metergate, and `metergate inbound reconcile --since <restore
    point>`, which applies what Stripe did since and lets charges go again."""
    from config.settings import SettingsError, load_settings
    from storage import db, holds, slots

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    url, server = database_url or settings.database_url, None
    where = _without_password(url) if url else f"the embedded Postgres in {settings.data_dir / 'pg'}"

    async def run(url: str) -> int:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                fenced = await slots.fence_every_shard(conn, EPOCH_STEP)
                await holds.hold(conn, holds.CHARGES, "restored from a backup (`metergate restore begin`): "
                                 "`metergate inbound reconcile --since <restore point>` takes this off")
            return fenced
        finally:
            await conn.close()

    try:
        if url is None:
            with warnings.catch_warnings():  # pgserver's platformdirs warns where XDG_RUNTIME_DIR is unset
                warnings.simplefilter("ignore")
                url, server = db.start_embedded_postgres(settings.data_dir)
        fenced = asyncio.run(run(url))
    except Exception as exc:  # noqa: BLE001 - asyncpg, OS and pgserver errors alike: one line naming the database
        raise CliError(f"cannot begin the restore on {where}: {type(exc).__name__}: {exc}") from None
    finally:
        if server is not None:
            db.stop_embedded_postgres(server)
    out = Output(as_json)
    if out.as_json:
        return out.json({"shards_fenced": fenced, "charges_held": True})
    out.line(f"{where}: {fenced} shards fenced (epochs moved on by {EPOCH_STEP}); new auto-recharge charges held.")
    out.line("Next: `metergate check`, start metergate, then `metergate inbound reconcile --since <restore point>`.")
