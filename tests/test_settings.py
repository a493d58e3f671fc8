"""Settings: validated with messages naming the variable; generated tokens survive restarts."""

from __future__ import annotations

import socket
import stat

import pytest

from config.catalog import CatalogError, parse_catalog
from config.settings import Settings, SettingsError, load_settings, with_generated_tokens


def test_generated_tokens_are_kept_for_the_next_start(tmp_path):
    first = with_generated_tokens(Settings(data_dir=tmp_path))
    second = with_generated_tokens(Settings(data_dir=tmp_path))
    assert first.admin_token.startswith("mg_adm_") and first.service_token.startswith("mg_svc_")
    assert (second.admin_token, second.service_token, second.org_token_secret) == (
        first.admin_token, first.service_token, first.org_token_secret)
    assert len(first.org_token_secret) >= 32
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600


def test_tokens_set_in_the_environment_win_and_are_not_written(tmp_path):
    settings = with_generated_tokens(Settings(data_dir=tmp_path, admin_token="a" * 20, service_token="s" * 20,
                                              org_token_secret="o" * 32, capability_key="k" * 43))
    assert settings.admin_token == "a" * 20
    assert not (tmp_path / "tokens.json").exists()


def test_bad_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("METERGATE_HTTP_PORT", "99999")
    monkeypatch.setenv("METERGATE_DATABASE_URL", "mysql://nope")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "METERGATE_HTTP_PORT" in str(caught.value)
    assert "METERGATE_DATABASE_URL" in str(caught.value)


def test_a_catalog_without_its_default_plan_is_refused():
    with pytest.raises(CatalogError, match="default_plan"):
        parse_catalog({"default_plan": "gold", "signup_grant_micros": 0, "default_max_disk_mb": 1,
                       "tiers": {t: 1 for t in ("base", "pro", "pro_plus", "pro_plus_plus", "custom")},
                       "plans": []})


def test_a_plan_whose_versions_have_different_periods_is_refused():
    """A new period takes the successor version in effect at its start (billing-rules 5.3):
    that needs one period kind per plan, or the start would depend on the version."""
    import tomllib

    from config.settings import DEFAULT_CATALOG

    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    hobby = next(p for p in raw["plans"] if p["id"] == "hobby_weekly")
    raw["plans"].append({**hobby, "version": 2, "period": "month", "effective_from": "2027-01-01T00:00:00Z"})
    with pytest.raises(CatalogError, match="hobby_weekly version .* one period"):
        parse_catalog(raw)


def test_each_service_gets_serve_fallback_proxy_ports_of_its_own(tmp_path):
    """Serve's fallback proxy binds 8500/9500 with SO_REUSEPORT by default: two services on one
    host would share them, and one's requests would reach the other's replicas (seen: a
    restarted `make up` answered 401 with another service's tokens). Each start picks free
    ports of its own, outside Serve's replica ports."""
    from serve_app.launch import SERVE_DIRECT_INGRESS_PORTS, lean_serve_env

    settings = Settings(data_dir=tmp_path, service_token="s" * 20, admin_token="a" * 20, org_token_secret="o" * 32)
    first, second = lean_serve_env(settings), lean_serve_env(settings)
    ports = [int(env[name]) for env in (first, second)
             for name in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")]
    assert 8500 not in ports and 9500 not in ports
    assert not any(SERVE_DIRECT_INGRESS_PORTS[0] <= p <= SERVE_DIRECT_INGRESS_PORTS[1] for p in ports)
    for port in ports:  # free when chosen (a start binds them moments later)
        with socket.socket() as sock:
            sock.bind(("", port))
