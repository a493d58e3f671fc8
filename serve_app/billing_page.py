"""The billing page (GET /billing/{org_id}) as HTML: pure rendering of what the route gathered.

Nothing comes from the internet: inline CSS, an SVG chart drawn here on the server, and a few
lines of inline JavaScript (the modal dialog, one submit per form) that the page does without.
Every form posts to the page's own handlers (serve_app/routes/billing.py), so it all works as
plain HTML. Money shows rounded to the cent (format_usd), with the exact amount in a tooltip
and in the ledger's detail.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date
from html import escape
from urllib.parse import urlencode

from actors.metering import SCALED_PER_MICRO
from actors.timeutil import us_to_rfc3339
from config.catalog import Pack
from serve_app.views import format_usd, usd_input_value
from storage.ledger import Entry
from storage.usage import LeaseCost

MS_PER_HOUR = 3_600_000
# (label, rollup column, units of the column per shown unit, shown unit)
METERS = (("Memory", "memory_mb_ms", 1024 * MS_PER_HOUR, "GiB·h"),
          ("CPU", "cpu_ms", MS_PER_HOUR, "vCPU·h"),
          ("Disk", "disk_mb_ms", 1024 * MS_PER_HOUR, "GiB·h"))

KIND_LABELS = {
    "signup_grant": "Signup credit", "grant": "Promotional credit", "topup": "Top-up",
    "usage": "Usage", "refund": "Refund", "expiration": "Expired credit", "adjustment": "Adjustment",
    "auto_recharge": "Auto-recharge", "refund_reversal": "Refund reversed", "dispute": "Payment disputed",
    "dispute_reversal": "Dispute reversed", "import": "Imported",
}

# What a redirect back to the page may ask it to say (?notice=...); anything else says nothing.
NOTICES = {
    "topup_done": "Thank you. Stripe is confirming the payment; the credit shows here as soon as it lands.",
    "card_done": "Thank you. Stripe is confirming the card; it shows here as soon as it is on file.",
    # After a first subscription's Checkout, and after a change of the subscription in place
    # (no Checkout: the form comes straight back here): either way the tier moves when Stripe
    # reports the subscription.
    "tier_done": "Thank you. Stripe is confirming your subscription; the new tier shows here as soon as Stripe "
                 "reports it.",
    "checkout_cancelled": "Checkout was cancelled: nothing was charged.",
    "auto_recharge_saved": "Auto-recharge settings saved.",
}


@dataclass(frozen=True)
class BillingPage:
    org: dict  # the org's view (serve_app/views.py org_view), as GET /v1/orgs/{id} shows it
    needs_card: bool  # the gate answers no_payment_method to a create: free credit used, no card
    path: str  # the page's own path; the forms post under it
    csrf: str  # the proof every form carries (routes/billing.py)
    nonce: str  # of the inline script, for the Content-Security-Policy
    stripe_ready: bool
    days: list[tuple[str, int]]  # (YYYY-MM-DD, cost_micros) for every day of the window, oldest first
    leases: list[LeaseCost]  # the costliest of the window
    lease_count: int  # leases in the window
    meter_quantities: dict[str, int]  # rollup column → quantity in the window
    meter_cost_micros: dict[str, int]  # rollup column → cost at the plan's current rates
    months: list[dict]  # GET /v1/orgs/{id}/months rows, oldest first
    entries: list[Entry]  # this page of the ledger, newest first
    cursor: str | None  # of this ledger page (None: the newest)
    next_cursor: str | None  # of the next, older one
    packs: list[Pack]
    tiers: list[tuple[str, int]]  # the paid tiers on sale, with their concurrency caps
    notice: str | None
    before_tax: bool = False  # METERGATE_STRIPE_AUTOMATIC_TAX: Stripe adds tax at Checkout
    shadow: bool = False  # the org is in shadow (billing-rules 2.12): a preview, nothing is charged or paused


def money(micros: int) -> str:
    """Rounded to the cent, the exact amount in the tooltip."""
    return f'<span title="{format_usd(micros, exact=True)}">{format_usd(micros)}</span>'


def decimal2(quantity: int, per_unit: int) -> str:
    """quantity / per_unit with two decimals, rounded half up, in integers."""
    hundredths = (quantity * 100 + per_unit // 2) // per_unit
    return f"{hundredths // 100:,}.{hundredths % 100:02d}"


def when(rfc3339: str | None) -> str:
    return "never" if rfc3339 is None else f"{rfc3339[:10]} {rfc3339[11:16]} UTC"


def day_label(day: str) -> str:
    moment = date.fromisoformat(day)
    return f"{moment:%b} {moment.day}"


def render(page: BillingPage) -> str:
    org = page.org
    body = "\n".join((
        f"<header><h1>Billing <span class=\"muted\">· {escape(org['org_id'])}</span></h1>"
        f"<p class=\"muted\">{escape(org['email'])} · plan {escape(org['plan']['id'])} · "
        f"{escape(org['billing_mode'])}</p></header>",
        banners(page),
        cards(page),
        section("Credit", "credit", grants_table(org)),
        section("Daily spend, last 30 days", "spend", spend_chart(page.days)),
        section("By sandbox, last 30 days", "sandboxes", leases_table(page)),
        section("By meter, last 30 days", "meters", meters_table(page)),
        section("Monthly spend", "months", months_table(page.months)),
        section("Add credit", "topup", topup_forms(page)),
        section("Payment method", "card", card_forms(page)),
        section("Concurrency tier", "tier", tier_form(page)),
        section("Auto-recharge", "auto-recharge", auto_recharge_form(page)),
        section("Ledger", "ledger", ledger_table(page)),
        credits_used_dialog(page) if page.needs_card else "",
    ))
    return PAGE.format(org=escape(org["org_id"]), body=body, script=f'<script nonce="{page.nonce}">{SCRIPT}</script>')


def section(title: str, anchor: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{content}\n</section>'


PREVIEW = ("<b>Preview</b>: billing of this account is not live yet. The balance and usage here are what "
           "would be billed; nothing is charged, no card is taken and no sandbox is paused until billing goes live.")


PREVIEW_ID = ' id="preview"'


def banners(page: BillingPage) -> str:
    org, out = page.org, []
    if page.shadow:
        out.append(("preview", PREVIEW))
    if org["suspended"]:
        out.append(("alert", f"This account is suspended: an invoice is unpaid (past due since "
                             f"{escape(when(org['past_due_since']))}). Pay it in the billing portal to resume."))
    elif org["past_due_since"]:
        out.append(("warn", f"A payment failed on {escape(when(org['past_due_since']))}. Update your card in the "
                            "billing portal; the account is suspended if the invoice stays unpaid."))
    if org["is_halted"] and org["halt_reason"] == "admin":
        out.append(("alert", "This account is paused by an operator: no sandbox can start. Contact support."))
    elif org["is_halted"] and page.shadow:
        out.append(("warn", "The credit is used up: once billing is live, new sandboxes would be paused."))
    elif org["is_halted"]:
        out.append(("alert", "New sandboxes are paused: the credit is used up. Add credit to resume."))
    if org["degraded"]:
        out.append(("warn", "Purchases are disabled while an invoice is past due; sandboxes keep running on "
                            "your quota and credit."))
    paused = org["auto_recharge"].get("paused") if org["auto_recharge"]["enabled"] else None
    if paused:
        out.append(("warn", f"Auto-recharge is paused ({escape(str(paused))}): save a new card or the settings "
                            "again to resume it."))
    if page.notice in NOTICES:
        out.append(("ok", escape(NOTICES[page.notice])))
    return "\n".join(f'<p class="banner {kind}" role="{"alert" if kind == "alert" else "status"}"'
                     f'{PREVIEW_ID if kind == "preview" else ""}>{text}</p>' for kind, text in out)


def cards(page: BillingPage) -> str:
    org = page.org
    period = org["period"]
    balance = (f'<div class="card" id="balance">Balance<b data-micros="{org["balance_micros"]}">'
               f'{money(org["balance_micros"])}</b><span class="muted">{escape(org["billing_mode"])}'
               + (f' · owed {money(org["debt_micros"])}' if org["debt_micros"] else "") + "</span></div>")
    if period["quota_micros"]:
        used, quota = period["quota_used_micros"], period["quota_micros"]
        percent = min(100, used * 100 // quota)
        usage = (f'<b>{money(used)} <small>of {money(quota)}</small></b>'
                 f'<span class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
                 f'aria-valuenow="{percent}"><span style="width:{percent}%"></span></span>'
                 f'<span class="muted">{percent}% of the included quota · total usage {money(period["usage_micros"])}'
                 f' · resets {escape(when(period["resets_at"]))}</span>')
    else:
        usage = (f'<b>{money(period["usage_micros"])}</b><span class="muted">no included quota · period ends '
                 f'{escape(when(period["resets_at"]))}</span>')
    return "\n".join((
        '<div class="cards">',
        balance,
        runway_card(org),
        f'<div class="card" id="period">This period ({escape(period["key"])}){usage}</div>',
        f'<div class="card">Sandboxes running<b>{org["active_leases"]} / {org["max_concurrent"]}</b>'
        f'<span class="muted">tier {escape(org["tier"])}</span></div>',
        "</div>"))


def duration(seconds: int) -> str:
    """A runway as people say it: 40 minutes, 3 hours 5 minutes, 2 days 4 hours."""
    days, hours, minutes = seconds // 86_400, seconds % 86_400 // 3_600, seconds % 3_600 // 60
    parts = [(days, "day"), (hours, "hour"), (minutes, "minute")]
    said = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n][:2]
    return " ".join(said) or "under a minute"


def runway_card(org: dict) -> str:
    """How long the credit lasts at the burn of what runs now (billing-rules 2.10); nothing
    when nothing runs or the org is billed afterwards."""
    runway = org.get("runway") or {}
    if runway.get("runway_s") is None:
        return ""
    low = runway["runway_s"] < (org.get("alerts") or {}).get("runway_alert_s", 0)
    return (f'<div class="card{" warn" if low else ""}" id="runway">Runway<b data-seconds="{runway["runway_s"]}">'
            f'{escape(duration(runway["runway_s"]))}</b><span class="muted">at {money(runway["burn_micros_per_hour"])}'
            f' an hour for what runs now'
            + (f' · runs out {escape(when(runway["runs_out_at"]))}' if runway["runs_out_at"] else "")
            + '</span></div>')


def grants_table(org: dict) -> str:
    rows = "".join(
        f"<tr><td>{escape(KIND_LABELS.get(g['kind'], g['kind']))}</td><td class=\"n\">{money(g['remaining_micros'])}"
        f"</td><td>{escape(when(g['expires_at']))}</td></tr>" for g in org["grants"])
    if not rows:
        rows = '<tr><td colspan="3" class="muted">No credit left.</td></tr>'
    return (f'<table><thead><tr><th>Credit</th><th class="n">Remaining</th><th>Expires</th></tr></thead>'
            f'<tbody>{rows}</tbody></table><p class="muted">Spent in this order: the period\'s included quota, '
            f'credit that expires (soonest first), promotional credit, then purchased credit.</p>')


CHART_W, CHART_H = 720, 190
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 64, 712, 14, 160


def spend_chart(days: list[tuple[str, int]]) -> str:
    """Bars of the daily cost, drawn here: each day's exact cost is in its tooltip."""
    top = max((cost for _, cost in days), default=0)
    total = sum(cost for _, cost in days)
    if top <= 0:
        return '<p class="muted" id="spend-empty">No usage in these 30 days.</p>'
    step = (PLOT_RIGHT - PLOT_LEFT) // len(days)
    bars, labels = [], []
    for i, (day, cost) in enumerate(days):
        height = max(1, cost * (PLOT_BOTTOM - PLOT_TOP) // top) if cost > 0 else 0
        x = PLOT_LEFT + i * step
        bars.append(f'<g><title>{day}: {format_usd(cost)} ({format_usd(cost, exact=True)})</title>'
                    f'<rect class="hit" x="{x}" y="{PLOT_TOP}" width="{step}" height="{PLOT_BOTTOM - PLOT_TOP}"/>'
                    f'<rect class="day" x="{x + 2}" y="{PLOT_BOTTOM - height}" width="{step - 4}" height="{height}"/>'
                    "</g>")
        if (len(days) - 1 - i) % 7 == 0:  # weekly, counted back from today
            labels.append(f'<text x="{x + step // 2}" y="{PLOT_BOTTOM + 18}" text-anchor="middle">'
                          f"{day_label(day)}</text>")
    return (f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-labelledby="spend-title">'
            f'<title id="spend-title">Daily spend, {days[0][0]} to {days[-1][0]}: {format_usd(total)} in all</title>'
            f'<line class="grid" x1="{PLOT_LEFT}" y1="{PLOT_TOP}" x2="{PLOT_RIGHT}" y2="{PLOT_TOP}"/>'
            f'<line class="axis" x1="{PLOT_LEFT}" y1="{PLOT_BOTTOM}" x2="{PLOT_RIGHT}" y2="{PLOT_BOTTOM}"/>'
            f'<text x="{PLOT_LEFT - 6}" y="{PLOT_TOP + 4}" text-anchor="end">{format_usd(top)}</text>'
            f'<text x="{PLOT_LEFT - 6}" y="{PLOT_BOTTOM + 4}" text-anchor="end">$0</text>'
            + "".join(bars) + "".join(labels) + "</svg>"
            f'<p class="muted">{format_usd(total)} in these 30 days (UTC days). Point at a bar for its day.</p>')


def leases_table(page: BillingPage) -> str:
    if not page.leases:
        return '<p class="muted">No sandbox ran in these 30 days.</p>'
    rows = "".join(
        f"<tr><td><code>{escape(lease.lease_id)}</code></td><td class=\"n\">{decimal2(lease.duration_ms, MS_PER_HOUR)}"
        f" h</td><td class=\"n\">{lease.ticks:,}</td><td class=\"n\">{money(lease.cost_scaled // SCALED_PER_MICRO)}</td></tr>"
        for lease in page.leases)
    more = (f'<p class="muted">The {len(page.leases)} costliest of {page.lease_count:,} sandboxes.</p>'
            if page.lease_count > len(page.leases) else "")
    return ('<table><thead><tr><th>Sandbox (lease)</th><th class="n">Time</th><th class="n">Ticks</th>'
            f'<th class="n">Cost</th></tr></thead><tbody>{rows}</tbody></table>{more}')


def meters_table(page: BillingPage) -> str:
    rows = "".join(
        f"<tr><td>{label}</td><td class=\"n\">{decimal2(page.meter_quantities.get(column, 0), per_unit)} {unit}</td>"
        f"<td class=\"n\">{money(page.meter_cost_micros.get(column, 0))}</td></tr>"
        for label, column, per_unit, unit in METERS)
    return ('<table><thead><tr><th>Meter</th><th class="n">Quantity</th><th class="n">Cost at current rates</th>'
            f'</tr></thead><tbody>{rows}</tbody></table><p class="muted">Quantities from the usage records; each '
            'meter priced at your plan\'s current rates. What was charged is in the chart and the ledger.</p>')


def months_table(months: list[dict]) -> str:
    if not months:
        return '<p class="muted">Nothing yet.</p>'
    imported = any(m.get("imported_applied_micros") for m in months)  # its column only for an imported org
    rows = "".join(
        f"<tr><td>{escape(m['month'])}</td><td class=\"n\">{money(m['spend_micros'])}</td>"
        f"<td class=\"n\">{money(m['credits_applied_micros'])}</td>"
        + (f"<td class=\"n\">{money(m.get('imported_applied_micros', 0))}</td>" if imported else "")
        + f"<td class=\"n\">{money(m['billable_micros'])}</td>"
        f"<td class=\"n\">{decimal2(m['usage_ms'], MS_PER_HOUR)} h</td><td>{escape(m['status'])}</td></tr>"
        for m in reversed(months))
    return ('<table><thead><tr><th>Month</th><th class="n">Spend</th><th class="n">Free credit applied</th>'
            + ('<th class="n">Imported credit applied</th>' if imported else "")
            + '<th class="n">Billable</th><th class="n">Sandbox time</th><th>Status</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


PRIMARY = ' class="primary"'


def form(page: BillingPage, action: str, fields: str, button: str, primary: bool = False,
         disabled: bool = False) -> str:
    """A form to one of the page's handlers: the proof of origin, and a fresh Idempotency-Key
    (a double submit of this form is the same request, answered once)."""
    return (f'<form method="post" action="{escape(page.path)}/{action}">'
            f'<input type="hidden" name="csrf" value="{escape(page.csrf)}">'
            f'<input type="hidden" name="idempotency_key" value="form_{secrets.token_urlsafe(18)}">'
            f'{fields}<button type="submit"{PRIMARY if primary else ""}{" disabled" if disabled else ""}>'
            f"{button}</button></form>")


def stripe_note(page: BillingPage) -> str:
    if page.shadow:
        return '<p class="muted preview-note">Preview: billing is not live yet, so nothing is paid or saved here.</p>'
    return "" if page.stripe_ready else '<p class="muted">Card payments are not set up on this server yet.</p>'


def tax_note(page: BillingPage) -> str:
    if not page.before_tax:
        return ""
    return ('<p class="muted" data-tax="before">Prices are before tax: Stripe adds any tax due at checkout, '
            'from the billing address you give there.</p>')


def payments_off(page: BillingPage) -> bool:
    """No Checkout nor billing portal from this page: Stripe is not set up, or the org is in
    shadow (the routes refuse it too: 409 org_in_shadow)."""
    return not page.stripe_ready or page.shadow


def topup_forms(page: BillingPage) -> str:
    off = payments_off(page)
    amount = form(page, "topup", '<label>Amount (USD) <input type="number" name="amount_usd" min="0.50" '
                  'max="10000" step="0.01" value="25.00" required></label>', "Top up", primary=True, disabled=off)
    packs = "".join(
        form(page, "topup", f'<input type="hidden" name="pack_id" value="{escape(pack.id)}">',
             f"Buy {format_usd(pack.amount_micros)}"
             + (f" <small>(expires {pack.expires_after_days} days after purchase)</small>"
                if pack.expires_after_days else ""), disabled=off)
        for pack in page.packs)
    return (f'<div class="row">{amount}</div>'
            + (f'<p>Or a credit pack:</p><div class="row">{packs}</div>' if packs else "")
            + '<p class="muted">You pay on Stripe Checkout; the credit is added once Stripe confirms it.</p>'
            + tax_note(page) + stripe_note(page))


def card_forms(page: BillingPage) -> str:
    off = payments_off(page)
    status = ("A card is on file." if page.org["has_payment_method"] else "No card on file.")
    save = form(page, "setup", "", "Change card" if page.org["has_payment_method"] else "Add a card",
                primary=not page.org["has_payment_method"], disabled=off)
    portal = form(page, "portal", "", "Billing portal (cards, invoices, subscription)", disabled=payments_off(page))
    return f'<p id="card-status">{status}</p><div class="row">{save}{portal}</div>{stripe_note(page)}'


def tier_form(page: BillingPage) -> str:
    """The paid tiers. An org on one already has its subscription changed in place by the
    form (routes/self_serve.py): one subscription, never a second to cancel."""
    org = page.org
    options = "".join(
        f'<label class="choice"><input type="radio" name="tier" value="{escape(tier)}" required'
        f'{" disabled" if tier == org["tier"] else ""}> {escape(tier)}: up to {cap:,} sandboxes at once'
        f'{" (current)" if tier == org["tier"] else ""}</label>'
        for tier, cap in page.tiers)
    subscribed = any(tier == org["tier"] for tier, _ in page.tiers)
    now = f'<p>Now on <b>{escape(org["tier"])}</b>: up to {org["max_concurrent"]:,} sandboxes at once. '
    if subscribed:
        current = now + ("Another tier changes this same monthly subscription at once, with no second "
                         "subscription and no checkout; your invoices show how the change is billed. To go back "
                         "to base, cancel the subscription in the billing portal.</p>")
    else:
        current = now + ("A paid tier is a monthly subscription; cancel it in the billing portal to go back to "
                         "base.</p>")
    if not options:
        return current
    return current + form(page, "tier", f'<fieldset>{options}</fieldset>',
                          "Change tier" if subscribed else "Continue to checkout",
                          disabled=payments_off(page)) + tax_note(page) + stripe_note(page)


def auto_recharge_form(page: BillingPage) -> str:
    settings = page.org["auto_recharge"]
    enabled = settings["enabled"]
    threshold = usd_input_value(settings["threshold_micros"]) if enabled else "5.00"
    amount = usd_input_value(settings["amount_micros"]) if enabled else "25.00"
    per_day = settings["max_per_day"] if enabled else 3
    state = ("On: when the balance goes under " + money(settings["threshold_micros"]) + ", the card on file is "
             "charged " + money(settings["amount_micros"]) + f" (at most {per_day} times a day; "
             f"{settings['charges_today']} today)." if enabled else "Off.")
    if enabled and settings.get("pending"):
        state += f" A charge of {money(settings['pending']['amount_micros'])} is in progress."
    if not page.org["has_payment_method"]:
        state += " It charges the card on file: add a card first."
    fields = (f'<label class="choice"><input type="checkbox" name="enabled"{" checked" if enabled else ""}> '
              "Recharge automatically</label>"
              f'<label>When the balance is under (USD) <input type="number" name="threshold_usd" min="0.000001" '
              f'step="any" value="{threshold}"></label>'
              f'<label>add (USD) <input type="number" name="amount_usd" min="0.50" max="10000" step="0.01" '
              f'value="{amount}"></label>'
              f'<label>at most, per day <input type="number" name="max_per_day" min="1" max="100" step="1" '
              f'value="{per_day}"></label>')
    return f'<p id="auto-recharge-status">{state}</p>' + form(page, "auto-recharge", fields, "Save")


def ledger_table(page: BillingPage) -> str:
    rows = []
    for e in page.entries:
        at = when(us_to_rfc3339(e.created_us))
        detail = (f"entry <code>{escape(e.entry_id)}</code> · exact amount {format_usd(e.amount_micros, exact=True)}"
                  f" ({e.amount_micros:,} micro-USD)"
                  + (f" · credit <code>{escape(e.grant_id)}</code>" if e.grant_id else "")
                  + (f" · expires {escape(when(us_to_rfc3339(e.expires_us)))}" if e.expires_us is not None else ""))
        rows.append(f"<tr><td>{escape(at)}</td><td>{escape(KIND_LABELS.get(e.kind, e.kind))}</td>"
                    f"<td class=\"n\">{money(e.amount_micros)}</td><td>{escape(e.note or '')}</td>"
                    f"<td><details><summary>Detail</summary>{detail}</details></td></tr>")
    body = "".join(rows) or '<tr><td colspan="5" class="muted">Nothing yet.</td></tr>'
    links = []
    if page.cursor:
        links.append(f'<a href="{escape(page.path)}#ledger">Newest</a>')
    if page.next_cursor:
        links.append(f'<a rel="next" href="{escape(page.path)}?{escape(urlencode({"cursor": page.next_cursor}))}'
                     '#ledger">Older entries</a>')
    return ('<table><thead><tr><th>When</th><th>Kind</th><th class="n">Amount</th><th>Note</th><th></th></tr>'
            f'</thead><tbody>{body}</tbody></table><p class="pager">{" · ".join(links)}</p>'
            '<p class="muted">Usage is one entry per minute, updated while the minute runs.</p>')


def credits_used_dialog(page: BillingPage) -> str:
    """Blocking: an overlay without JavaScript, a modal dialog with it. One action."""
    note = "" if page.stripe_ready else '<p class="muted">Card payments are not set up on this server yet.</p>'
    return ('<div class="overlay"><dialog id="credits-used" open aria-modal="true" aria-labelledby="credits-used-title">'
            '<h2 id="credits-used-title">Free credits used</h2>'
            "<p>Your free credits are used up. Add a payment method to keep starting sandboxes; you are charged "
            "only for what you use.</p>" + note
            + form(page, "setup", "", "Add payment method", primary=True, disabled=not page.stripe_ready)
            + "</dialog></div>")


def error_page(org_id: str, path: str | None, status: int, code: str, message: str) -> str:
    """What a browser gets when the page or a form is refused: the reason, and the way back."""
    back = f'<p><a href="{escape(path)}">Back to billing</a></p>' if path else ""
    body = (f"<header><h1>Billing <span class=\"muted\">· {escape(org_id)}</span></h1></header>"
            f'<p class="banner alert" role="alert">{escape(message)}</p>'
            f'<p class="muted">{status} · {escape(code)}</p>{back}')
    return PAGE.format(org=escape(org_id), body=body, script="")


SCRIPT = """(function () {
  var dialog = document.getElementById("credits-used");
  if (dialog && dialog.showModal) {
    dialog.close();
    dialog.showModal();
    dialog.parentNode.classList.add("modal");
    dialog.addEventListener("cancel", function (event) { event.preventDefault(); });
    // Browsers may close a modal on Escape all the same: it stays until a card is on file.
    dialog.addEventListener("close", function () { dialog.showModal(); });
  }
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.dataset.sent) { event.preventDefault(); } else { form.dataset.sent = "1"; }
    });
  });
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form").forEach(function (form) { delete form.dataset.sent; });
  });
})();"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Billing · {org}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{{font:15px/1.5 system-ui,sans-serif;max-width:920px;margin:2rem auto;padding:0 1rem;color:#1b1f24}}
h1{{font-size:1.4rem;margin-bottom:0}} h2{{font-size:1.1rem;margin-top:2rem}} header p{{margin-top:.2rem}}
.cards{{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:.75rem;margin-top:1rem}}
.card{{border:1px solid #d0d7de;border-radius:8px;padding:.75rem 1rem}}
.card b{{display:block;font-size:1.35rem}} .card small{{font-size:.9rem;font-weight:normal;color:#57606a}} .card.warn{{background:#fff4e5;border-color:#f0b35b}}
.bar{{display:block;height:8px;background:#eaeef2;border-radius:4px;margin:.3rem 0;overflow:hidden}}
.bar span{{display:block;height:100%;background:#3b6fd4}}
.banner{{border-radius:8px;padding:.6rem 1rem;border:1px solid}}
.banner.alert{{background:#ffebe9;border-color:#ff8182}} .banner.warn{{background:#fff4e5;border-color:#f0b35b}}
.banner.ok{{background:#dafbe1;border-color:#4ac26b}} .banner.preview{{background:#ddf4ff;border-color:#54aeff}}
table{{border-collapse:collapse;width:100%}} td,th{{padding:.35rem .5rem;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}}
.n{{text-align:right;font-variant-numeric:tabular-nums}} .muted{{color:#57606a}}
details summary{{cursor:pointer;color:#0969da}} details{{font-size:.9rem}}
form{{display:inline-flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin:0 .5rem .5rem 0}}
.row{{display:flex;flex-wrap:wrap;align-items:end}} fieldset{{border:0;padding:0;margin:0;display:grid;gap:.25rem}}
label{{display:flex;flex-direction:column;font-size:.9rem}} label.choice{{flex-direction:row;gap:.4rem;align-items:center}}
input{{font:inherit;padding:.3rem .4rem;border:1px solid #d0d7de;border-radius:6px}}
button{{font:inherit;padding:.35rem .9rem;border:1px solid #d0d7de;border-radius:6px;background:#f6f8fa;cursor:pointer}}
button.primary{{background:#1f883d;border-color:#1a7f37;color:#fff}} button:disabled{{opacity:.5;cursor:not-allowed}}
.chart{{width:100%;height:auto}} .chart text{{font-size:11px;fill:#57606a}}
.chart .day{{fill:#3b6fd4}} .chart .hit{{fill:transparent}} .chart g:hover .day{{fill:#1f4fb0}}
.chart .axis{{stroke:#8c959f}} .chart .grid{{stroke:#eaeef2;stroke-dasharray:4 4}}
.overlay{{position:fixed;inset:0;background:rgba(27,31,36,.55);display:flex;align-items:center;justify-content:center;z-index:10}}
dialog{{max-width:26rem;border:0;border-radius:10px;padding:1.25rem 1.5rem;box-shadow:0 8px 24px rgba(0,0,0,.3)}}
.overlay dialog:not(:modal){{position:static}} .overlay.modal{{background:none}}
dialog::backdrop{{background:rgba(27,31,36,.55)}} dialog h2{{margin-top:0}}
</style></head><body>
{body}
{script}
</body></html>"""
