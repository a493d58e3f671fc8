"""A small Stripe-protocol fake for what localstripe lacks: Checkout and portal sessions,
and the `checkout.session.completed` and `charge.refunded` events (listed by GET /v1/events
with localstripe's own).

Everything else is proxied to localstripe, so one `api_base` serves both. Idempotency-Key
is honoured for the sessions made here and for POST /v1/payment_intents and /v1/customers as Stripe does it
(localstripe ignores it): the same key with the same parameters gets the first answer again,
with other parameters a 400 `idempotency_error`. GET /v1/payment_methods?customer= without a
`type` lists the customer's methods of every type, newest first (localstripe wants a type).
For tests:
- GET /_fake/sessions lists the sessions;
- POST /_fake/sessions/{id}/complete does what a customer finishing Checkout makes Stripe do,
  with real localstripe objects: a saved card (setup), a paid payment intent (payment) or a
  subscription (subscription); then it sends `checkout.session.completed`;
- GET /_fake/payment_intents/keys lists, per idempotency key, the intents made under it;
- POST /_fake/payment_methods {"fail_next": n} answers the next n payment method lists 500;
- POST /_config/webhooks/{name} registers a webhook endpoint here and in localstripe, so the
  events of both reach it, signed the same way;
- subscriptions read and updated through here look as Stripe's do, where localstripe differs
  (see `update_subscription`); GET /_fake/subscription_updates lists the updates made.
- prices (localstripe has only the legacy plans): POST/GET /v1/prices, GET/POST /v1/prices/{id},
  with `lookup_keys` lists, a lookup key held by one price at a time and moved by
  `transfer_lookup_key`, Idempotency-Key honoured, a `unit_amount` above 99999999 refused as
  Stripe does; a subscription Checkout completed here on such a price bills its amount, and a
  subscription item on one shows it whole (lookup key, metadata) as Stripe does; an archived
  price is refused to a Checkout and a subscription update, as Stripe does;
  POST /_fake/prices {"refuse_archive_next": n} refuses the next n archivings (active=false);
- billing credit grants (localstripe has none): POST /v1/billing/credit_grants (monetary, paid or
  promotional, optional expires_at, effective_at) and GET /v1/billing/credit_grants?customer=;
  GET /v1/billing/credit_balance_summary (one grant's available balance), and
  POST /_fake/credit_grants/{id} {"used": cents} to say how much of a grant invoices used;
- POST /v1/billing/meters makes a meter (listed with those of the events sent, which have the
  shape metergate's meter has);
- a restricted key named `rk_test_readonly…` may read but not write (403, as Stripe answers a
  restricted key without the write permission).
Run: python this.py PORT LOCALSTRIPE_PORT
"""

import asyncio
import hashlib
import hmac
import itertools
import json
import sys
import time
import urllib.parse

from aiohttp import ClientSession, web

sessions: dict[str, dict] = {}
by_key: dict[str, dict] = {}
webhooks: dict[str, dict] = {}
subscription_updates: list[dict] = []  # each update that reached localstripe (replays not)
subscription_metadata: dict[str, dict] = {}  # metadata set by updates (localstripe drops it)
# An item keeps its id when its price changes (localstripe makes a new one): the id shown for
# localstripe's current item, and localstripe's current item for an id shown.
shown_item_id: dict[str, str] = {}
current_item_id: dict[str, str] = {}
updates_by_key: dict[str, tuple[dict, dict | None]] = {}  # Idempotency-Key → (params, answer; None: running)
PRORATION_BEHAVIORS = ("create_prorations", "none", "always_invoice")
meter_events: list[dict] = []  # every meter event request, with the status it got
meter_failures = {"next": 0}
meter_identifiers: set[str] = set()  # what Stripe still dedupes (it forgets after 24 hours)
intent_failures = {"next": 0}  # POST /v1/payment_intents answered 500 while > 0 (Stripe having a bad minute)
intents_by_key: dict[str, dict] = {}  # Idempotency-Key -> {"params", "status", "body"} of its first answer
customers_by_key: dict[str, dict] = {}
method_list_failures = {"next": 0}  # GET /v1/payment_methods answered 500 while > 0
attached: list[tuple[str, str]] = []  # (customer, payment method) in the order they were attached
counter = itertools.count(1)
sent_events: list[dict] = []  # the events sent from here, for GET /v1/events (localstripe lists its own)
prices: dict[str, dict] = {}  # id -> price (localstripe has no prices)
prices_by_key: dict[str, dict] = {}  # Idempotency-Key -> the price it made
created_meters: dict[str, dict] = {}  # event name -> meter made by POST /v1/billing/meters
archive_refusals = {"next": 0}  # POST /v1/prices/{id} active=false answered 400 while > 0
READ_ONLY_KEY = "rk_test_readonly"
UNIT_AMOUNT_MAX = 99_999_999  # Stripe's largest unit_amount in USD cents
CARD = {"number": "4242424242424242", "exp_month": "12", "exp_year": "2031", "cvc": "123"}


