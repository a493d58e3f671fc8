"""cluster.yaml must pass Ray's own cluster-launcher preparation and schema validation."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
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
