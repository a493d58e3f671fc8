"""`stripe ensure-products`: publish the catalog's paid tiers, credit packs and postpaid meter to
Stripe (actors/stripe_products.py), with the service's own settings (METERGATE_STRIPE_SECRET_KEY,
METERGATE_STRIPE_API_BASE, METERGATE_CATALOG). It talks to Stripe, not to metergate: run it
before the service that sells the tiers is deployed."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.client import CliError, JsonOption
from cli.output import Output

stripe_app = typer.Typer(help="Stripe: publish the catalog's products and prices.", no_args_is_help=True)


def _rows(changes) -> list[dict]:
    return [{"action": change.action, "target": change.target, "detail": change.detail} for change in changes]


def _show(out: Output, title: str, changes) -> None:
    if changes:
        out.table(title, ["action", "target", "detail"], [[c.action, c.target, c.detail] for c in changes],
                  wrap=("detail",))


@stripe_app.command("ensure-products")
def ensure_products(dry_run: Annotated[bool, typer.Option(
                        "--dry-run", help="Print what would change in Stripe, and change nothing.")] = False,
                    as_json: JsonOption = False) -> None:
    """Create or update the Stripe products and prices of the catalog: each paid tier with a
    `[tier_monthly_micros]` amount (monthly), each credit pack (one-off) and the postpaid meter
    (metered, on the `<prefix>_usage_micros` billing meter). Objects are found by their lookup
    key, so a second run changes nothing; a changed amount (or currency, recurrence, tax
    behaviour) is a new price that takes the lookup key over, the old one archived, and an
    earlier price still on sale is archived. A billing meter of the event name of another
    shape (not a sum of `value` by `stripe_customer_id`) stops the run before any change.
    Stripe refusing a change stops the run there: what was done before it is printed, nothing
    after it is changed."""
    from actors.stripe_products import EnsureFailed, ensure, plan
    from config.catalog import CatalogError, load_catalog
    from config.settings import SettingsError, load_settings, stripe_client

    try:
        settings = load_settings()
        catalog = load_catalog(settings.catalog)
    except (SettingsError, CatalogError) as exc:
        raise CliError(str(exc)) from None
    client = stripe_client(settings, max_network_retries=2)
    if client is None:
        raise CliError("METERGATE_STRIPE_SECRET_KEY is not set")
    event_name = f"{settings.stripe_meter_prefix}_usage_micros"
    out = Output(as_json)
    try:
        changes = plan(client, catalog, event_name) if dry_run else ensure(client, catalog, event_name)
    except EnsureFailed as exc:
        if out.as_json:
            out.json({"done": _rows(exc.done), "error": str(exc)})
        else:
            _show(out, "Done before the failure", exc.done)
        raise CliError(f"{exc} ({len(exc.done)} changes made before it, nothing after)") from None
    if out.as_json:
        return out.json({"dry_run": dry_run, "changes": _rows(changes)})
    if not changes:
        out.line("Stripe already holds the catalog: nothing to change.")
        return
    _show(out, "Would change (dry run)" if dry_run else "Changed", changes)