def nested(form: list[tuple[str, str]]) -> dict:
    """Stripe's form encoding (a[b][0][c]=v) back into dicts; numeric keys become lists."""
    root: dict = {}
    for key, value in form:
        parts = key.replace("]", "").split("[")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node):
        if isinstance(node, dict):
            if node and all(k.isdigit() for k in node):
                return [lists(node[k]) for k in sorted(node, key=int)]
            return {k: lists(v) for k, v in node.items()}
        return node

    return lists(root)


async def create_session(request: web.Request, kind: str) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key and key in by_key:
        return web.json_response(by_key[key])
    params = nested(urllib.parse.parse_qsl(await request.text()))
    refused = inactive_price([item.get("price") for item in params.get("line_items", [])])
    if refused is not None:
        return refused
    n = next(counter)
    if kind == "checkout":
        total = sum(int(item.get("price_data", {}).get("unit_amount", 0)) * int(item.get("quantity", 1))
                    for item in params.get("line_items", []))
        obj = {"id": f"cs_test_{n}", "object": "checkout.session", "url": f"http://checkout.invalid/pay/cs_test_{n}",
               "status": "open", "payment_status": "unpaid", "amount_total": total,
               "payment_intent": f"pi_fake_{n}" if params.get("mode") == "payment" else None, **params}
    else:
        obj = {"id": f"bps_test_{n}", "object": "billing_portal.session",
               "url": f"http://portal.invalid/session/bps_test_{n}", **params}
    sessions[obj["id"]] = obj
    if key:
        by_key[key] = obj
    return web.json_response(obj)


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response(list(sessions.values()))


