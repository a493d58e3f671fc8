"""The CLI's side of the HTTP API: where the service is, which token to send, and every
failure turned into one CliError line (never a traceback).

The URL and token come from the options, else the environment, else what `make up` uses:
the configured host and port, and the admin token it generated and kept in its data dir.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Self

import httpx
import typer

from config.settings import Settings

URL_ENV = "METERGATE_URL"
TOKEN_ENV = "METERGATE_ADMIN_TOKEN"
TIMEOUT_S = 60.0
SLOW_TIMEOUT_S = 600.0  # parity of a whole shard, replay of a long journal

UrlOption = Annotated[str | None, typer.Option(
    "--url", show_default=False, metavar="URL",
    help=f"Where metergate listens. Default: ${URL_ENV}, else where `make up` serves: http://127.0.0.1:8000, "
         "or $METERGATE_HTTP_HOST and $METERGATE_HTTP_PORT.")]
# A file, never the token itself on the command line: a command line shows in `ps` to every user.
TokenOption = Annotated[str | None, typer.Option(
    "--token-file", show_default=False, metavar="FILE",
    help=f"A file that holds the admin token. Default: ${TOKEN_ENV}, else the one `make up` generated and "
         "keeps in $METERGATE_DATA_DIR/tokens.json (.metergate/tokens.json).")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print JSON on stdout and nothing else (money in exact micro-USD), for scripts.")]


class CliError(Exception):
    """What went wrong, as the one line the user sees; exit_code is the process's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_url() -> str:
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    fields = Settings.model_fields
    host = os.environ.get("METERGATE_HTTP_HOST") or fields["http_host"].default
    port = os.environ.get("METERGATE_HTTP_PORT") or fields["http_port"].default
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening everywhere: ask loopback
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def tokens_file() -> Path:
    data_dir = os.environ.get("METERGATE_DATA_DIR") or Settings.model_fields["data_dir"].default
    return Path(data_dir) / "tokens.json"


def stored_token(env: str, role: str) -> str:
    """The `role` token ("admin", "service"): from the variable `env`, else the one `make up`
    generated and keeps in .metergate/tokens.json (`<role>_token`)."""
    if os.environ.get(env):
        return os.environ[env]
    path = tokens_file()
    try:
        token = json.loads(path.read_text()).get(f"{role}_token")
    except FileNotFoundError:
        token = None
    except (OSError, ValueError, AttributeError) as exc:
        raise CliError(f"cannot read the {role} token from {path}: {exc}") from None
    if not token:
        raise CliError(f"no {role} token: pass --token-file, set {env}, or start metergate with `make up` "
                       f"(it keeps a generated one in {path})")
    return token


def default_token() -> str:
    return stored_token(TOKEN_ENV, "admin")


def token_from(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise CliError(f"the token file {path} is empty")
    return token


class Api:
    """Admin calls to one metergate: JSON in, JSON out, a CliError for anything else."""

    def __init__(self, url: str | None, token_file: str | None) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token_from(token_file) if token_file else default_token()
        self.last_status = 0  # of the last answer: 201 created, 200 already there
        try:
            self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT_S,
                                     headers={"Authorization": f"Bearer {self.token}"})
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"bad --url {self.url}: {exc}") from None

    def get(self, path: str, params: dict | None = None, timeout_s: float = TIMEOUT_S) -> dict:
        return self.call("GET", path, params=params, timeout_s=timeout_s)

    def post(self, path: str, body: dict | None = None, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", path, body=body, headers=headers)

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None,
             headers: dict | None = None, timeout_s: float = TIMEOUT_S) -> dict:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(method, path, json=body, params=params, headers=headers, timeout=timeout_s)
        except httpx.UnsupportedProtocol as exc:
            raise CliError(f"bad --url {self.url}: {_reason(exc)}") from None
        except httpx.TimeoutException:
            raise CliError(f"metergate at {self.url} did not answer within {timeout_s:.0f} s") from None
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach metergate at {self.url}: {_reason(exc)}") from None
        return self._answer(method, path, response)

    def _answer(self, method: str, path: str, response: httpx.Response) -> dict:
        self.last_status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.is_success and isinstance(answer, dict):
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        if not (isinstance(error, dict) and error.get("code") and error.get("message")):
            raise CliError(f"unexpected answer to {method} {self.url}{path}: HTTP {response.status_code}, "
                           "not metergate's JSON (is --url right?)")
        message = " ".join(f"{error['code']}: {error['message']}".split())  # one line, whatever the server sent
        if response.status_code == 401:
            message += f" (the admin token was refused: pass --token-file or set {TOKEN_ENV})"
        raise CliError(message)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _reason(exc: httpx.TransportError) -> str:
    """'[Errno 111] Connection refused' → 'connection refused'."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", " ".join(str(exc).split())) or type(exc).__name__
    return text[:1].lower() + text[1:]
