"""A compute cell that creates nothing without a capability token: the example of
docs/integrate/capability-tokens.md, small on purpose.

    python -m metergate_client.cell_example --billing http://127.0.0.1:8000 [--port 8700] [--shadow]

POST /sandboxes with `X-Metergate-Capability: <token>` (the `capability_token` of an allowed
POST /v1/leases) and a JSON body {"org_id", and the resources to run: memory_mb, cpu_count,
disk_mb, machine_type, region, quantity}. The cell checks the token offline (Verifier) and
answers 201, or 401 `capability_required` without a token, or 403 with the refusal's name
(`expired`, `bad_signature`, `exceeds_grant`, ...). The only call to metergate is for the key
set: at start, and again when a token names a key the cell does not hold (a rotation), at
most once every KEYS_REFETCH_S. That fetch holds no lock: creates whose tokens the cell can
check go on meanwhile, and a create that finds a fetch under way waits for it rather than
starting another.

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

from metergate_client.captoken import Capability, CapabilityError, Grant, Refusal, Verifier

KEYS_PATH = "/.well-known/metergate-keys"
KEYS_REFETCH_S = 10.0
KEYS_FETCH_TIMEOUT_S = 10.0
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

    def __init__(self, billing_url: str, shadow: bool = False, clock=time.time,
                 keys_refetch_s: float = KEYS_REFETCH_S) -> None:
        self.billing_url = billing_url.rstrip("/")
        self.shadow = shadow
        self._clock = clock
        self._keys_refetch_s = keys_refetch_s
        # Held for the Verifier (its cache is not thread-safe) and the slots taken: never
        # across a call to metergate, which would stop every create for as long as it takes.
        self._lock = threading.Lock()
        self._verifier = Verifier(self._key_set(), clock=clock)
        self._fetched_s = time.monotonic()
        self._fetching: threading.Event | None = None  # set when the key-set fetch under way ends
        self.key_refetches = 0  # fetches after the first (a token named a key the cell lacked)
        self.created: list[dict] = []
        self.shadow_refusals = 0
        self._used: dict[str, int] = {}  # lease id -> slots its creates took (a token is not a ticket)

    def _key_set(self) -> dict:
        answer = httpx.get(self.billing_url + KEYS_PATH, timeout=KEYS_FETCH_TIMEOUT_S)
        answer.raise_for_status()
        return answer.json()

    def create(self, token: str | None, body: CreateBody) -> tuple[int, dict]:
        """(status, answer) of a create."""
        try:
            if not token:
                raise CapabilityError(Refusal.MALFORMED, "no capability token")
            capability = self._checked_and_taken(token, body)
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

    def _checked_and_taken(self, token: str, body: CreateBody) -> Capability:
        try:
            with self._lock:
                return self._taken(token, body)
        except CapabilityError as exc:
            if exc.refusal is not Refusal.UNKNOWN_KEY:
                raise
        self._refresh_keys()  # a key the cell has not seen: a rotation, maybe
        with self._lock:
            return self._taken(token, body)

    def _taken(self, token: str, body: CreateBody) -> Capability:
        """Under the lock: the token checked for this create, and its slots taken."""
        capability = self._verifier.verify(token, body.org_id, "create")
        capability.requires(Grant(body.memory_mb, body.cpu_count, body.disk_mb, body.machine_type, body.region,
                                  body.quantity))
        self._take(capability, body.quantity)
        return capability

    def _refresh_keys(self) -> None:
        """Fetch the key set again, outside the lock, unless one was fetched in the last
        keys_refetch_s; a fetch already under way is waited for instead (one at a time). A
        failed fetch keeps the keys held (the token is then refused as unknown_key)."""
        with self._lock:
            fetching = self._fetching
            if fetching is None:
                if time.monotonic() - self._fetched_s < self._keys_refetch_s:
                    return
                fetching = self._fetching = threading.Event()
                self.key_refetches += 1
                mine = True
            else:
                mine = False
        if not mine:
            fetching.wait(KEYS_FETCH_TIMEOUT_S)
            return
        key_set = None
        try:
            key_set = self._key_set()
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: not JSON
            log.warning("fetching the key set from %s: %s", self.billing_url, exc)
        finally:  # also after a bug: the next fetch must not wait for this one for ever
            with self._lock:
                if key_set is not None:
                    self._take_keys(key_set)
                self._fetched_s = time.monotonic()
                self._fetching = None
            fetching.set()

    def _take_keys(self, key_set: dict) -> None:
        try:
            self._verifier.set_keys(key_set)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not a set of Ed25519 keys
            log.warning("the key set from %s is refused, the keys held are kept: %s", self.billing_url, exc)

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