def form(params: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Dicts into Stripe's form encoding."""
    pairs = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else key
        if isinstance(value, dict):
            pairs += form(value, name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                pairs += form(item, f"{name}[{i}]") if isinstance(item, dict) else [(f"{name}[{i}]", str(item))]
        elif value is not None:
            pairs.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
    return pairs


async def call_upstream(request: web.Request, method: str, path: str, params: dict | None = None) -> dict:
    headers = {"Authorization": request.headers.get("Authorization", "Bearer sk_test_front"),
               "Content-Type": "application/x-www-form-urlencoded"}
    body = urllib.parse.urlencode(form(params or {})) if method != "GET" else None
    async with ClientSession() as client:
        async with client.request(method, request.app["upstream"] + path, headers=headers, data=body) as response:
            body = await response.json()
            if response.status >= 400:
                raise web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")
            return body


async def send_event(kind: str, obj: dict, previous_attributes: dict | None = None) -> None:
    """Signed as Stripe signs (and as localstripe does), to every registered endpoint."""
    created = int(time.time())
    data = {"object": obj, **({"previous_attributes": previous_attributes} if previous_attributes else {})}
    event = {"id": f"evt_front_{next(counter)}", "object": "event", "type": kind, "created": created, "data": data}
    sent_events.append(event)
    payload = json.dumps(event).encode()
    for hook in list(webhooks.values()):
        if hook["events"] is not None and kind not in hook["events"]:
            continue
        signature = hmac.new(hook["secret"].encode(), b"%d.%s" % (created, payload), hashlib.sha256).hexdigest()
        async with ClientSession() as client:
            async with client.post(hook["url"], data=payload, headers={
                    "Content-Type": "application/json", "Stripe-Signature": f"t={created},v1={signature}"}) as r:
                await r.read()


async def list_events(request: web.Request) -> web.Response:
    """GET /v1/events: localstripe's events and those sent from here, newest first, paged as
    Stripe pages (`created[gte]`, `limit`, `starting_after`)."""
    since = int(request.query.get("created[gte]", "0"))
    limit = min(int(request.query.get("limit", "10")), 100)
    every, after = [], None
    while True:  # localstripe's own pages, to the end
        query = urllib.parse.urlencode({"created[gte]": since, "limit": 100, **({"starting_after": after} if after else {})})
        page = await call_upstream(request, "GET", f"/v1/events?{query}")
        every += page["data"]
        if not page["has_more"] or not page["data"]:
            break
        after = page["data"][-1]["id"]
    every += [event for event in sent_events if event["created"] >= since]
    every.sort(key=lambda event: (event["created"], event["id"]), reverse=True)
    start = request.query.get("starting_after")
    if start is not None:
        ids = [event["id"] for event in every]
        if start not in ids:
            return stripe_error(404, "invalid_request_error", f"No such event: '{start}'", "resource_missing")
        every = every[ids.index(start) + 1:]
    return web.json_response({"object": "list", "url": "/v1/events", "data": every[:limit],
                              "has_more": len(every) > limit})


async def default_card(request: web.Request, customer: str, number: str | None) -> str:
    """A card attached to the customer and made its default (what Checkout collects)."""
    card = await call_upstream(request, "POST", "/v1/payment_methods",
                          {"type": "card", "card": {**CARD, "number": number or CARD["number"]}})
    await call_upstream(request, "POST", f"/v1/payment_methods/{card['id']}/attach", {"customer": customer})
    attached.append((customer, card["id"]))
    await call_upstream(request, "POST", f"/v1/customers/{customer}",
                   {"invoice_settings": {"default_payment_method": card["id"]}})
    return card["id"]


async def ensure_plan(request: web.Request, price: str) -> None:
    """localstripe prices subscriptions by plan: one plan per catalog price id, made on first use."""
    try:
        await call_upstream(request, "GET", f"/v1/plans/{price}")
    except web.HTTPBadRequest:
        amount = prices.get(price, {}).get("unit_amount") or 2000  # a price published here: its own amount
        await call_upstream(request, "POST", "/v1/plans", {"id": price, "amount": amount, "currency": "usd",
                                                          "interval": "month", "product": {"name": price}})


def as_stripe(subscription: dict) -> dict:
    """A localstripe subscription as Stripe shows it: each item has its `price` (localstripe
    has only the legacy `plan`), and the metadata updates set."""
    items = subscription.get("items") or {}
    data = [{**item, "id": shown_item_id.get(item["id"], item["id"]), "price": item.get("price") or prices.get(
        item["plan"]["id"]) or {"id": item["plan"]["id"], "object": "price", "unit_amount": item["plan"].get("amount"),
                                "currency": item["plan"].get("currency"),
                                "recurring": {"interval": item["plan"].get("interval")}}}
        for item in items.get("data", [])]
    metadata = {**(subscription.get("metadata") or {}), **subscription_metadata.get(subscription["id"], {})}
    return {**subscription, "items": {**items, "data": data}, "metadata": metadata}


def stripe_error(status: int, kind: str, message: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, **({"code": code} if code else {})}},
                             status=status)


def inactive_price(price_ids: list) -> web.Response | None:
    """Stripe's answer to a Checkout or subscription change on an archived price (one published here)."""
    for price_id in price_ids:
        if price_id in prices and not prices[price_id]["active"]:
            return stripe_error(400, "invalid_request_error", f"The price specified ({price_id}) is inactive. This "
                                "field only accepts active prices.")
    return None


async def list_subscriptions(request: web.Request) -> web.Response:
    page = await call_upstream(request, "GET", request.path_qs)
    return web.json_response({**page, "data": [as_stripe(s) for s in page["data"]]})


async def get_subscription(request: web.Request) -> web.Response:
    return web.json_response(as_stripe(await call_upstream(request, "GET", request.path_qs)))


