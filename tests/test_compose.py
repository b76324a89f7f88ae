"""compose.yaml and the Dockerfile agree with the code (no Docker engine runs here)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from negcase.cli.main import build_parser
from negcase.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name != "redis"}
SETTING_VARIABLES = {f"NEGCASE_{f.name.upper()}" for f in fields(Settings)}


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_each_service_runs_a_real_command_with_valid_flags(name):
    # parse_args exits on an unknown command or flag, failing the test
    args = build_parser().parse_args(WORKERS[name]["command"])
    assert callable(args.run)


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_each_setting_a_service_passes_is_one_the_code_reads(name):
    variables = set(WORKERS[name]["environment"])
    assert variables, name
    assert variables <= SETTING_VARIABLES, variables - SETTING_VARIABLES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_has_a_health_check_and_restarts(name):
    service = SERVICES[name]
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["test"]
    if name != "redis":
        args = build_parser().parse_args(service["healthcheck"]["test"][2:])
        assert args.command == "health" and args.kind


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_trainers_and_inference_are_scaled_and_share_the_archive():
    assert WORKERS["trainer"]["deploy"]["replicas"] == 2
    assert WORKERS["inference"]["deploy"]["replicas"] == 2
    for service in WORKERS.values():
        assert "archive:/data/negative" in service["volumes"]
        assert service["environment"]["NEGCASE_DATA_DIR"] == "/data/negative"


def test_the_image_installs_this_package_and_runs_negcase():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile
    assert 'ENTRYPOINT ["negcase"]' in dockerfile
    for folder in ("schemas", "store", "workers"):
        assert f"COPY {folder} ./{folder}" in dockerfile
    assert "torch==2.13.0" in dockerfile
