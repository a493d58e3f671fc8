"""GET /billing/{org_id}: the org's billing page (HTML), rendered from its state and ledger."""

from __future__ import annotations

from html import escape

from serve_app.views import format_usd

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Billing · {org}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.5 system-ui,sans-serif;max-width:880px;margin:2rem auto;padding:0 1rem;color:#1b1f24}}
h1{{font-size:1.4rem}} h2{{font-size:1.1rem;margin-top:2rem}}
.cards{{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:.75rem}}
.card{{border:1px solid #d0d7de;border-radius:8px;padding:.75rem 1rem}}
.card b{{display:block;font-size:1.3rem}} .warn{{background:#fff4e5;border-color:#f0b35b}}
table{{border-collapse:collapse;width:100%}} td,th{{padding:.35rem .5rem;border-bottom:1px solid #eaeef2;text-align:left}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}} .muted{{color:#57606a}}
</style></head><body>
<h1>Billing · {org}</h1>
{status}
<div class="cards">
<div class="card">Balance<b>{balance}</b><span class="muted">{mode}</span></div>
<div class="card">Plan<b>{plan}</b><span class="muted">tier {tier}</span></div>
<div class="card">Sandboxes running<b>{active} / {cap}</b><span class="muted">concurrency limit</span></div>
<div class="card">This period ({period})<b>{usage}</b><span class="muted">{quota}, resets {resets}</span></div>
</div>
<h2>Credit</h2>
<table><tr><th>Kind</th><th class="n">Remaining</th><th>Expires</th></tr>{grants}</table>
<h2>Recent activity</h2>
<table><tr><th>When</th><th>Kind</th><th class="n">Amount</th><th>Note</th></tr>{ledger}</table>
<p class="muted">{payments}</p>
</body></html>"""


def render(state: dict, ledger: list[dict], payments_configured: bool) -> str:
    period = state["period"]
    if state["suspended"]:
        status = '<p class="card warn">This account is suspended for an unpaid invoice.</p>'
    elif state["is_halted"]:
        status = '<p class="card warn">New sandboxes are paused: add credit to resume.</p>'
    else:
        status = ""
    grants = "".join(
        f"<tr><td>{escape(g['kind'])}</td><td class='n'>{format_usd(g['remaining_micros'])}</td>"
        f"<td>{escape(g['expires_at'] or 'never')}</td></tr>" for g in state["grants"]
    ) or "<tr><td colspan='3' class='muted'>No credit left.</td></tr>"
    rows = "".join(
        f"<tr><td>{escape(e['created_at'])}</td><td>{escape(e['kind'])}</td>"
        f"<td class='n'>{format_usd(e['amount_micros'])}</td><td>{escape(e.get('note') or '')}</td></tr>"
        for e in ledger
    ) or "<tr><td colspan='4' class='muted'>Nothing yet.</td></tr>"
    quota = (f"{format_usd(period['quota_used_micros'])} of {format_usd(period['quota_micros'])} included"
             if period["quota_micros"] else "no included quota")
    return PAGE.format(
        org=escape(state["org_id"]), status=status, balance=format_usd(state["balance_micros"]),
        mode=escape(state["billing_mode"]), plan=escape(state["plan"]["id"]), tier=escape(state["tier"]),
        active=state["active_leases"], cap=state["max_concurrent"], period=escape(period["key"]),
        usage=format_usd(period["usage_micros"]), quota=quota, resets=escape(period["resets_at"]),
        grants=grants, ledger=rows,
        payments="" if payments_configured else "Card payments are not set up on this server yet.",
    )