async def update_subscription(request: web.Request) -> web.Response:
    """POST /v1/subscriptions/{id} as Stripe answers it, where localstripe falls short: an item
    moves to another `price` (localstripe knows only `plan`), `proration_behavior` is one of
    Stripe's three (localstripe refuses the parameter), metadata is merged (localstripe drops
    it), `customer.subscription.updated` is sent with `previous_attributes` (localstripe sends
    none), and the Idempotency-Key holds (localstripe ignores it): the same key replays the first
    answer, with other parameters is an `idempotency_error`, and while the first is still running
    is 409 `idempotency_key_in_use` (which stripe-python retries). Not emulated: the proration
    invoice items and `always_invoice`'s immediate invoice. The moved item keeps its id, as in
    Stripe (localstripe makes a new item: its id is shown as the old one's)."""
    subscription_id = request.match_info["id"]
    params = nested(urllib.parse.parse_qsl(await request.text()))
    key = request.headers.get("Idempotency-Key")
    if key and key in updates_by_key:
        first, answer = updates_by_key[key]
        if first != params:
            return stripe_error(400, "idempotency_error", "Keys for idempotent requests can only be used with the "
                                "same parameters they were first used with.")
        if answer is None:
            return stripe_error(409, "invalid_request_error", "There is currently another in-progress request "
                                "using this idempotent key.", "idempotency_key_in_use")
        return web.json_response(answer)
    refused = inactive_price([item.get("price") for item in params.get("items", [])])
    if refused is not None:
        return refused
    behavior = params.pop("proration_behavior", None)
    if behavior is not None and behavior not in PRORATION_BEHAVIORS:
        return stripe_error(400, "invalid_request_error", f"Invalid proration_behavior: must be one of "
                            f"{', '.join(PRORATION_BEHAVIORS)}")
    if key:
        updates_by_key[key] = (dict(params, **({"proration_behavior": behavior} if behavior else {})), None)
    try:
        before = as_stripe(await call_upstream(request, "GET", f"/v1/subscriptions/{subscription_id}"))
        metadata = params.pop("metadata", None)
        items = params.pop("items", None)
        upstream = dict(params)
        if items is not None:
            for item in items:
                if item.get("price"):
                    await ensure_plan(request, item["price"])
            upstream["items"] = [{**{k: v for k, v in item.items() if k != "price"},
                                  **({"id": current_item_id.get(item["id"], item["id"])} if item.get("id") else {}),
                                  **({"plan": item["price"]} if item.get("price") else {})} for item in items]
        if upstream:
            moved = await call_upstream(request, "POST", f"/v1/subscriptions/{subscription_id}", upstream)
            if items is not None and len(items) == 1 == len(moved["items"]["data"]) and items[0].get("id"):
                new_id = moved["items"]["data"][0]["id"]
                shown_item_id[new_id], current_item_id[items[0]["id"]] = items[0]["id"], new_id
        # Metadata after the price, so that a read between the two never sees the new metadata
        # with the old price (Stripe changes both at once; a reader sees the new price first here).
        if metadata:
            subscription_metadata.setdefault(subscription_id, {}).update(metadata)
        after = as_stripe(await call_upstream(request, "GET", f"/v1/subscriptions/{subscription_id}"))
    except BaseException:
        if key:
            updates_by_key.pop(key, None)  # Stripe keeps no key for a request that failed before it ran
        raise
    if key:
        updates_by_key[key] = (updates_by_key[key][0], after)
    subscription_updates.append({"subscription": subscription_id, "idempotency_key": key,
                                 "proration_behavior": behavior,
                                 "prices": [item["price"]["id"] for item in after["items"]["data"]],
                                 "metadata": after["metadata"]})
    previous = {name: before[name] for name in ("items", "metadata") if before[name] != after[name]}
    asyncio.ensure_future(send_event("customer.subscription.updated", after, previous))
    return web.json_response(after)


async def list_subscription_updates(request: web.Request) -> web.Response:
    return web.json_response(subscription_updates)


async def complete_session(request: web.Request) -> web.Response:
    session = sessions[request.match_info["id"]]
    options = await request.json() if request.can_read_body else {}
    customer, mode = session["customer"], session["mode"]
    card = await default_card(request, customer, options.get("card"))
    if mode == "payment":
        intent = await call_upstream(request, "POST", "/v1/payment_intents", {
            "amount": session["amount_total"], "currency": "usd", "customer": customer, "payment_method": card,
            "confirm": True, "metadata": session.get("payment_intent_data", {}).get("metadata", {})})
        session.update(payment_intent=intent["id"], payment_status="paid")
    elif mode == "subscription":
        price = session["line_items"][0]["price"]
        await ensure_plan(request, price)
        subscription = await call_upstream(request, "POST", "/v1/subscriptions", {
            "customer": customer, "items": [{"plan": price}],
            "metadata": session.get("subscription_data", {}).get("metadata", {})})
        session.update(subscription=subscription["id"], payment_status="paid")
    else:
        session.update(setup_intent=None, payment_method=card)
    session["status"] = "complete"
    asyncio.ensure_future(send_event("checkout.session.completed", session))
    return web.json_response(session)


