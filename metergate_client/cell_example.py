"""A compute cell that creates nothing without a capability token: the example of
docs/integrate/capability-tokens.md, small on purpose.

    python -m metergate_client.cell_example --billing http://127.0.0.1:8000 [--port 8700] [--shadow]

POST /sandboxes with `X-Metergate-Capability: <token>` (the `capability_token` of an allowed
POST /v1/leases) and a JSON body {"org_id", and the resources to run: memory_mb, cpu_count,
disk_mb, machine_type, region, quantity}. The cell checks the token offline (Verifier) and
answers 201, or 401 `capability_required` without a token, or 403 with the refusal's name
(`expired`, `bad_signature`, `exceeds_grant`, ...). The only call to metergate is for the key
set: at start, and again when a token names a key the cell does not hold (a rotation), at
most once every KEYS_REFETCH_S.

`--shadow` (the cutover's first step): refusals are logged and counted, and the create goes
ahead, so an operator sees who still calls the cell without a token before enforcing.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import msgspec

from metergate_client.captoken import CapabilityError, Grant, Refusal, Verifier

KEYS_PATH = "/.well-known/metergate-keys"
KEYS_REFETCH_S = 10.0
TOKEN_HEADER = "X-Metergate-Capability"
MAX_BODY_BYTES = 16_384

log = logging.getLogger("metergate.cell_example")


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    org_id: str
    memory_mb: int = 0
    cpu_count: int = 0
    disk_mb: int = 0
    machine_type: str | None = None
    region: str | None = None
    quantity: int = 1


class Cell:
    """The cell's decision, apart from HTTP: create or refuse, from a token and a body."""

    def __init__(self, billing_url: str, shadow: bool = False, clock=time.time) -> None:
        self.billing_url = billing_url.rstrip("/")
        self.shadow = shadow
        self._clock = clock
        self._lock = threading.Lock()  # the Verifier's cache is not thread-safe
        self._verifier = Verifier(self._key_set(), clock=clock)
        self._fetched_s = time.monotonic()
        self.created: list[dict] = []
        self.shadow_refusals = 0
        self._used: dict[str, int] = {}  # lease id -> slots its creates took (a token is not a ticket)

    def _key_set(self) -> dict:
        answer = httpx.get(self.billing_url + KEYS_PATH, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def create(self, token: str | None, body: CreateBody) -> tuple[int, dict]:
        """(status, answer) of a create."""
        try:
            if not token:
                raise CapabilityError(Refusal.MALFORMED, "no capability token")
            with self._lock:
                capability = self._verified(token, body.org_id)
                capability.requires(Grant(body.memory_mb, body.cpu_count, body.disk_mb, body.machine_type,
                                          body.region, body.quantity))
                self._take(capability, body.quantity)
        except CapabilityError as exc:
            if not self.shadow:
                code = "capability_required" if not token else exc.refusal.value
                return (401 if not token else 403), {"error": {"code": code, "message": str(exc)}}
            self.shadow_refusals += 1
            log.warning("shadow: would refuse a create for %s: %s", body.org_id, exc)
            capability = None
        sandbox = {"org_id": body.org_id, "lease_id": capability.claims.lease_id if capability else None,
                   "memory_mb": body.memory_mb}
        self.created.append(sandbox)
        return 201, {"created": sandbox}

    def _take(self, capability, quantity: int) -> None:
        """A create takes `quantity` of its lease's slots for good: a token is valid until its
        exp and may be sent again, so the cell counts. A token without a lease (a gate check's)
        holds no slot and creates nothing."""
        lease_id = capability.claims.lease_id
        if lease_id is None:
            raise CapabilityError(Refusal.WRONG_ACTION, "a create needs a lease's token, not a gate check's")
        used = self._used.get(lease_id, 0)
        if used + quantity > capability.claims.resources.quantity:
            raise CapabilityError(Refusal.EXCEEDS_GRANT, f"lease {lease_id}: {used} of its "
                                  f"{capability.claims.resources.quantity} slots already created")
        self._used[lease_id] = used + quantity

    def _verified(self, token: str, org_id: str):
        try:
            return self._verifier.verify(token, org_id, "create")
        except CapabilityError as exc:
            if exc.refusal is not Refusal.UNKNOWN_KEY or time.monotonic() - self._fetched_s < KEYS_REFETCH_S:
                raise
        self._verifier.set_keys(self._key_set())  # a key the cell has not seen: a rotation, maybe
        self._fetched_s = time.monotonic()
        return self._verifier.verify(token, org_id, "create")


def serve(cell: Cell, host: str = "127.0.0.1", port: int = 8700) -> ThreadingHTTPServer:
    """An HTTP server for `cell` (not started: call serve_forever, or run it in a thread)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/sandboxes":
                return self._answer(404, {"error": {"code": "not_found", "message": self.path}})
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY_BYTES:
                return self._answer(413, {"error": {"code": "too_large", "message": "body too large"}})
            try:
                body = msgspec.json.decode(self.rfile.read(length), type=CreateBody)
            except msgspec.DecodeError as exc:
                return self._answer(422, {"error": {"code": "invalid_request", "message": str(exc)}})
            self._answer(*cell.create(self.headers.get(TOKEN_HEADER), body))

        def _answer(self, status: int, answer: dict) -> None:
            raw = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description="A compute cell that requires capability tokens")
    parser.add_argument("--billing", required=True, help="metergate's base URL (for its public keys)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--shadow", action="store_true", help="log refusals and create anyway")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = serve(Cell(args.billing, args.shadow), args.host, args.port)
    print(f"cell on http://{args.host}:{server.server_port}/sandboxes ({'shadow' if args.shadow else 'enforcing'})")
    server.serve_forever()


if __name__ == "__main__":
    main()
