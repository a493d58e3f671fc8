"""The Stripe contract suite (issue 24): every event type metergate handles or deliberately
ignores, in the shape Stripe sends it at the pinned API version (tests/stripe_contract/events,
taken from Stripe's own fixtures), delivered signed to POST /webhooks/stripe of the running
service, each with the state change it must cause. Stripe objects the edge reads back (a
charge's refunds, a customer's payment methods) are real ones in localstripe.

docs/stripe.md lists each type with its outcome; the last test keeps that page and
serve_app/stripe_events (HANDLED, IGNORED) the same.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from serve_app.stripe_events import HANDLED, IGNORED
from tests.helpers import CATALOG, mint, org_client, stripe_client, stripe_deliver
from tests.stripe_contract.load import event, names

US = 1_000_000
PRO_PRICE = CATALOG.stripe_prices["pro"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "stripe.md"


class Org:
    """A fresh org with a real Stripe customer (made by metergate's own setup Checkout)."""

    def __init__(self, admin, compute, sql, new_org) -> None:
        self.admin, self.compute = admin, compute
        self.id = new_org()
        assert admin.post(f"/v1/orgs/{self.id}/checkout/setup", json={}).status_code == 200
        self.customer = sql.val("SELECT customer_id FROM stripe_customers WHERE org_id = $1", self.id)
        self.payment = f"pi_{uuid.uuid4().hex[:16]}"

    def send(self, name: str, **values) -> dict:
        values = {"org_id": self.id, "customer": self.customer, "payment_intent": self.payment,
                  "price": PRO_PRICE, **values}
        body = event(name, id=f"evt_{uuid.uuid4().hex}", created=values.pop("created", int(time.time())), **values)
        answer = stripe_deliver(self.compute, body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def state(self) -> dict:
        return self.admin.get(f"/v1/orgs/{self.id}").json()

    def balance(self) -> int:
        return self.state()["balance_micros"]

    def paid(self) -> int:
        """A top-up Checkout paid with this org's payment intent: +20 USD."""
        before = self.balance()
        assert self.send("checkout.session.completed.payment_paid")["outcome"] == "applied"
        assert self.balance() == before + 20 * US
        return self.balance()


@pytest.fixture
def org(admin, compute, sql, new_org) -> Org:
    return Org(admin, compute, sql, new_org)


IGNORED_FILES = [n for n in names() if event(n)["type"] in IGNORED]


@pytest.mark.parametrize("name", IGNORED_FILES)
def test_a_type_metergate_ignores_is_answered_200_and_changes_nothing(org, name):
    before = org.state()
    answer = org.send(name)
    assert (answer["outcome"], answer["applied"]) == ("ignored", [])
    assert org.state() == before


def test_checkout_payment_credits_once_and_an_unpaid_or_failed_one_credits_nothing(org):
    balance = org.paid()
    org.send("checkout.session.completed.payment_paid")  # another delivery of the same payment
    assert org.balance() == balance
    assert org.send("checkout.session.completed.payment_unpaid", payment_intent="pi_unpaid")["outcome"] == "ignored"
    org.send("checkout.session.async_payment_failed", payment_intent="pi_unpaid")
    assert org.balance() == balance
    org.send("checkout.session.async_payment_succeeded", payment_intent="pi_async")
    assert org.balance() == balance + 20 * US


def test_a_payment_in_another_currency_is_a_dead_letter_that_credited_nothing(org):
    body = event("checkout.session.completed.payment_paid", org_id=org.id, customer=org.customer,
                 payment_intent=org.payment, id=f"evt_{uuid.uuid4().hex}", created=int(time.time()))
    session = body["data"]["object"]
    session.update(currency="krw", amount_total=10_000, metadata={})  # a Payment Link: no metergate metadata
    balance = org.balance()
    answer = stripe_deliver(org.compute, body).json()
    assert answer["outcome"] == "dead_letter" and "'krw'" in answer["reason"]
    assert org.balance() == balance


def test_subscription_checkout_and_lifecycle_set_the_tier_by_price(org):
    assert org.send("checkout.session.completed.subscription_unpaid")["outcome"] == "ignored"
    assert org.state()["tier"] == "base"
    org.send("checkout.session.completed.subscription_paid")
    assert org.state()["tier"] == "pro"
    now = int(time.time())
    org.send("customer.subscription.created", created=now - 50)  # incomplete, older than the Checkout's news
    assert org.state()["tier"] == "base"  # ... but the subscription's own news wins over the Checkout's
    org.send("customer.subscription.updated", created=now - 40)
    assert (org.state()["tier"], org.state()["max_concurrent"]) == ("pro", 100)
    org.send("customer.subscription.paused", created=now - 30)
    assert org.state()["tier"] == "base"
    org.send("customer.subscription.resumed", created=now - 20)
    assert org.state()["tier"] == "pro"
    # A portal switch changes only the price: the tier follows it.
    org.send("customer.subscription.updated", created=now - 10, price=CATALOG.stripe_prices["pro_plus"])
    assert org.state()["tier"] == "pro_plus"
    org.send("customer.subscription.deleted", created=now)
    assert (org.state()["tier"], org.state()["max_concurrent"]) == ("base", 5)


def test_a_second_subscription_and_cancelling_the_old_one(org):
    now = int(time.time())
    org.send("customer.subscription.updated", created=now - 30, subscription="sub_old")
    org.send("customer.subscription.updated", created=now - 20, subscription="sub_new",
             price=CATALOG.stripe_prices["pro_plus"])
    org.send("customer.subscription.updated", created=now - 10, subscription="sub_old")  # its renewal
    assert org.state()["tier"] == "pro_plus"
    org.send("customer.subscription.deleted", created=now, subscription="sub_old")
    assert org.state()["tier"] == "pro_plus"


@pytest.mark.parametrize("settled", ["invoice.paid", "invoice.payment_succeeded", "invoice.voided",
                                     "invoice.marked_uncollectible", "invoice.paid.credited_in_full"])
def test_dunning_starts_with_a_failed_subscription_invoice_and_ends_when_it_is_settled(org, settled):
    assert org.send("invoice.payment_failed")["outcome"] == "applied"
    assert org.state()["past_due_since"] is not None
    assert org.send(settled)["outcome"] == "applied"
    assert org.state()["past_due_since"] is None
    # A failure of that same invoice delivered late is old news.
    org.send("invoice.payment_failed")
    assert org.state()["past_due_since"] is None


def test_a_one_off_invoice_failing_is_recorded_and_starts_no_dunning(org):
    body = event("invoice.payment_failed", org_id=org.id, customer=org.customer, id=f"evt_{uuid.uuid4().hex}",
                 created=int(time.time()))
    invoice = body["data"]["object"]
    invoice.update(parent=None, billing_reason="manual")
    answer = stripe_deliver(org.compute, body).json()
    assert answer["outcome"] == "ignored" and answer["reason"].startswith("one_off_invoice")
    assert org.state()["past_due_since"] is None


@pytest.mark.parametrize("reported_by", ["refund.created", "refund.updated", "charge.refund.updated"])
def test_a_refund_claws_back_pending_or_not_and_its_failure_gives_back(org, reported_by):
    balance = org.paid()
    org.send(reported_by, payment_intent=org.payment)
    assert org.balance() == balance - 20 * US
    for _ in range(2):
        org.send("refund.failed", payment_intent=org.payment)
    assert org.balance() == balance


def test_charge_refunded_lists_the_refunds_from_stripe(org, service, admin):
    """The charge of a real payment in localstripe, refunded there; the event (as newer API
    versions send it) carries no refunds: metergate lists them."""
    client = stripe_client(service)
    method = attach_card(service, org.customer)
    intent = client.v1.payment_intents.create(params={
        "amount": 2000, "currency": "usd", "customer": org.customer, "payment_method": method.id, "confirm": True})
    org.payment = intent.id
    balance = org.paid()
    refund = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    answer = org.send("charge.refunded", charge=refund.charge, payment_intent=intent.id)
    assert [a["command"] for a in answer["applied"]] == ["RefundPayment"]
    assert org.balance() == balance - 5 * US


def test_a_dispute_takes_back_what_the_payment_bought_and_its_reinstatement_gives_it_back(org):
    balance = org.paid()
    org.send("charge.dispute.created", payment_intent=org.payment)
    assert org.balance() == balance
    for _ in range(2):
        org.send("charge.dispute.funds_withdrawn", payment_intent=org.payment)
    assert org.balance() == balance - 20 * US
    for _ in range(2):
        org.send("charge.dispute.funds_reinstated", payment_intent=org.payment)
    assert org.balance() == balance
    org.send("charge.dispute.closed", payment_intent=org.payment)
    assert org.balance() == balance


def test_a_dispute_of_a_payment_that_bought_no_credit_is_found_by_its_charge_and_takes_nothing(org, service):
    """A subscription invoice's charge, say: the dispute names only the charge, whose customer
    (read from Stripe) is the org's; nothing to take back, but it stops auto-recharge."""
    client = stripe_client(service)
    method = attach_card(service, org.customer)
    intent = client.v1.payment_intents.create(params={
        "amount": 2000, "currency": "usd", "customer": org.customer, "payment_method": method.id, "confirm": True})
    org.send("payment_method.attached")
    assert org.admin.put(f"/v1/orgs/{org.id}/auto-recharge", json={
        "enabled": True, "threshold_micros": 1_000_000, "amount_micros": 10_000_000}).status_code == 200
    balance = org.balance()
    answer = org.send("charge.dispute.funds_withdrawn", payment_intent=intent.id, charge=charge_of(intent))
    assert (answer["outcome"], [a["command"] for a in answer["applied"]]) == ("applied", ["DisputeFunds"])
    assert org.balance() == balance and org.state()["auto_recharge"]["paused"] == "disputed"
    # The org's own settings do not lift it; an operator's do.
    with org_client(service, mint(org.admin, org.id)) as owner:
        mine = owner.put(f"/v1/orgs/{org.id}/auto-recharge", json={
            "enabled": True, "threshold_micros": 1_000_000, "amount_micros": 10_000_000})
        assert mine.status_code == 200, mine.text
    assert org.state()["auto_recharge"]["paused"] == "disputed"
    org.admin.put(f"/v1/orgs/{org.id}/auto-recharge", json={
        "enabled": True, "threshold_micros": 1_000_000, "amount_micros": 10_000_000})
    assert org.state()["auto_recharge"]["paused"] is None


def test_a_refund_failure_before_the_payment_is_credited_waits_with_the_org_not_in_a_dead_letter(org, service):
    client = stripe_client(service)
    method = attach_card(service, org.customer)
    intent = client.v1.payment_intents.create(params={
        "amount": 2000, "currency": "usd", "customer": org.customer, "payment_method": method.id, "confirm": True})
    org.payment = intent.id
    pending = org.send("refund.created", charge=charge_of(intent))  # before the Checkout's credit landed
    assert pending["outcome"] == "applied"
    failed = org.send("refund.failed", charge=charge_of(intent))
    assert failed["outcome"] == "applied"
    balance = org.balance()
    org.send("checkout.session.completed.payment_paid")
    assert org.balance() == balance + 20 * US  # the refund failed: it takes nothing when the credit comes


def refund_of(org: Org, name: str, refund_id: str, cents: int) -> dict:
    body = event(name, org_id=org.id, customer=org.customer, payment_intent=org.payment, price=PRO_PRICE,
                 id=f"evt_{uuid.uuid4().hex}", created=int(time.time()))
    body["data"]["object"].update(id=refund_id, amount=cents)
    answer = stripe_deliver(org.compute, body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_after_a_partial_refund_failed_a_full_refund_takes_all_the_payment_bought(org):
    balance = org.paid()
    refund_of(org, "refund.created", "re_part", 500)
    refund_of(org, "refund.failed", "re_part", 500)  # 5 USD given back as a grant of their own
    assert org.balance() == balance
    refund_of(org, "refund.created", "re_full", 2000)
    assert org.balance() == balance - 20 * US


def test_a_dispute_after_a_partial_refund_takes_only_the_rest(org):
    balance = org.paid()
    refund_of(org, "refund.created", "re_part", 500)
    org.send("charge.dispute.funds_withdrawn", payment_intent=org.payment)  # the whole 20 USD charge
    assert org.balance() == balance - 20 * US  # 5 by the refund, 15 by the dispute: never 25


def test_a_refund_and_a_dispute_of_a_taxed_payment_take_their_share_of_the_credit_never_the_tax(org, sql):
    """Billing-rules 3.0 through the endpoint and the ledger: 20 USD of credit paid 22 USD with
    2 USD of tax (metergate's Checkout with automatic tax)."""
    body = event("checkout.session.completed.payment_paid", org_id=org.id, customer=org.customer,
                 payment_intent=org.payment, id=f"evt_{uuid.uuid4().hex}", created=int(time.time()))
    body["data"]["object"].update(amount_total=2_200, total_details={"amount_discount": 0, "amount_shipping": 0,
                                                                     "amount_tax": 200})
    balance = org.balance()
    assert stripe_deliver(org.compute, body).json()["outcome"] == "applied"
    assert org.balance() == balance + 20 * US
    assert sql.val("SELECT paid_micros FROM ledger WHERE org_id = $1 AND kind = 'topup'", org.id) == 22 * US
    refund_of(org, "refund.created", "re_half", 1_100)  # half of what was paid: half the credit
    assert org.balance() == balance + 10 * US
    org.send("charge.dispute.funds_withdrawn", payment_intent=org.payment)  # 20 USD: its share, 18.18, > the 10 left
    assert org.balance() == balance  # 10 by the refund, 10 by the dispute: the tax never


def test_cancelling_a_subscription_with_a_failed_invoice_ends_its_dunning(org):
    now = int(time.time())
    org.send("customer.subscription.updated", created=now - 20)
    assert org.send("invoice.payment_failed", created=now - 10)["outcome"] == "applied"
    assert org.state()["past_due_since"] is not None
    org.send("customer.subscription.deleted", created=now)
    assert org.state()["past_due_since"] is None


def test_auto_recharge_payment_intents_settle(org):
    balance = org.balance()
    assert org.send("payment_intent.succeeded")["applied"][0]["command"] == "SettleRecharge"
    assert org.balance() == balance + 20 * US
    assert org.send("payment_intent.payment_failed", payment_intent="pi_declined")["outcome"] == "applied"


def charge_of(intent) -> str:
    latest = intent.latest_charge
    return latest if isinstance(latest, str) else latest.id


def attach_card(service, customer: str):
    client = stripe_client(service)
    method = client.v1.payment_methods.create(params={"type": "card", "card": {
        "number": "4242424242424242", "exp_month": "12", "exp_year": "2031", "cvc": "123"}})
    return client.v1.payment_methods.attach(method.id, params={"customer": customer})


@pytest.mark.parametrize("name", ["setup_intent.succeeded", "checkout.session.completed.setup"])
def test_a_saved_card_is_on_file_while_stripe_lists_it(org, service, name):
    method = attach_card(service, org.customer)
    org.send(name)
    assert org.state()["has_payment_method"] is True
    stripe_client(service).v1.payment_methods.detach(method.id)
    org.send("payment_method.detached")
    org.send(name)  # delivered late, after the detach
    assert org.state()["has_payment_method"] is False


def test_an_attach_is_checked_with_stripe_so_a_late_one_after_the_detach_changes_nothing(org, service):
    org.send("payment_method.attached")  # Stripe lists no payment method for the customer
    assert org.state()["has_payment_method"] is False
    method = attach_card(service, org.customer)
    org.send("payment_method.attached")
    assert org.state()["has_payment_method"] is True
    stripe_client(service).v1.payment_methods.detach(method.id)
    org.send("payment_method.detached")
    assert org.state()["has_payment_method"] is False
    org.send("payment_method.attached")  # the attach, delivered late
    assert org.state()["has_payment_method"] is False


def test_a_deleted_customer_leaves_no_card_on_file(org, service):
    attach_card(service, org.customer)
    org.send("payment_method.attached")
    assert org.state()["has_payment_method"] is True
    org.send("customer.deleted")
    assert org.state()["has_payment_method"] is False


def test_every_stored_event_type_is_handled_or_ignored_on_purpose():
    types = {event(n)["type"] for n in names()}
    assert types <= set(HANDLED) | set(IGNORED), types - set(HANDLED) - set(IGNORED)
    assert not set(HANDLED) & set(IGNORED)
    assert set(HANDLED) | set(IGNORED) <= types, "a type without a real payload in tests/stripe_contract"


def render_event_table() -> str:
    rows = ["| Event type | What metergate does |", "|---|---|"]
    rows += [f"| `{t}` | {HANDLED[t]} |" for t in sorted(HANDLED)]
    rows += [f"| `{t}` | ignored: {IGNORED[t]} |" for t in sorted(IGNORED)]
    return "\n".join(rows)


def test_the_docs_stripe_page_lists_every_type_with_its_outcome():
    page = DOCS.read_text()
    found = re.search(r"<!-- stripe-events:begin -->\n(.*?)\n<!-- stripe-events:end -->", page, re.S)
    assert found, "docs/stripe.md lacks the stripe-events block"
    assert found.group(1) == render_event_table(), "docs/stripe.md is out of date; its table should be:\n" + \
        render_event_table()
