"""Service settings from METERGATE_* environment variables, validated at start."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.toml"


class SettingsError(Exception):
    """Settings that cannot start the service; the message names every bad variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERGATE_", extra="ignore")

    # Unset: an embedded Postgres (pgserver) in data_dir/pg.
    database_url: str | None = None
    data_dir: Path = PROJECT_DIR / ".metergate"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # The service's origin as its callers reach it (behind a TLS load balancer: its https URL).
    # Every absolute URL metergate makes (Stripe return URLs), and the billing cookie's Secure
    # flag, come from it, never from a request's Host. Unset: http://HTTP_HOST:HTTP_PORT.
    public_url: str | None = None
    # Origins (scheme://host[:port], comma-separated) a Checkout or portal return URL may lead
    # to, besides the public URL's own; https only, unless an http origin is named here.
    allowed_return_origins: str = ""
    # Unset: generated at start and printed (make up), so a fresh machine needs no setup.
    service_token: str | None = Field(None, min_length=16)
    admin_token: str | None = Field(None, min_length=16)
    # Signs org tokens. Unset: generated once and kept with the generated tokens.
    org_token_secret: str | None = Field(None, min_length=32)
    # A rotation under way (docs/operations/security.md): the values being replaced, still
    # accepted with the same rights (an org token signed with the previous secret still
    # verifies; new ones are signed with the current secret) until these are unset.
    service_token_previous: str | None = Field(None, min_length=16)
    admin_token_previous: str | None = Field(None, min_length=16)
    org_token_secret_previous: str | None = Field(None, min_length=32)
    # Signs capability tokens (Ed25519; serve_app/captokens.py): a 32-byte seed, base64url.
    # Unset: generated once and kept with the generated tokens. During a rotation the previous
    # key's public half stays published, so the tokens it signed verify until they expire.
    capability_key: str | None = Field(None, min_length=43, max_length=43)
    capability_key_previous: str | None = Field(None, min_length=43, max_length=43)
    shards: int = Field(2, ge=1, le=256)
    catalog: Path = DEFAULT_CATALOG
    ingress_replicas: int = Field(1, ge=1, le=64)
    # GET /v1/gate/feed on replicas of their own (serve_app/deployment.py FeedIngress): a feed
    # line then never waits behind the usage bodies an ingress decodes. 0: the ingress serves it.
    feed_replicas: int = Field(1, ge=0, le=64)
    # HTTP through Ray Serve's HAProxy (direct to the ingress replicas), not its Python proxy:
    # a no-op Serve endpoint went from ~160 to ~2,700 req/s on the 2-core host (bench/gate.py
    # measures the HAProxy floor). Applies to a Ray that this process starts; a cluster started
    # by `ray start` sets the same environment itself (cluster.yaml).
    serve_haproxy: bool = True
    # Shards publish each org's gate view after every commit that changes it; the ingress and
    # GateClients decide from them. Off: no feed, and every gate check asks the org's shard.
    gate_views: bool = True
    # A shard's view log keeps the latest record of every org in memory and of at most this
    # many others (passivated); older records of those are dropped, and a reader whose cursor
    # is behind them is told to load that shard again.
    view_log_max_records: int = Field(200_000, ge=1, le=100_000_000)
    # The Ray dashboard, on 127.0.0.1 only (it can run code on the cluster: never on a public
    # interface), and the port of Ray's Prometheus endpoint (0: a free one, printed at start).
    # Both apply to a Ray this process starts; a cluster started by `ray start` has its own.
    dashboard: bool = True
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_port: int = Field(8266, ge=0, le=65535)

    # Group commit: a batch is cut when the previous commit returns; these bound its size.
    commit_max_commands: int = Field(20_000, ge=1, le=1_000_000)
    snapshot_every_entries: int = Field(64, ge=1, le=100_000)
    passivate_after_s: int = Field(900, ge=1)
    parity_sample_orgs: int = Field(2_000, ge=0)  # the parity job's orgs per shard and run (0: all loaded)
    tick_id_retention_s: int = Field(26 * 3600, ge=24 * 3600)

    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_usage_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_ticks_per_request: int = Field(10_000, ge=1, le=100_000)
    # Gate feed streams one token may hold open at once on one ingress replica.
    max_feed_streams_per_token: int = Field(64, ge=1, le=100_000)
    # Requests one org token may make on one ingress replica: a burst, refilled per minute.
    org_token_burst: int = Field(20, ge=1, le=1_000_000)
    org_token_requests_per_minute: int = Field(120, ge=1, le=6_000_000)

    # Auto-recharge: after a charge, no other for this long, whatever the balance does.
    auto_recharge_cooldown_s: int = Field(60, ge=0, le=86_400)

    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    # A tier change of an org already subscribed updates its subscription in place; how Stripe
    # bills the rest of the period is Stripe's proration_behavior: credit and charge the
    # difference on the next invoice, invoice it at once, or leave the period as paid.
    stripe_proration_behavior: Literal["create_prorations", "always_invoice", "none"] = "create_prorations"
    # Stripe Tax on every Checkout that charges (payment and subscription): the customer's
    # address is collected and saved on its Stripe customer; prices are then before tax.
    stripe_automatic_tax: bool = False
    # At start, before serving: publish the catalog to Stripe as `metergate stripe
    # ensure-products` does; Stripe refusing stops the start.
    stripe_ensure_products: bool = False
    svix_webhook_secret: str | None = None
    webhook_secret: str | None = None
    webhook_urls: str = ""
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    webhook_backoff_s: int = Field(5, ge=1, le=3_600)  # then doubled per attempt, at most an hour
    test_clock: bool = False
    # Stripe meter events for postpaid orgs: computed and stored but not sent while shadow is
    # on; hours before bill_from are marked consumed and never billed.
    stripe_meter_shadow: bool = True
    stripe_meter_bill_from: datetime | None = None
    stripe_meter_prefix: str = "metergate"
    # Enforcement of orgs created by POST /v1/orgs and of new orgs an import creates (an import
    # line's own `enforcement` wins): `shadow` bills them beside another biller (billing-rules
    # 2.12) until a cutover (`metergate cutover`).
    enforcement: Literal["enforce", "shadow"] = "enforce"
    # The scheduler (actors/jobs.py): off only for tools that must not run it.
    jobs_enabled: bool = True

    # Retention (actors/jobs.py `retention` and `fold_usage`; docs/operations/retention.md).
    # Delivered outbound events: their receivers have them; `metergate outbox list` shows them
    # this long.
    outbox_delivered_retention_s: int = Field(7 * 86_400, ge=3_600)
    # Dead outbound events: an operator may send one again (`metergate outbox retry`) this long.
    outbox_dead_retention_s: int = Field(30 * 86_400, ge=86_400)
    # Idempotency-Key answers: a retry with the same key gets the first answer this long; at
    # least a day, as Stripe keeps its keys (clients retry within that).
    idempotency_retention_s: int = Field(7 * 86_400, ge=86_400)
    # Inbound webhook ids (duplicate detection, and `GET /v1/webhooks/inbound`): Stripe retries
    # a delivery for up to 3 days, so at least 4.
    inbound_webhook_retention_s: int = Field(30 * 86_400, ge=4 * 86_400)
    # Sent meter events: the meter roll-up compares the last 35 days of hours with the events
    # already made (Stripe takes none older), so at least 36 days, or it would bill them again.
    meter_event_retention_s: int = Field(45 * 86_400, ge=36 * 86_400)
    # The ledger's usage rows (one per org and minute) are folded into one per org and hour
    # once they are this old: at least 2 days, far behind the minute the shards write.
    ledger_fold_after_s: int = Field(35 * 86_400, ge=2 * 86_400)
    # usage_rollups (one row per org, lease and minute) are folded into one per org, lease and
    # hour once this many days old (actors/jobs.py `fold_rollups`). At least 31: the billing
    # page's 30 days keep their minutes, and it stays far behind the oldest minute a tick may
    # still be written to (the tick age window, METERGATE_TICK_ID_RETENTION_S, checked below).
    usage_detail_days: int = Field(35, ge=31)

    # Dunning: days past due (in seconds) before each step; the plan an org ends up on.
    dunning_suspend_after_s: int = Field(3 * 86_400, ge=0)
    dunning_degrade_after_s: int = Field(7 * 86_400, ge=0)
    dunning_downgrade_after_s: int = Field(14 * 86_400, ge=0)
    dunning_free_plan: str = "free"
    # Whether a failed one-off invoice (not a subscription's) starts dunning too.
    dunning_one_off_invoices: bool = False

    # Migrations (storage/migrator.py; docs/operations/upgrades.md): each waits at most this
    # long for a lock (a DDL queued behind a job's lock queues every commit behind itself), and
    # is tried this many times before the start stops naming who held the lock.
    migration_lock_timeout_ms: int = Field(3_000, ge=100, le=600_000)
    migration_attempts: int = Field(10, ge=1, le=1_000)
    # Applied migrations whose text changed and may start anyway (whitespace or comments only):
    # comma-separated NNNN_name.sql@checksum, as a refused start prints them.
    migrations_accept_changed: str = ""
    # Tests only: the wire version a shard reports (config/version.py), to make a shard of
    # another version without another checkout. Unset: this code's.
    test_wire_version: int | None = Field(None, ge=1)

    @field_validator("catalog")
    @classmethod
    def _catalog_exists(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"catalog file {path} does not exist")
        return path

    @field_validator("svix_webhook_secret", "webhook_secret")
    @classmethod
    def _svix_secret(cls, secret: str | None) -> str | None:
        if secret is not None:
            from svix.webhooks import Webhook

            try:
                Webhook(secret)
            except Exception:  # noqa: BLE001 - any failure means the same thing to the operator
                raise ValueError("must be a Svix signing secret: whsec_<base64>") from None
        return secret

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, url: str | None) -> str | None:
        if url is not None:
            origin_of(url)  # raises ValueError naming what is wrong
        return url.rstrip("/") if url else url

    @field_validator("allowed_return_origins")
    @classmethod
    def _origins(cls, text: str) -> str:
        for origin in filter(None, (part.strip() for part in text.split(","))):
            if origin_of(origin)[1] is not None:
                raise ValueError(f"{origin!r}: an origin is scheme://host[:port], nothing after it")
        return text

    @property
    def public_base(self) -> str:
        """The public URL (no trailing slash)."""
        if self.public_url:
            return self.public_url
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.http_host, self.http_host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    def return_origins(self) -> set[tuple[str, str, int]]:
        """(scheme, host, port) a return URL may lead to: the public URL's, and the ones named."""
        named = filter(None, (part.strip() for part in self.allowed_return_origins.split(",")))
        return {origin_of(self.public_base)[0]} | {origin_of(origin)[0] for origin in named}

    @field_validator("service_token_previous", "admin_token_previous")
    @classmethod
    def _previous_token_of_one_role(cls, token: str | None, info: ValidationInfo) -> str | None:
        clash = role_clash(info.field_name, {**info.data, info.field_name: token})
        if clash:
            raise ValueError(clash)
        return token

    @field_validator("capability_key", "capability_key_previous")
    @classmethod
    def _capability_key_is_a_seed(cls, key: str | None, info: ValidationInfo) -> str | None:
        if key is None:
            return key
        try:
            raw = base64.b64decode(key + "=", altchars=b"-_", validate=True)
        except ValueError:
            raise ValueError("must be 32 bytes in unpadded base64url (43 characters)") from None
        if len(raw) != 32:
            raise ValueError("must be 32 bytes in unpadded base64url (43 characters)")
        if info.field_name == "capability_key_previous" and key == info.data.get("capability_key"):
            raise ValueError("must differ from METERGATE_CAPABILITY_KEY")
        return key

    @field_validator("usage_detail_days")
    @classmethod
    def _detail_behind_ticks(cls, days: int, info: ValidationInfo) -> int:
        tick_s = info.data.get("tick_id_retention_s")
        if tick_s is not None and days * 86_400 < tick_s + 2 * 86_400:
            raise ValueError(f"must be at least 2 days more than METERGATE_TICK_ID_RETENTION_S ({tick_s} s): "
                             "a late tick may still be written to a minute that old")
        return days

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgres://", "postgresql://")):
            raise ValueError("must start with postgresql:// or postgres://")
        return url


