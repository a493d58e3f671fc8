"""The stored Stripe events are well-formed envelopes whose placeholders the loader fills.

Pure: no service, no Ray, no Stripe. `.venv/bin/python -m pytest -q tests/stripe_contract/test_shapes.py`
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stripe_contract.load import (
    API_VERSION, PLACEHOLDER, PLACEHOLDER_DEFAULTS, event, names, placeholders_in, raw, shift_times,
)

ENVELOPE_KEYS = {"id", "object", "api_version", "created", "data", "livemode", "pending_webhooks", "request", "type"}
HANDLED_OR_IGNORED_TYPES = {
    "checkout.session.completed", "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed", "checkout.session.expired",
    "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
    "customer.subscription.paused", "customer.subscription.resumed", "customer.subscription.trial_will_end",
    "invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed", "invoice.voided",
    "invoice.marked_uncollectible", "invoice.finalized", "invoice.created", "invoice.upcoming",
    "credit_note.created", "charge.refunded", "charge.refund.updated", "refund.created", "refund.updated",
    "refund.failed", "charge.dispute.created", "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated", "charge.dispute.closed", "payment_intent.succeeded",
    "payment_intent.payment_failed", "payment_intent.processing", "payment_intent.canceled",
    "setup_intent.succeeded", "payment_method.attached", "payment_method.detached", "customer.created",
    "customer.updated", "customer.deleted", "charge.succeeded", "charge.failed",
}
# The object each event type carries (Stripe's event-type reference).
OBJECT_OF_PREFIX = {
    "checkout.session.": "checkout.session", "customer.subscription.": "subscription",
    "invoice_payment.": "invoice_payment", "invoice.": "invoice", "credit_note.": "credit_note",
    "charge.dispute.": "dispute", "charge.refund.": "refund", "refund.": "refund", "charge.": "charge",
    "payment_intent.": "payment_intent", "setup_intent.": "setup_intent", "payment_method.": "payment_method",
    "customer.": "customer",
}
CHECKOUT_COMPLETED_VARIANTS = {"payment_paid", "payment_unpaid", "subscription_paid", "setup"}


def object_of(event_type: str) -> str:
    return next(obj for prefix, obj in OBJECT_OF_PREFIX.items() if event_type.startswith(prefix))


def test_every_event_type_metergate_handles_or_ignores_has_a_stored_payload():
    stored_types = {raw(name)["type"] for name in names()}
    assert HANDLED_OR_IGNORED_TYPES <= stored_types, sorted(HANDLED_OR_IGNORED_TYPES - stored_types)
    variants = {name.rsplit(".", 1)[1] for name in names() if name.startswith("checkout.session.completed.")}
    assert CHECKOUT_COMPLETED_VARIANTS <= variants


@pytest.mark.parametrize("name", names())
def test_stored_event_is_a_well_formed_envelope_at_the_pinned_api_version(name: str):
    stored = raw(name)
    assert stored["_source"], "every payload says where its shape came from"
    loaded = event(name)
    assert set(loaded) - {"account", "context"} == ENVELOPE_KEYS
    assert loaded["object"] == "event"
    assert loaded["id"].startswith("evt_")
    assert loaded["api_version"] == API_VERSION
    assert loaded["livemode"] is False
    assert type(loaded["created"]) is int
    assert type(loaded["pending_webhooks"]) is int
    assert set(loaded["request"]) == {"id", "idempotency_key"}
    assert name == loaded["type"] or name.startswith(loaded["type"] + ".")
    assert set(loaded["data"]) <= {"object", "previous_attributes"}
    obj = loaded["data"]["object"]
    assert obj["object"] == object_of(loaded["type"])
    # A refund object has no livemode of its own (Stripe's Refund resource); the envelope's says it.
    assert obj.get("livemode", False) is False
    assert "livemode" in obj or obj["object"] == "refund"
    if loaded["type"].endswith(".updated") or loaded["type"] == "payment_method.detached":
        assert loaded["data"]["previous_attributes"], "an update names what it changed"


@pytest.mark.parametrize("name", names())
def test_stored_event_uses_only_placeholders_the_loader_fills(name: str):
    used = placeholders_in(raw(name))
    assert used <= set(PLACEHOLDER_DEFAULTS), sorted(used - set(PLACEHOLDER_DEFAULTS))
    assert not placeholders_in(event(name)), "a loaded event has no placeholder left"


def test_loader_fills_given_ids_keeps_types_and_replaces_created():
    loaded = event("checkout.session.completed.payment_paid", org_id="org_42", customer="cus_X",
                   payment_intent="pi_X", created=1_800_000_000, id="evt_X")
    session = loaded["data"]["object"]
    assert (session["client_reference_id"], session["metadata"]["org_id"]) == ("org_42", "org_42")
    assert (session["customer"], session["payment_intent"]) == ("cus_X", "pi_X")
    assert (loaded["created"], loaded["id"]) == (1_800_000_000, "evt_X")
    assert session["created"] == raw("checkout.session.completed.payment_paid")["data"]["object"]["created"]
    assert event("refund.created", charge=None)["data"]["object"]["charge"] is None
    with pytest.raises(KeyError):
        event("refund.created", refund="re_X")


def test_shift_times_moves_every_time_and_leaves_amounts_and_nulls():
    stored = event("invoice.paid")
    shifted = shift_times(stored, 100)
    assert shifted["created"] == stored["created"] + 100
    assert shifted["data"]["object"]["status_transitions"]["paid_at"] == \
        stored["data"]["object"]["status_transitions"]["paid_at"] + 100
    assert shifted["data"]["object"]["status_transitions"]["voided_at"] is None
    assert shifted["data"]["object"]["amount_paid"] == stored["data"]["object"]["amount_paid"]


def strings_in(value) -> list[str]:
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [key, *strings_in(item)]]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("name", names())
def test_no_placeholder_is_left_half_braced_or_misspelled(name: str):
    for text in strings_in(raw(name)):
        braces = text.count("{{")
        assert braces == text.count("}}") == len(PLACEHOLDER.findall(text)), text


def test_readme_lists_every_stored_event():
    readme = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    missing = [name for name in names() if f"| `{name}` |" not in readme]
    assert not missing, missing
