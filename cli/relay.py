"""`metergate relay`: the relay a gateway runs beside itself (docs/integrate/relay.md).

The relay is the gateway's process, not the operator's: it lives in metergate_client (which
a gateway host installs without the server) and runs as `python -m metergate_client.relay`.
This command finds the URL and the service token as the other commands find theirs and then
becomes that process (exec), so signals and the exit code are the relay's own. The token
goes by the environment, never the command line (which `ps` shows to every user).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cli.client import UrlOption, default_url, stored_token, token_from

SERVICE_TOKEN_ENV = "METERGATE_SERVICE_TOKEN"


def service_token(token_file: str | None) -> str:
    return token_from(token_file) if token_file else stored_token(SERVICE_TOKEN_ENV, "service")


def relay(
        url: UrlOption = None,
        token_file: Annotated[str | None, typer.Option(
            "--token-file", show_default=False, metavar="FILE",
            help=f"A file that holds the service token. Default: ${SERVICE_TOKEN_ENV}, else the one `make up` "
                 "generated.")] = None,
        host: Annotated[str, typer.Option("--host", help="Listen on this address.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Listen on this port.")] = 8070,
        uds: Annotated[str | None, typer.Option("--uds", metavar="PATH", show_default=False,
                                                help="Listen on this Unix socket instead of --host and --port.")] = None,
        max_staleness_s: Annotated[float, typer.Option(
            "--max-staleness-s", min=0.01, help="No answer is `local` from a view older than this.")] = 1.0,
        heartbeat_s: Annotated[float, typer.Option(
            "--heartbeat-s", min=0.01, help="How often the feed proves itself current; well under the bound.")] = 0.25,
        policy: Annotated[list[str] | None, typer.Option(
            "--policy", metavar="ACTION=POLICY", show_default=False,
            help="What an action does without a current view: server, closed or open. Repeatable, e.g. "
                 "--policy ingest=open --policy create=closed.")] = None,
        default_policy: Annotated[str, typer.Option(
            "--default-policy", metavar="POLICY", help="The policy of the actions --policy does not name.")] = "server",
        orgs_prefix: Annotated[str | None, typer.Option(
            "--orgs-prefix", metavar="PREFIX", show_default=False,
            help="Follow only the orgs whose id starts with PREFIX (the others get their action's policy).")] = None,
        timeout_s: Annotated[float, typer.Option("--timeout-s", min=0.1,
                                                 help="Timeout of each request to metergate.")] = 5.0,
) -> None:
    """Answer POST /v1/gate and /v1/gate/batch on loopback from metergate's feed, and forward
    every other request to metergate (docs/integrate/relay.md). Runs until Ctrl-C or SIGTERM."""
    token = service_token(token_file)
    argv = [sys.executable, "-m", "metergate_client.relay", "--url", url or default_url(), "--host", host,
            "--port", str(port), "--max-staleness-s", str(max_staleness_s), "--heartbeat-s", str(heartbeat_s),
            "--default-policy", default_policy, "--timeout-s", str(timeout_s)]
    argv += [*(["--uds", uds] if uds else []), *(["--orgs-prefix", orgs_prefix] if orgs_prefix else [])]
    for each in policy or ():
        argv += ["--policy", each]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, SERVICE_TOKEN_ENV: token})