async def create_meter_event(request: web.Request) -> web.Response:
    """Stripe's Billing meter events (localstripe has none); answers 429 while told to."""
    params = nested(urllib.parse.parse_qsl(await request.text()))
    if meter_failures["next"] > 0:
        meter_failures["next"] -= 1
        meter_events.append({**params, "status": 429})
        return web.json_response({"error": {"type": "rate_limit_error", "message": "Too many requests"}}, status=429)
    # Stripe drops an identifier it saw in the last 24 hours (`deduped` here, not counted).
    deduped = params.get("identifier") in meter_identifiers
    meter_identifiers.add(params.get("identifier"))
    meter_events.append({**params, "status": 200, "deduped": deduped})
    return web.json_response({"object": "billing.meter_event", **params})


async def meter_control(request: web.Request) -> web.Response:
    """POST {"fail_next": n}: the next n meter events get 429; {"forget_identifiers": true}: a
    day passes, and Stripe no longer knows the identifiers it saw."""
    if request.method == "POST":
        control = await request.json()
        if "fail_next" in control:
            meter_failures["next"] = int(control["fail_next"])
        if control.get("forget_identifiers"):
            meter_identifiers.clear()
    return web.json_response(meter_events)


def _counted(event: dict) -> bool:
    return event["status"] == 200 and not event["deduped"]


