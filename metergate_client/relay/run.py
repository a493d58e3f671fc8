"""Running the relay: its command line (python -m metergate_client.relay; `metergate relay`
hands its options to it) and uvicorn around the app, in the foreground or on a thread."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from metergate_client.client import GateClient, Policy
from metergate_client.decision import ACTIONS
from metergate_client.relay.app import Relay

MAX_AGE_S = 3600  # POST /v1/gate's max_age_ms is at most 3,600,000
TOKEN_ENV = "METERGATE_SERVICE_TOKEN"  # never an option's value: a command line shows in `ps`
DEFAULT_PORT = 8070


def _config(relay: Relay, host: str, port: int, uds: str | None) -> uvicorn.Config:
    # The forwarded answers carry the server's own Date and Server headers: uvicorn adds none.
    return uvicorn.Config(relay, host=host, port=port, uds=uds, lifespan="on", log_level="warning",
                          access_log=False, server_header=False, date_header=False, timeout_graceful_shutdown=5)


def serve(relay: Relay, host: str = "127.0.0.1", port: int = DEFAULT_PORT, uds: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    uvicorn.Server(_config(relay, host, port, uds)).run()


@contextmanager
def running(relay: Relay, host: str = "127.0.0.1", port: int = DEFAULT_PORT, uds: str | None = None) -> Iterator[str]:
    """The relay served on a thread of this process; yields its base URL (http://host:port, or
    the socket's path) once it listens, and stops it on the way out."""
    server = uvicorn.Server(_config(relay, host, port, uds))
    thread = threading.Thread(target=server.run, name="metergate-relay", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the relay did not start listening on {uds or f'{host}:{port}'}")
        time.sleep(0.01)
    try:
        yield uds if uds else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _policy(text: str) -> tuple[str, Policy]:
    action, sep, policy = text.partition("=")
    if not sep or action not in ACTIONS or policy not in {p.value for p in Policy}:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ACTION=POLICY, ACTION one of {', '.join(ACTIONS)}, POLICY one of server, closed, open")
    return action, Policy(policy)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metergate_client.relay", description=(
        f"Answer gate checks locally from metergate's feed. The service token is read from ${TOKEN_ENV}."))
    p.add_argument("--url", default=os.environ.get("METERGATE_URL"), required=not os.environ.get("METERGATE_URL"),
                   help="metergate's URL (default: $METERGATE_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--uds", default=None, help="listen on this Unix socket instead of host and port")
    p.add_argument("--max-staleness-s", type=float, default=1.0)
    p.add_argument("--heartbeat-s", type=float, default=0.25)
    p.add_argument("--policy", type=_policy, action="append", default=[], metavar="ACTION=POLICY")
    p.add_argument("--default-policy", choices=[p.value for p in Policy], default=Policy.SERVER.value)
    p.add_argument("--orgs-prefix", default=None, help="follow only the orgs whose id starts with this")
    p.add_argument("--timeout-s", type=float, default=5.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    token = os.environ.get(TOKEN_ENV)
    if not token:
        print(f"error: no service token: set ${TOKEN_ENV}", file=sys.stderr)
        return 2
    if not 0 < args.heartbeat_s < args.max_staleness_s:
        print("error: --heartbeat-s must be above 0 and under --max-staleness-s", file=sys.stderr)
        return 2
    if args.max_staleness_s > MAX_AGE_S:  # the server refuses a max_age_ms above an hour
        print(f"error: --max-staleness-s must be at most {MAX_AGE_S} (metergate's own bound on max_age_ms)",
              file=sys.stderr)
        return 2
    client = GateClient(args.url, token, max_staleness_s=args.max_staleness_s, heartbeat_s=args.heartbeat_s,
                        policies=dict(args.policy), default_policy=args.default_policy, timeout_s=args.timeout_s,
                        orgs=args.orgs_prefix)
    where = args.uds or f"http://{args.host}:{args.port}"
    print(f"metergate relay: {where} -> {client.url} (bound {args.max_staleness_s} s)", file=sys.stderr, flush=True)
    try:
        serve(Relay(client, token), args.host, args.port, args.uds)
    finally:
        client.close()
    return 0
