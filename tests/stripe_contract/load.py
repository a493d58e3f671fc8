"""Real Stripe event payloads for contract tests.

`event(name, **values)` reads `events/<name>.json`, drops the provenance keys (those starting
with "_"), and fills the placeholders: `{{org_id}}`, `{{customer}}`, `{{payment_intent}}`,
`{{charge}}`, `{{subscription}}`, `{{invoice}}`, `{{price}}`. A string that is exactly one
placeholder takes the value as given (any JSON type); a placeholder inside a longer string takes
`str(value)`. A placeholder not passed gets its default id below, so every event is usable as is.
`created=` replaces the event's own `created` and `id=` its event id (metergate records each event
id once, so a test that sends one file twice as two deliveries gives each its own id);
`shift_times` moves every time field at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).parent / "events"
API_VERSION = "2026-10-28.endive"

# Defaults are ids of the shape Stripe gives (most from Stripe's own fixtures3.json); the price
# differs from price_1PgafmB7WZ01zgkW6dKueIc5, the "old" price of customer.subscription.updated.
PLACEHOLDER_DEFAULTS: dict[str, Any] = {
    "org_id": "org_contract",
    "customer": "cus_QXg1o8vcGmoR32",
    "payment_intent": "pi_1PgafyB7WZ01zgkWSjxsAJo3",
    "charge": "ch_1PgafuB7WZ01zgkWXYmPNZs8",
    "subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw",
    "invoice": "in_1Pgc6tB7WZ01zgkWu9fdqL6I",
    "price": "price_1Pgc7aB7WZ01zgkWq2Ld0Rxm",
}
PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")

# Every integer Unix time in the files (seconds). The scenarios sit at 1700000000 plus offsets.
TIME_FIELDS = frozenset({
    "available_on", "billing_cycle_anchor", "canceled_at", "created", "current_period_end",
    "current_period_start", "due_by", "effective_at", "end", "ended_at", "expires_at", "finalized_at",
    "marked_uncollectible_at", "next_payment_attempt", "paid_at", "period_end", "period_start", "start",
    "start_date", "subscription_proration_date", "trial_end", "trial_start", "updated_at", "voided_at",
    "webhooks_delivered_at",
})


def names() -> list[str]:
    """Every stored event, by file name without `.json` (`checkout.session.completed.setup`, ...)."""
    return sorted(path.stem for path in EVENTS_DIR.glob("*.json"))


def raw(name: str) -> dict:
    """The file as stored, provenance keys and placeholders included."""
    with open(EVENTS_DIR / f"{name}.json", encoding="utf-8") as file:
        return json.load(file)


def event(name: str, **values: Any) -> dict:
    """The event `name` as Stripe would send it, with the given ids (and `created`) filled in."""
    created = values.pop("created", None)
    event_id = values.pop("id", None)
    unknown = set(values) - set(PLACEHOLDER_DEFAULTS)
    if unknown:
        raise KeyError(f"not a placeholder of the Stripe contract events: {sorted(unknown)}")
    filled = _fill(_public(raw(name)), {**PLACEHOLDER_DEFAULTS, **values})
    if created is not None:
        assert isinstance(created, int), "created is a Unix time in whole seconds"
        filled["created"] = created
    if event_id is not None:
        assert event_id.startswith("evt_"), "a Stripe event id starts with evt_"
        filled["id"] = event_id
    return filled


def shift_times(value: Any, delta_s: int) -> Any:
    """A copy with `delta_s` added to every integer under a key of TIME_FIELDS (nulls stay null)."""
    if isinstance(value, dict):
        return {key: (item + delta_s if key in TIME_FIELDS and type(item) is int else shift_times(item, delta_s))
                for key, item in value.items()}
    if isinstance(value, list):
        return [shift_times(item, delta_s) for item in value]
    return value


def placeholders_in(value: Any) -> set[str]:
    """The placeholder names a stored event uses (for the shape test)."""
    if isinstance(value, dict):
        return set().union(set(), *(placeholders_in(key) | placeholders_in(item) for key, item in value.items()))
    if isinstance(value, list):
        return set().union(set(), *(placeholders_in(item) for item in value))
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    return set()


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items() if not key.startswith("_")}
    if isinstance(value, list):
        return [_public(item) for item in value]
    return value


def _fill(value: Any, ids: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {_fill(key, ids): _fill(item, ids) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, ids) for item in value]
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return ids[whole.group(1)]
        return PLACEHOLDER.sub(lambda match: str(ids[match.group(1)]), value)
    return value
