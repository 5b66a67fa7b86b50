"""The deployment examples in deploy/ are checked against the code they deploy, without Docker or network pulls:
every container and unit runs a real ``hubctl`` command line, every variable they set is one the hub reads and
parses, the load balancer's upstreams and trusted address agree with the compose file, and the systemd units pass
``systemd-analyze verify``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from cli.main import cli
from hub.config import _SECTIONS, LEGACY_ENV, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
UNITS = ("streamhub@.service", "streamhub-archiver@.service")
# Read by the container's Python, not by the hub.
NOT_HUB_SETTINGS = {"PYTHONUNBUFFERED"}


def hub_variables() -> set[str]:
    """Every environment variable the hub's configuration reads."""
    names = {"HUB_CONFIG", *LEGACY_ENV}
    for section, cls in _SECTIONS.items():
        names.update(f"HUB_{section}_{name}".upper() for name in cls.__dataclass_fields__)
    return names


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def hub_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running the hub image."""
    return {name: service for name, service in document["services"].items() if service.get("image") == "streamhub"}


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} with nothing set: the default, or a stand-in for a required one."""
    return re.sub(r"\$\{[A-Z_]+(?::-([^}]*)|:\?[^}]*)?\}",
                  lambda m: m.group(1) if m.group(1) is not None else "required-value-0123456789abcdef0123", value)


def assert_hubctl_command(argv: list[str]) -> None:
    """``argv`` (after ``hubctl``) names a real subcommand with options it accepts."""
    name, *args = argv
    command = cli.commands.get(name)
    assert command is not None, f"hubctl has no command {name!r}"
    try:
        command.make_context(name, list(args))
    except click.UsageError as exc:
        pytest.fail(f"hubctl {' '.join(argv)}: {exc}")


def test_compose_services_run_real_hubctl_commands() -> None:
    """Each hub-image service's command is a hubctl command line that parses (the image's entrypoint is hubctl);
    every dependency, network and volume named is defined."""
    document = compose()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["hubctl"]' in dockerfile
    services = hub_services(document)
    assert {"hub-1", "hub-2", "archiver", "migrate"} <= set(services)
    for service in services.values():
        assert_hubctl_command(service["command"])
    assert [s["command"][0] for s in services.values()].count("serve") >= 2
    for name, service in document["services"].items():
        for dependency in service.get("depends_on", []):
            assert dependency in document["services"], f"{name} depends on unknown {dependency}"
        networks = service.get("networks", [])
        for network in networks if isinstance(networks, list) else list(networks):
            assert network in document["networks"]
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in document["volumes"], f"{name}: volume {source}"


def test_compose_environment_is_what_the_hub_reads() -> None:
    """Every variable given to a hub container (compose and Dockerfile) is a hub setting, and together they load
    as a valid configuration (types, values)."""
    known = hub_variables()
    dockerfile_env = dict(re.findall(r"(HUB_[A-Z_]+|PYTHONUNBUFFERED)=(\S+)", (DEPLOY / "Dockerfile").read_text()))
    assert set(dockerfile_env) - NOT_HUB_SETTINGS <= known
    for name, service in hub_services(compose()).items():
        environment = {key: interpolate(str(value)) for key, value in service["environment"].items()}
        unknown = set(environment) - known
        assert not unknown, f"{name} sets variables the hub does not read: {sorted(unknown)}"
        config = load_config(None, {**dockerfile_env, **environment})
        assert config.server.host == "0.0.0.0" and config.redis.embedded == "never"
        assert config.redis.url == "redis://redis:6379/0" and config.postgres.url.endswith("@postgres:5432/streamhub")


def test_load_balancer_matches_the_compose_file() -> None:
    """The Caddyfile proxies to exactly the compose file's hub nodes, on the port they listen on, with active
    health checks on /ws/health; the hub believes X-Forwarded-For from Caddy's fixed address only, which lies in
    the network's subnet."""
    document = compose()
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    upstreams = re.search(r"^\s*reverse_proxy (.+) \{$", caddyfile, re.MULTILINE)
    assert upstreams is not None
    serving = {name for name, s in hub_services(document).items() if s["command"][0] == "serve"}
    port = load_config(None, {"JWT_SECRET": "x" * 32}).server.port
    assert set(upstreams.group(1).split()) == {f"{name}:{port}" for name in serving}
    assert "health_uri /ws/health" in caddyfile and "lb_policy" in caddyfile and "dynamic" not in caddyfile.split(
        "reverse_proxy", 1)[1].split("#")[0]
    caddy_address = document["services"]["caddy"]["networks"]["hub"]["ipv4_address"]
    subnet = document["networks"]["hub"]["ipam"]["config"][0]["subnet"]
    assert caddy_address.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]
    for service in hub_services(document).values():
        assert service["environment"]["HUB_SERVER_TRUSTED_PROXIES"] == caddy_address


def unit_exec_argv(unit_text: str) -> list[str]:
    """The hubctl arguments of a unit's ExecStart (through its sh -c wrapper, if any), instance 8000."""
    line = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    command = line.removeprefix("ExecStart=").replace("%i", "8000").replace("%H", "host")
    return command.split("bin/hubctl ", 1)[1].rstrip("'").replace('"', "").split()


def test_systemd_units_run_real_hubctl_commands_with_hub_variables() -> None:
    """The units' ExecStart lines are hubctl command lines that parse; the example environment file sets only hub
    settings, and they load."""
    for unit in UNITS:
        assert_hubctl_command(unit_exec_argv((DEPLOY / "systemd" / unit).read_text()))
    example = (DEPLOY / "systemd" / "streamhub.env.example").read_text()
    environment = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(environment) <= hub_variables()
    config = load_config(None, environment)
    assert config.server.trusted_proxies == ("10.0.0.10", "10.0.0.11")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts both units without a warning (an unknown key or a bad value is only a
    warning there), with their paths pointed at this checkout's hubctl and the example environment file."""
    hubctl = shutil.which("hubctl")
    if hubctl is None:
        pytest.skip("hubctl is not installed")
    instances = []
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        text = text.replace("/opt/streamhub/venv/bin/hubctl", hubctl).replace("/opt/streamhub", str(tmp_path))
        text = text.replace("/etc/streamhub/streamhub.env", str(DEPLOY / "systemd" / "streamhub.env.example"))
        text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.MULTILINE)
        instance = tmp_path / unit.replace("@.", "@1.")
        instance.write_text(text)
        instances.append(str(instance))
    result = subprocess.run(["systemd-analyze", "verify", *instances], capture_output=True, text=True, timeout=30,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if str(tmp_path) in line or "streamhub" in line]
    assert ours == [], result.stderr
