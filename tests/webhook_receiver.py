"""A webhook receiver on loopback for outbound events: verifies each with the svix library.

It can be told to fail the next N deliveries of an org's events (HTTP 500), to show retries.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from svix.webhooks import Webhook, WebhookVerificationError


class Receiver:
    def __init__(self, secret: str) -> None:
        self.verifier = Webhook(secret)
        self.lock = threading.Lock()
        self.received: list[dict] = []  # every delivery that verified, failed on purpose or not
        self.rejected = 0  # deliveries whose signature did not verify
        self.fail_next: dict[str, int] = {}
        self.hold_s: dict[str, float] = {}  # org -> how long its deliveries wait for an answer (a slow receiver)
        self.arrived: dict[str, int] = {}  # org -> deliveries that reached the receiver, answered or not yet
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    receiver.verifier.verify(body, headers)
                except WebhookVerificationError:
                    with receiver.lock:
                        receiver.rejected += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                message = json.loads(body)
                org_id = message["data"].get("org_id")
                with receiver.lock:
                    receiver.arrived[org_id] = receiver.arrived.get(org_id, 0) + 1
                time.sleep(receiver.hold_s.get(org_id, 0))
                with receiver.lock:
                    failing = receiver.fail_next.get(org_id, 0)
                    if failing:
                        receiver.fail_next[org_id] = failing - 1
                    receiver.received.append({**message, "svix_id": headers["svix-id"], "accepted": not failing})
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "Receiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_org(self, org_id: str, accepted_only: bool = False) -> list[dict]:
        with self.lock:
            return [m for m in self.received if m["data"].get("org_id") == org_id
                    and (m["accepted"] or not accepted_only)]
