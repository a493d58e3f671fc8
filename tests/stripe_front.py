"""A small Stripe-protocol fake for what localstripe lacks: Checkout and portal sessions.

Everything else is proxied to localstripe, so one `api_base` serves both. Idempotency-Key
is honoured for the sessions made here (localstripe ignores it). GET /_fake/sessions lists
them for tests. Run: python this.py PORT LOCALSTRIPE_PORT
"""

import itertools
import sys
import urllib.parse

from aiohttp import ClientSession, web

sessions: dict[str, dict] = {}
by_key: dict[str, dict] = {}
counter = itertools.count(1)


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
    application = web.Application()
    application["upstream"] = f"http://127.0.0.1:{localstripe_port}"
    application.router.add_post("/v1/checkout/sessions", lambda r: create_session(r, "checkout"))
    application.router.add_post("/v1/billing_portal/sessions", lambda r: create_session(r, "portal"))
    application.router.add_get("/_fake/sessions", list_sessions)
    application.router.add_route("*", "/{tail:.*}", proxy)
    return application


if __name__ == "__main__":
    web.run_app(app(int(sys.argv[2])), host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: None)
