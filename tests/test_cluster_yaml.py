"""cluster.yaml and serve_config.yaml must pass Ray's own validation: the cluster launcher's
preparation and schema, Serve's deploy schema and autoscaling config."""

from __future__ import annotations

import copy
import inspect
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import jsonschema
import pydantic
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation_as_ray_up_runs_it():
    prepared = prepare_config(load())
    validate_config(prepared)
    assert prepared["cluster_name"] == "metergate"
    assert any("--port=6380" in c for c in prepared["head_start_ray_commands"])
    assert any("pip install" in c and "-e ." in c for c in prepared["setup_commands"])


def test_ray_validation_rejects_a_broken_cluster_yaml():
    # The check above can fail: a misspelt top-level key is refused by the same validator.
    broken = copy.deepcopy(load())
    broken["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_has_an_autoscaling_worker_group_and_gives_every_node_the_settings():
    prepared = prepare_config(load())
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    worker = types["worker"]
    assert 1 <= worker["min_workers"] < worker["max_workers"] <= prepared["max_workers"]
    assert worker["resources"]["CPU"] >= 1
    # The same METERGATE_* environment in every Ray process (the builder of serve_config.yaml
    # reads it wherever it runs), and the cluster-wide HAProxy switch stays on.
    assert prepared["file_mounts"]["~/metergate.env"] == ".metergate/cluster.env"
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        (start,) = [c for c in commands if " start " in c]
        assert start.index(". ~/metergate.env") < start.index("ray start")
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in start


def test_every_ray_process_of_the_cluster_requires_the_auth_token_the_nodes_are_given():
    """`ray start` turns token auth on only when asked (or when a token file exists): without
    it, any host reaching the Ray ports could run code on nodes holding every secret."""
    prepared = prepare_config(load())
    assert prepared["file_mounts"]["~/.ray/auth_token"] == ".metergate/ray_auth_token"
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        (start,) = [c for c in commands if " start " in c]
        assert "RAY_AUTH_MODE=token" in start.split("ray start")[0]
    assert "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"])
    ignored = (CLUSTER_YAML.parent / ".gitignore").read_text().split()
    assert ".metergate/" in ignored  # the token file is never committed


def test_every_cluster_node_runs_serve_as_make_up_does_with_metergates_haproxy_front(tmp_path):
    """The fast Serve path of `make up` (launch.lean_serve_env), the same on every node:
    HAProxy through metergate's front (its outage answers), the proxy health check and the
    client timeout. The front is the `metergate-haproxy` command the install puts in the
    virtualenv: it runs, and becomes the real HAProxy."""
    from config.settings import Settings
    from serve_app.launch import haproxy_dir, lean_serve_env

    settings = Settings(data_dir=tmp_path)
    try:
        local = lean_serve_env(settings)
    finally:
        shutil.rmtree(haproxy_dir(settings), ignore_errors=True)  # its HAProxy folder in /tmp, as a stop does
    same = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S",
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S")
    front = "$HOME/metergate/.venv/bin/metergate-haproxy"
    for commands in (load()["head_start_ray_commands"], load()["worker_start_ray_commands"]):
        (start,) = [c for c in commands if " start " in c]
        node = dict(word.split("=", 1) for word in start.split("ray start")[0].split("; ")[-1].split()
                    if word.startswith("RAY_SERVE_"))
        assert {name: node.get(name) for name in same} == {name: local[name] for name in same}
        assert node["RAY_SERVE_HAPROXY_BINARY_PATH"] == front
        # HAProxy's files in a folder of the service's user, made 0700 before Ray starts: not
        # Serve's default /tmp/haproxy-serve, which another local user could make first.
        private = "$HOME/.metergate-haproxy"
        assert f"install -d -m 700 {private};" in start
        assert {name: node.get(name) for name in local if name.startswith("RAY_SERVE_HAPROXY_")
                and name not in ("RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_NBTHREAD",
                                 "RAY_SERVE_HAPROXY_METRICS_ENABLED", "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S")} == {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{private}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{private}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": private,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{private}/server-state"}
    for commands in (load()["head_start_ray_commands"], load()["worker_start_ray_commands"]):
        assert "pkill -f '.metergate-haproxy/'" in commands[0]
    scripts = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["metergate-haproxy"] == "serve_app.haproxy_front:main"
    installed = Path(sys.executable).parent / "metergate-haproxy"  # `make` installs the project so
    version = subprocess.run([installed, "-v"], capture_output=True, timeout=30)
    assert version.returncode == 0 and b"HAProxy version" in version.stdout, version


