"""docker-compose.yml against the code it deploys: services, images, ports, settings, search attributes.

There is no Docker engine where the tests run, so the file is checked here, not started.
"""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardline import search
from shardline.cli import app
from shardline.ids import CONTROL_QUEUE
from shardline.settings import Settings

REPO = Path(__file__).parents[2]
RAW = (REPO / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(RAW)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SETTINGS = {f"{Settings.model_config['env_prefix']}{name.upper()}" for name in Settings.model_fields}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def resolve(value: object) -> str:
    """What compose makes of a value with nothing set in the shell: defaults filled in, `$$` unescaped."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", str(value)).replace("$$", "$")


def env(service: str) -> dict[str, str | None]:
    raw = SERVICES[service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {k: None if v is None else resolve(v) for k, v in raw.items()}


def published(service: str) -> dict[int, int]:
    """host port -> container port."""
    pairs = (str(p).split(":")[-2:] for p in SERVICES[service].get("ports", []))
    return {int(host): int(container.split("/")[0]) for host, container in pairs}


def one_shots() -> set[str]:
    return {
        name
        for svc in SERVICES.values()
        for name, dep in (svc.get("depends_on") or {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }


def test_the_services() -> None:
    assert {"postgresql", "temporal", "temporal-ui", "setup", "control", "api"} <= set(SERVICES)
    assert not any(svc.get("command") == ["node"] for svc in SERVICES.values()), "node workers run natively"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_images_are_pinned(service: str) -> None:
    image = SERVICES[service].get("image")
    assert image or "build" in SERVICES[service], f"{service}: neither image nor build"
    if image:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{service}: {image} has no tag"
        assert tag != "latest" and "$" not in tag, f"{service}: {image} is not pinned"


def test_the_build_is_the_shardline_cli() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["shardline"\]$', dockerfile, re.M)
    commands = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
    assert SERVICES["control"]["command"] == ["control"] and "control" in commands
    assert SERVICES["api"]["command"] == ["api"] and "api" in commands


def test_ports() -> None:
    assert published("temporal") == {7233: 7233}
    ui_port = int(env("temporal-ui").get("TEMPORAL_UI_PORT") or 8080)  # the UI image listens on 8080 by default
    assert published("temporal-ui") == {8233: ui_port}
    api = Settings(**{k.removeprefix("SHARDLINE_").lower(): v for k, v in env("api").items() if k in SETTINGS and v})
    assert api.api_host == "0.0.0.0"
    assert published("api") == {8000: api.api_port}


def test_every_shardline_variable_is_a_setting() -> None:
    in_environments = {k for svc in SERVICES for k in env(svc) if k.startswith("SHARDLINE_")}
    interpolated = {m.group(1) for m in INTERPOLATION.finditer(RAW)} | set(re.findall(r"\$\$(\w+)", RAW))
    used = in_environments | {v for v in interpolated if v.startswith("SHARDLINE_")}
    assert used, "the compose file sets no SHARDLINE_* variable"
    assert used <= SETTINGS, f"not settings: {sorted(used - SETTINGS)}"


@pytest.mark.parametrize("service", ["control", "api"])
def test_workers_reach_the_compose_temporal(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env(service).items():
        if value is not None:
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.temporal_address == "temporal:7233"
    assert settings.namespace == "default"
    assert {"HF_ENDPOINT", "HF_TOKEN", "SHARDLINE_API_KEY"} <= set(env(service))  # passed through when set


def test_setup_registers_exactly_the_search_attributes() -> None:
    script = "\n".join(SERVICES["setup"]["command"])
    registered = dict(re.findall(r"--name\s+(\w+)\s+--type\s+(\w+)", script))
    assert registered == {key.name: "Keyword" for key in search.ALL}
    assert "temporal operator search-attribute create" in script
    assert env("setup")["TEMPORAL_ADDRESS"] == "temporal:7233"


@pytest.mark.parametrize("service", ["control", "api"])
def test_workers_wait_for_temporal_and_setup(service: str) -> None:
    depends = SERVICES[service]["depends_on"]
    assert depends["temporal"]["condition"] == "service_healthy"
    assert depends["setup"]["condition"] == "service_completed_successfully"


def test_dependencies_can_be_met() -> None:
    for name, svc in SERVICES.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on a missing {dep}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_long_running_service_has_a_healthcheck(service: str) -> None:
    if service in one_shots():
        assert SERVICES[service].get("restart") == "no", f"one-shot {service} must not be restarted"
    else:
        assert SERVICES[service].get("healthcheck", {}).get("test"), f"{service} has no healthcheck"


def test_the_worker_healthchecks_look_at_the_worker() -> None:
    control = " ".join(SERVICES["control"]["healthcheck"]["test"])
    assert f"--task-queue {CONTROL_QUEUE}" in control
    api = " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert "/healthz" in api and ":8000/" in api