def origin_of(url: str) -> tuple[tuple[str, str, int], str | None]:
    """((scheme, host, port), the rest after the origin or None) of an http(s) URL; ValueError
    for anything else (no host, user info, another scheme)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r} carries user info")
    rest = url.split(parts.netloc, 1)[1]
    return ((parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)),
            rest if rest not in ("", "/") else None)


# Each role's tokens: a token that opened two roles would be taken for the first one checked.
ROLE_TOKENS = {"service": ("service_token", "service_token_previous"),
               "admin": ("admin_token", "admin_token_previous")}


def role_clash(name: str, values: dict) -> str | None:
    """Why the token setting `name` cannot be used (it equals another role's token), or None."""
    token = values.get(name)
    if token is None:
        return None
    role = next(role for role, names in ROLE_TOKENS.items() if name in names)
    for other, names in ROLE_TOKENS.items():
        for other_name in names:
            if other != role and values.get(other_name) == token:
                return f"must differ from METERGATE_{other_name.upper()}: one token would open both roles"
    return None


def stripe_client(settings: Settings, max_network_retries: int = 0):
    """The Stripe client these settings name (key, API base), or None without a key."""
    if not settings.stripe_secret_key:
        return None
    import stripe

    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(settings.stripe_secret_key, base_addresses=base,
                               max_network_retries=max_network_retries)


def load_settings() -> Settings:
    """Read and validate the settings; a SettingsError names each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"METERGATE_{field.upper()}: {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def with_generated_tokens(settings: Settings) -> Settings:
    return generated_tokens(settings)[0]


def generated_tokens(settings: Settings) -> tuple[Settings, set[str]]:
    """Fill in missing tokens and secrets: the ones generated before, kept in data_dir, or new;
    and the names of those made new by this call (the only ones a start may print whole).

    Generated tokens are saved (mode 600, tightened again at every start) so that a restart
    keeps the tokens callers were given.
    """
    path = Path(settings.data_dir) / "tokens.json"
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)  # written by an older version, or loosened by hand
    missing = [name for name in ("service_token", "admin_token", "org_token_secret", "capability_key")
               if getattr(settings, name) is None]
    if not missing:
        return settings, set()
    saved = json.loads(path.read_text()) if path.is_file() else {}
    # token_urlsafe(32): 32 random bytes in unpadded base64url, which is also an Ed25519 seed.
    prefixes = {"service_token": "mg_svc_", "admin_token": "mg_adm_", "org_token_secret": "", "capability_key": ""}
    update = {name: saved.get(name) or prefixes[name] + secrets.token_urlsafe(32) for name in missing}
    filled = {**settings.model_dump(include={n for names in ROLE_TOKENS.values() for n in names}), **update}
    for name in ("service_token_previous", "admin_token_previous"):
        clash = role_clash(name, filled)  # a previous token set to a token kept in tokens.json
        if clash:
            raise SettingsError(f"invalid settings:\n  METERGATE_{name.upper()}: {clash}")
    previous_key = settings.capability_key_previous
    if previous_key is not None and previous_key == update.get("capability_key"):
        raise SettingsError("invalid settings:\n  METERGATE_CAPABILITY_KEY_PREVIOUS: is the key kept in tokens.json; "
                            "set METERGATE_CAPABILITY_KEY to the new key")
    new = {name for name in missing if saved.get(name) != update[name]}
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(json.dumps({**saved, **update}, indent=2))
    return settings.model_copy(update=update), new
