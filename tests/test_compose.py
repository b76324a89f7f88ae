"""compose.yaml, the Dockerfile, .dockerignore and the Prometheus config agree with the code.

No Docker engine runs here and this machine's docker has no compose plugin (`docker compose
config` cannot run), so the files are parsed and checked against the parser, the settings
and the files they name."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from negcase.cli.main import build_parser
from negcase.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
NEGCASE = {name: s for name, s in SERVICES.items() if s.get("image") == "negcase:latest"}
WORKERS = {name: s for name, s in NEGCASE.items() if name != "dashboard"}
SETTING_VARIABLES = {f"NEGCASE_{f.name.upper()}" for f in fields(Settings)}
PROMETHEUS_FILE = "workers/deploy/prometheus.yml"
PROMETHEUS = yaml.safe_load((ROOT / PROMETHEUS_FILE).read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("name", sorted(NEGCASE))
def test_each_service_runs_a_real_command_with_valid_flags(name):
    # parse_args exits on an unknown command or flag, failing the test
    args = build_parser().parse_args(NEGCASE[name]["command"])
    assert callable(args.run)


@pytest.mark.parametrize("name", sorted(NEGCASE))
def test_each_setting_a_service_passes_is_one_the_code_reads(name):
    variables = set(NEGCASE[name]["environment"])
    assert variables, name
    assert variables <= SETTING_VARIABLES, variables - SETTING_VARIABLES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_has_a_health_check_and_restarts(name):
    service = SERVICES[name]
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["test"]


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_a_worker_is_checked_by_its_own_beat(name):
    # `negcase health --this-host` passes only while this container's worker refreshes its
    # own health key: a stuck loop turns the container unhealthy
    test = WORKERS[name]["healthcheck"]["test"]
    args = build_parser().parse_args(test[2:])
    assert test[1] == "negcase" and args.command == "health" and args.this_host
    assert args.kind == [
        {"detect": "detector", "train": "trainer", "serve": "inference"}[
            WORKERS[name]["command"][0]
        ]
    ]


def test_the_dashboard_is_checked_by_asking_the_dashboard():
    dashboard = SERVICES["dashboard"]
    port = dashboard["command"][dashboard["command"].index("--port") + 1]
    check = " ".join(dashboard["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in check
    assert "negcase health" not in check


def test_redis_keeps_an_append_only_file_on_a_volume_and_is_reachable_from_the_host():
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    # published on the host's loopback (the Redis has no password), 6379 unless overridden
    [port] = redis["ports"]
    assert re.fullmatch(r"127\.0\.0\.1:\$\{REDIS_HOST_PORT:-6379\}:6379", port)


def test_trainers_and_inference_are_scaled_and_share_the_archive():
    assert WORKERS["trainer"]["deploy"]["replicas"] == 2
    assert WORKERS["inference"]["deploy"]["replicas"] == 2
    for service in NEGCASE.values():
        assert "archive:/data/negative" in service["volumes"]
        assert service["environment"]["NEGCASE_DATA_DIR"] == "/data/negative"


def test_prometheus_scrapes_every_replica_of_every_worker_and_the_gauges():
    prometheus = SERVICES["prometheus"]
    assert f"./{PROMETHEUS_FILE}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert (ROOT / PROMETHEUS_FILE).is_file()
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    for name, service in WORKERS.items():
        port = int(service["command"][service["command"].index("--metrics-port") + 1])
        # DNS service discovery: one target per container, so --scale is followed
        [discovery] = jobs[name]["dns_sd_configs"]
        assert (discovery["names"], discovery["type"], discovery["port"]) == ([name], "A", port)
    dashboard_port = SERVICES["dashboard"]["command"][-1]
    targets = [
        t for job in jobs.values() for c in job.get("static_configs", ()) for t in c["targets"]
    ]
    assert f"dashboard:{dashboard_port}" in targets


def test_the_image_installs_this_package_and_runs_negcase_as_a_user():
    assert "pip install --no-cache-dir ." in DOCKERFILE
    assert 'ENTRYPOINT ["negcase"]' in DOCKERFILE
    for folder in ("schemas", "store", "workers"):
        assert f"COPY {folder} ./{folder}" in DOCKERFILE
    assert "torch==2.13.0" in DOCKERFILE
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # the archive folder belongs to that user before the VOLUME line creates the volume
    assert DOCKERFILE.index(f"chown {users[-1]}") < DOCKERFILE.index("VOLUME /data/negative")


def test_the_build_context_leaves_out_what_the_image_does_not_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)

    for heavy in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        "testcases/negative/cases/nc-1.msgpack",
        "workers/cli/__pycache__/x.pyc",
    ):
        assert ignored(heavy), heavy
    for needed in (
        "pyproject.toml",
        "README.md",
        "schemas/case.py",
        "store/claim.lua",
        "workers/cli/main.py",
    ):
        assert not ignored(needed), needed


def test_the_readme_says_how_to_run_scale_and_reach_redis():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying") :]
    for phrase in (
        "docker compose up",
        "--scale trainer=",
        "redis-cli -p 6379",
        "REDIS_HOST_PORT",
        "http://127.0.0.1:9090",
        "grafana-dashboard.json",
    ):
        assert phrase in section, phrase
