"""Service settings from METERGATE_* environment variables, validated at start."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
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
    # Unset: generated at start and printed (make up), so a fresh machine needs no setup.
    service_token: str | None = Field(None, min_length=16)
    admin_token: str | None = Field(None, min_length=16)
    # Signs org tokens. Unset: generated once and kept with the generated tokens.
    org_token_secret: str | None = Field(None, min_length=32)
    shards: int = Field(2, ge=1, le=256)
    catalog: Path = DEFAULT_CATALOG
    ingress_replicas: int = Field(1, ge=1, le=64)
    # HTTP through Ray Serve's HAProxy (direct to the ingress replicas), not its Python proxy:
    # a no-op Serve endpoint went from ~160 to ~2,700 req/s on the 2-core host (bench/gate.py
    # measures the HAProxy floor). Applies to a Ray that this process starts; a cluster started
    # by `ray start` sets the same environment itself (cluster.yaml).
    serve_haproxy: bool = True
    # Shards publish each org's gate view after every commit that changes it; the ingress and
    # GateClients decide from them. Off: no feed, and every gate check asks the org's shard.
    gate_views: bool = True
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
    tick_id_retention_s: int = Field(26 * 3600, ge=24 * 3600)

    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_usage_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_ticks_per_request: int = Field(10_000, ge=1, le=100_000)

    # Auto-recharge: after a charge, no other for this long, whatever the balance does.
    auto_recharge_cooldown_s: int = Field(60, ge=0, le=86_400)

    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
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
    # The scheduler (actors/jobs.py): off only for tools that must not run it.
    jobs_enabled: bool = True

    # Dunning: days past due (in seconds) before each step; the plan an org ends up on.
    dunning_suspend_after_s: int = Field(3 * 86_400, ge=0)
    dunning_degrade_after_s: int = Field(7 * 86_400, ge=0)
    dunning_downgrade_after_s: int = Field(14 * 86_400, ge=0)
    dunning_free_plan: str = "free"

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

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgres://", "postgresql://")):
            raise ValueError("must start with postgresql:// or postgres://")
        return url


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
    """Fill in missing tokens and secrets: the ones generated before, kept in data_dir, or new.

    Generated tokens are saved (mode 600) so that a restart keeps the tokens callers were given.
    """
    missing = [name for name in ("service_token", "admin_token", "org_token_secret") if getattr(settings, name) is None]
    if not missing:
        return settings
    path = Path(settings.data_dir) / "tokens.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    prefixes = {"service_token": "mg_svc_", "admin_token": "mg_adm_", "org_token_secret": ""}
    update = {name: saved.get(name) or prefixes[name] + secrets.token_urlsafe(32) for name in missing}
    if any(saved.get(name) != update[name] for name in missing):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(json.dumps({**saved, **update}, indent=2))
    return settings.model_copy(update=update)