async def list_meters(request: web.Request) -> web.Response:
    """GET /v1/billing/meters: a meter for each event name sent here or made by POST (Stripe's
    are made in its dashboard or by `metergate stripe ensure-products`; metergate finds its
    meter by event name)."""
    names = sorted({event["event_name"] for event in meter_events} | set(created_meters))
    return web.json_response({"object": "list", "url": "/v1/billing/meters", "has_more": False, "data": [
        created_meters.get(name) or {
            "id": f"mtr_{name}", "object": "billing.meter", "event_name": name, "status": "active",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"}} for name in names]})


async def create_meter(request: web.Request) -> web.Response:
    """POST /v1/billing/meters: one active meter per event name, as Stripe allows."""
    params = nested(urllib.parse.parse_qsl(await request.text()))
    name = params.get("event_name", "")
    if not name or name in created_meters:
        return stripe_error(400, "invalid_request_error", f"An active meter with event_name {name!r} already exists.")
    created_meters[name] = {"id": f"mtr_{name}", "object": "billing.meter", "status": "active", **params}
    return web.json_response(created_meters[name])


credit_grants: dict[str, dict] = {}


async def create_credit_grant(request: web.Request) -> web.Response:
    """POST /v1/billing/credit_grants (localstripe has no billing credit grants): a monetary
    grant of a customer, `category` paid or promotional, optional `expires_at`."""
    params = nested(urllib.parse.parse_qsl(await request.text()))
    monetary = (params.get("amount") or {}).get("monetary") or {}
    grant_id = f"credgr_test_{next(counter)}"
    credit_grants[grant_id] = {
        "id": grant_id, "object": "billing.credit_grant", "customer": params.get("customer"),
        "category": params.get("category", "paid"), "name": params.get("name"), "livemode": False,
        "amount": {"type": "monetary", "monetary": {"value": int(monetary.get("value", 0)),
                                                     "currency": monetary.get("currency", "usd")}},
        "expires_at": int(params["expires_at"]) if params.get("expires_at") else None, "voided_at": None,
        "effective_at": int(params["effective_at"]) if params.get("effective_at") else int(time.time()),
        "created": int(time.time()), "metadata": params.get("metadata") or {}, "_used": 0}
    return web.json_response(_shown(credit_grants[grant_id]))


def _shown(grant: dict) -> dict:
    return {k: v for k, v in grant.items() if not k.startswith("_")}


async def use_credit_grant(request: web.Request) -> web.Response:
    """POST /_fake/credit_grants/{id} {"used": cents}: how much of a grant invoices used."""
    grant = credit_grants[request.match_info["id"]]
    grant["_used"] = int((await request.json())["used"])
    return web.json_response(_shown(grant))


async def credit_balance_summary(request: web.Request) -> web.Response:
    """GET /v1/billing/credit_balance_summary?customer=&filter[type]=credit_grant&filter[credit_grant]=:
    what is left of one grant (its amount less what invoices used), as Stripe answers it."""
    grant = credit_grants.get(request.query.get("filter[credit_grant]", ""))
    if grant is None or grant["customer"] != request.query.get("customer"):
        return stripe_error(404, "invalid_request_error", "No such credit grant")
    monetary = grant["amount"]["monetary"]
    left = {"type": "monetary", "monetary": {"value": max(0, monetary["value"] - grant["_used"]),
                                             "currency": monetary["currency"]}}
    return web.json_response({"object": "billing.credit_balance_summary", "customer": grant["customer"],
                              "livemode": False, "balances": [{"available_balance": left, "ledger_balance": left}]})


async def list_credit_grants(request: web.Request) -> web.Response:
    """GET /v1/billing/credit_grants?customer=: the customer's grants, newest first (one page)."""
    customer = request.query.get("customer")
    found = [_shown(g) for g in reversed(credit_grants.values()) if customer in (None, g["customer"])]
    return web.json_response({"object": "list", "url": "/v1/billing/credit_grants", "has_more": False,
                              "data": found})


def _boolean(value) -> bool:
    return str(value).lower() == "true"


async def create_price(request: web.Request) -> web.Response:
    """POST /v1/prices: Stripe's checks that metergate's catalog can meet (a product that
    exists, an amount in range, a lookup key that one price holds unless transferred)."""
    key = request.headers.get("Idempotency-Key")
    if key and key in prices_by_key:
        return web.json_response(prices_by_key[key])
    params = nested(urllib.parse.parse_qsl(await request.text()))
    try:
        await call_upstream(request, "GET", f"/v1/products/{params.get('product', '')}")
    except web.HTTPBadRequest:
        return stripe_error(400, "invalid_request_error", f"No such product: '{params.get('product')}'",
                            "resource_missing")
    amount = int(params["unit_amount"]) if "unit_amount" in params else None
    if amount is not None and not 0 <= amount <= UNIT_AMOUNT_MAX:
        return stripe_error(400, "invalid_request_error",
                            f"Invalid integer: {amount}. This value must be less than or equal to {UNIT_AMOUNT_MAX}.")
    lookup_key = params.get("lookup_key")
    holder = next((p for p in prices.values() if lookup_key and p["lookup_key"] == lookup_key), None)
    if holder is not None and not _boolean(params.get("transfer_lookup_key")):
        return stripe_error(400, "invalid_request_error",
                            f"A price (`{holder['id']}`) already uses that lookup key.")
    if holder is not None:
        holder["lookup_key"] = None
    recurring = params.get("recurring")
    price = {"id": f"price_front_{next(counter)}", "object": "price", "active": True, "currency": params["currency"],
             "product": params["product"], "unit_amount": amount,
             "unit_amount_decimal": params.get("unit_amount_decimal", str(amount) if amount is not None else None),
             "recurring": ({"interval": recurring.get("interval"), "usage_type": recurring.get("usage_type", "licensed"),
                            "meter": recurring.get("meter")} if recurring else None),
             "type": "recurring" if recurring else "one_time", "lookup_key": lookup_key,
             "tax_behavior": params.get("tax_behavior", "unspecified"),
             "metadata": params.get("metadata", {}), "livemode": False, "created": int(time.time())}
    prices[price["id"]] = price
    if key:
        prices_by_key[key] = price
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    """GET /v1/prices, by lookup_keys[], active and product, newest first."""
    query = urllib.parse.parse_qsl(request.query_string)
    keys = {value for name, value in query if name.startswith("lookup_keys")}
    wanted = dict(query)
    found = [p for p in reversed(prices.values())
             if (not keys or p["lookup_key"] in keys)
             and ("active" not in wanted or p["active"] == _boolean(wanted["active"]))
             and ("product" not in wanted or p["product"] == wanted["product"])]
    return web.json_response({"object": "list", "url": "/v1/prices", "has_more": False,
                              "data": found[:int(wanted.get("limit", 10))]})


async def price(request: web.Request) -> web.Response:
    """GET /v1/prices/{id}; POST changes active, metadata or the lookup key (the amount never)."""
    found = prices.get(request.match_info["id"])
    if found is None:
        return stripe_error(404, "invalid_request_error", f"No such price: '{request.match_info['id']}'",
                            "resource_missing")
    if request.method == "POST":
        params = nested(urllib.parse.parse_qsl(await request.text()))
        if "active" in params and not _boolean(params["active"]) and archive_refusals["next"] > 0:
            archive_refusals["next"] -= 1
            return stripe_error(400, "invalid_request_error", "an archiving refused as the test asked")
        if "active" in params:
            found["active"] = _boolean(params["active"])
        found["metadata"].update(params.get("metadata", {}))
    return web.json_response(found)


async def price_control(request: web.Request) -> web.Response:
    if request.method == "POST":
        archive_refusals["next"] = int((await request.json())["refuse_archive_next"])
    return web.json_response(archive_refusals)


@web.middleware
async def read_only_keys(request: web.Request, handler):
    """A restricted key without write permissions: Stripe answers its writes 403. Its reads go
    on with a secret key (localstripe takes only `sk_` keys)."""
    if not request.headers.get("Authorization", "").startswith(f"Bearer {READ_ONLY_KEY}"):
        return await handler(request)
    if request.method == "POST":
        return stripe_error(403, "invalid_request_error",
                            "The provided key does not have the required permissions for this endpoint.")
    headers = request.headers.copy()
    headers["Authorization"] = "Bearer sk_test_restricted_reads"
    return await handler(request.clone(headers=headers))


async def meter_event_summaries(request: web.Request) -> web.Response:
    """GET /v1/billing/meters/{id}/event_summaries, hour by hour: what Stripe counted for the
    customer on that meter (a deduped event counts nothing)."""
    name = request.match_info["id"].removeprefix("mtr_")
    query = request.query
    customer, start, end = query["customer"], int(query["start_time"]), int(query["end_time"])
    hours: dict[int, int] = {}
    for event in meter_events:
        at = int(event["timestamp"])
        if (_counted(event) and event["event_name"] == name and event["payload"]["stripe_customer_id"] == customer
                and start <= at < end):
            hour = at // 3_600 * 3_600
            hours[hour] = hours.get(hour, 0) + int(event["payload"]["value"])
    return web.json_response({"object": "list", "url": request.path, "has_more": False, "data": [
        {"id": f"mtrs_{name}_{hour}", "object": "billing.meter_event_summary", "meter": request.match_info["id"],
         "aggregated_value": float(value), "start_time": hour, "end_time": hour + 3_600, "livemode": False}
        for hour, value in sorted(hours.items())]})


async def create_payment_intent(request: web.Request) -> web.Response:
    if intent_failures["next"] > 0:  # before execution began: Stripe saves nothing for the key
        intent_failures["next"] -= 1
        return web.json_response({"error": {"type": "api_error", "message": "Stripe is having a bad minute"}},
                                 status=500)
    return await idempotent(request, intents_by_key)


async def create_customer(request: web.Request) -> web.Response:
    return await idempotent(request, customers_by_key)


async def idempotent(request: web.Request, by_key: dict[str, dict]) -> web.Response:
    """A create as Stripe answers it under an Idempotency-Key: the first answer again for the
    same parameters (for 24 hours, here for the fake's life), idempotency_error for others."""
    key = request.headers.get("Idempotency-Key")
    params = nested(urllib.parse.parse_qsl(await request.text()))
    if key and key in by_key:
        first = by_key[key]
        if first["params"] != params:
            return web.json_response({"error": {
                "type": "idempotency_error",
                "message": f"Keys for idempotent requests can only be used with the same parameters they were "
                           f"first used with. Try using a key other than '{key}' if you meant to execute a "
                           f"different request."}}, status=400)
        return web.Response(body=first["body"], status=first["status"], content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    response = await proxy(request)
    if key:
        by_key[key] = {"params": params, "status": response.status, "body": response.body}
    return response


async def intent_keys(request: web.Request) -> web.Response:
    return web.json_response({key: json.loads(first["body"]) for key, first in intents_by_key.items()})


async def attach_payment_method(request: web.Request) -> web.Response:
    response = await proxy(request)
    if response.status == 200:
        method = json.loads(response.body)
        attached.append((method["customer"], method["id"]))
    return response


async def list_payment_methods(request: web.Request) -> web.Response:
    """Stripe lists every type when `type` is left out; localstripe wants one."""
    if method_list_failures["next"] > 0:
        method_list_failures["next"] -= 1
        status = method_list_failures.get("status", 500)
        kind = "api_error" if status >= 500 else "invalid_request_error"
        return web.json_response({"error": {"type": kind, "message": f"a failure the test asked for ({status})"}},
                                 status=status)
    customer = request.query.get("customer")
    if "type" in request.query or not customer:
        return await proxy(request)
    try:
        await call_upstream(request, "GET", f"/v1/customers/{customer}")
    except web.HTTPBadRequest as exc:
        return web.Response(text=exc.text, status=404, content_type="application/json")
    methods, seen = [], set()
    for owner, method_id in reversed(attached):
        if owner != customer or method_id in seen:
            continue
        seen.add(method_id)
        method = await call_upstream(request, "GET", f"/v1/payment_methods/{method_id}")
        if method.get("customer") == customer:
            methods.append(method)
    return web.json_response({"object": "list", "data": methods, "has_more": False, "url": "/v1/payment_methods"})


async def method_list_control(request: web.Request) -> web.Response:
    if request.method == "POST":
        asked = await request.json()
        method_list_failures["next"] = int(asked["fail_next"])
        method_list_failures["status"] = int(asked.get("status", 500))
    return web.json_response(method_list_failures)


async def intent_control(request: web.Request) -> web.Response:
    if request.method == "POST":
        intent_failures["next"] = int((await request.json())["fail_next"])
    return web.json_response(intent_failures)


async def config_webhook(request: web.Request) -> web.Response:
    data = await request.json()
    webhooks[request.match_info["name"]] = {"url": data["url"], "secret": data["secret"],
                                            "events": data.get("events")}
    return await proxy(request)


async def refund(request: web.Request) -> web.Response:
    """localstripe refunds but sends no `charge.refunded`: send it, with the charge's refunds."""
    response = await proxy(request)
    if response.status == 200:
        refunded = json.loads(response.body)
        charge = await call_upstream(request, "GET", f"/v1/charges/{refunded['charge']}")
        asyncio.ensure_future(send_event("charge.refunded", charge))
    return response


async def proxy(request: web.Request) -> web.Response:
    upstream = request.app["upstream"]
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
    async with ClientSession() as client:
        async with client.request(request.method, upstream + request.path_qs, data=await request.read(),
                                  headers=headers) as response:
            body = await response.read()
            return web.Response(body=body, status=response.status,
                                content_type=response.content_type or "application/json")


def app(localstripe_port: int) -> web.Application:
    application = web.Application(middlewares=[read_only_keys])
    application["upstream"] = f"http://127.0.0.1:{localstripe_port}"
    application.router.add_post("/v1/checkout/sessions", lambda r: create_session(r, "checkout"))
    application.router.add_post("/v1/billing_portal/sessions", lambda r: create_session(r, "portal"))
    application.router.add_get("/_fake/sessions", list_sessions)
    application.router.add_post("/_fake/sessions/{id}/complete", complete_session)
    application.router.add_post("/_config/webhooks/{name}", config_webhook)
    application.router.add_post("/v1/refunds", refund)
    application.router.add_get("/v1/events", list_events)
    application.router.add_get("/v1/subscriptions", list_subscriptions)
    application.router.add_get("/v1/subscriptions/{id}", get_subscription)
    application.router.add_post("/v1/subscriptions/{id}", update_subscription)
    application.router.add_get("/_fake/subscription_updates", list_subscription_updates)
    application.router.add_post("/v1/billing/meter_events", create_meter_event)
    application.router.add_get("/v1/billing/meters", list_meters)
    application.router.add_get("/v1/billing/meters/{id}/event_summaries", meter_event_summaries)
    application.router.add_post("/v1/payment_intents", create_payment_intent)
    application.router.add_post("/v1/customers", create_customer)
    application.router.add_route("*", "/_fake/payment_intents", intent_control)
    application.router.add_get("/_fake/payment_intents/keys", intent_keys)
    application.router.add_post("/v1/payment_methods/{id}/attach", attach_payment_method)
    application.router.add_get("/v1/payment_methods", list_payment_methods)
    application.router.add_route("*", "/_fake/payment_methods", method_list_control)
    application.router.add_route("*", "/_fake/meter_events", meter_control)
    application.router.add_post("/v1/billing/meters", create_meter)
    application.router.add_post("/v1/billing/credit_grants", create_credit_grant)
    application.router.add_get("/v1/billing/credit_grants", list_credit_grants)
    application.router.add_get("/v1/billing/credit_balance_summary", credit_balance_summary)
    application.router.add_post("/_fake/credit_grants/{id}", use_credit_grant)
    application.router.add_post("/v1/prices", create_price)
    application.router.add_get("/v1/prices", list_prices)
    application.router.add_route("*", "/v1/prices/{id}", price)
    application.router.add_route("*", "/_fake/prices", price_control)
    application.router.add_route("*", "/{tail:.*}", proxy)
    return application


if __name__ == "__main__":
    web.run_app(app(int(sys.argv[2])), host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: None)