def test_the_on_prem_variant_the_file_describes_validates_too():
    # Ray's on-prem provider has a single node type: no available_node_types, hosts listed.
    on_prem = {k: v for k, v in load().items() if k not in ("available_node_types", "head_node_type")}
    on_prem["provider"] = {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]}
    validate_config(prepare_config(on_prem))
    # ... and refuses node types, which is why cluster.yaml itself names a cloud provider.
    refused = {**load(), "provider": on_prem["provider"]}
    with pytest.raises(click.ClickException):
        prepare_config(refused)


SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_serve_config_passes_serve_validation_and_names_what_the_code_has():
    from ray.serve._private.utils import import_attr
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from serve_app.launch import APP_NAME, FEED_APP_NAME, FEED_ROUTE

    config = ServeDeploySchema.model_validate(serve_config())
    application, feed = config.applications
    assert application.name == APP_NAME and application.route_prefix == "/"
    assert feed.name == FEED_APP_NAME and feed.route_prefix == FEED_ROUTE
    for app in (application, feed):
        builder = import_attr(app.import_path)
        assert callable(builder) and len(inspect.signature(builder).parameters) == 1  # Serve's builder contract
    deployments = {d.name: d for d in application.deployments}
    from serve_app.deployment import FeedIngress, Ingress

    assert set(deployments) == {Ingress.name}
    assert {d.name for d in feed.deployments} == {FeedIngress.name}
    # Serve checks autoscaling_config only when the controller applies it, and ignores a key
    # it does not know: both are checked here.
    autoscaling = serve_config()["applications"][0]["deployments"][0]["autoscaling_config"]
    unknown = set(autoscaling) - set(AutoscalingConfig.model_fields)
    assert not unknown, f"keys Serve would ignore: {unknown}"
    checked = AutoscalingConfig(**autoscaling)
    assert 1 <= checked.min_replicas < checked.max_replicas
    assert 0 < checked.target_ongoing_requests < Ingress.max_ongoing_requests


def test_serve_validation_rejects_a_broken_serve_config():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    broken = serve_config()
    broken["applications"][0]["deployments"][0]["num_replicas"] = 3  # fixed and autoscaled at once
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(broken)
    inverted = {**serve_config()["applications"][0]["deployments"][0]["autoscaling_config"], "min_replicas": 99}
    with pytest.raises(pydantic.ValidationError):
        AutoscalingConfig(**inverted)


def test_the_application_builder_refuses_what_a_cluster_cannot_run(monkeypatch):
    from config.settings import SettingsError
    from serve_app.deployment import app

    for name in ("DATABASE_URL", "SERVICE_TOKEN", "ADMIN_TOKEN", "ORG_TOKEN_SECRET", "CAPABILITY_KEY"):
        monkeypatch.delenv(f"METERGATE_{name}", raising=False)
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", "an-admin-token-0123456789")
    # No embedded Postgres and no generated tokens: the builder may run on any node.
    with pytest.raises(SettingsError) as refused:
        app({})
    message = str(refused.value)
    assert all(f"METERGATE_{name}" in message for name in ("DATABASE_URL", "SERVICE_TOKEN", "ORG_TOKEN_SECRET",
                                                           "CAPABILITY_KEY"))
    assert "METERGATE_ADMIN_TOKEN" not in message
    with pytest.raises(ValueError, match="takes no args"):
        app({"shards": 4})
