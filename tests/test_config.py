"""Configuration: defaults, hub.yaml, HUB_* and legacy environment names, precedence, and errors that
name the dotted key (in load_config and in ``hubctl serve``)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hub.config import LEGACY_ENV, AuthConfig, Config, ServerConfig, load_config
from hub.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HUB_YAML = ROOT / "hub.yaml"
SECRET = "s" * 32
BASE = {"JWT_SECRET": SECRET}
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "redis_url_explicit"}


def section_classes() -> dict[str, type]:
    defaults = Config()
    return {name: type(getattr(defaults, name)) for name in SECTIONS}


def all_fields() -> list[tuple[str, str, dataclasses.Field[Any]]]:
    return [(section, f.name, f) for section, cls in section_classes().items() for f in dataclasses.fields(cls)]


def get(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: dict[str, str], overrides: dict[str, Any] | None = None,
                 **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ, overrides, **kwargs)
    assert info.value.code == "config_error"
    return info.value.message


# ====================================================================== defaults


def test_defaults() -> None:
    """With only a secret in the environment, every value is the documented default."""
    config = load_config(None, BASE)
    assert config.server.port == 8000
    assert config.server.host == "127.0.0.1"
    assert config.server.max_connections_per_ip == 10
    assert config.server.message_rate_limit_per_min == 60
    assert config.server.connection_timeout_s == 1800.0
    assert config.server.compression is False
    assert config.server.allowed_origins == ()
    assert config.auth.algorithm == "HS256" and config.auth.secret == SECRET
    assert config.redis.url == "redis://127.0.0.1:6379/0" and config.redis_url_explicit is False
    assert config == Config(auth=AuthConfig(secret=SECRET))


def test_load_config_reads_only_the_environ_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables in os.environ are ignored unless passed in: load_config reads only its mapping."""
    monkeypatch.setenv("HUB_SERVER_PORT", "1234")
    monkeypatch.setenv("WEBSOCKET_MAX_CONNECTIONS_PER_IP", "99")
    config = load_config(None, BASE)
    assert config.server.port == 8000 and config.server.max_connections_per_ip == 10


def test_config_is_frozen() -> None:
    """A loaded Config cannot be modified after start."""
    config = load_config(None, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def test_auth_material_is_optional_only_when_asked() -> None:
    """Without a secret, load_config fails naming auth.secret unless require_auth=False."""
    assert "auth.secret" in config_error(None, {})
    assert load_config(None, {}, require_auth=False).auth.secret == ""


# ====================================================================== environment names


@pytest.mark.parametrize(("env_name", "value", "dotted", "expected"), [
    ("REDIS_URL", "redis://10.0.0.5:6380/2", "redis.url", "redis://10.0.0.5:6380/2"),
    ("DATABASE_URL", "postgresql://app@db:5432/app", "postgres.url", "postgresql://app@db:5432/app"),
    ("WEBSOCKET_ENCRYPTION_KEY", "ab" * 32, "encryption.key", "ab" * 32),
    ("WEBSOCKET_MAX_CONNECTIONS_PER_IP", "25", "server.max_connections_per_ip", 25),
    ("WEBSOCKET_MESSAGE_RATE_LIMIT", "120", "server.message_rate_limit_per_min", 120),
    ("WEBSOCKET_CONNECTION_TIMEOUT", "90", "server.connection_timeout_s", 90.0),
    ("WEBSOCKET_CONNECTION_TIMEOUT", "0.5", "server.connection_timeout_s", 0.5),
    ("JWT_SECRET", "t" * 40, "auth.secret", "t" * 40),
    ("JWT_ALGORITHM", "HS512", "auth.algorithm", "HS512"),
    ("JWT_PUBLIC_KEY_FILE", "/etc/hub/jwt.pem", "auth.public_key_file", "/etc/hub/jwt.pem"),
    ("JWT_AUDIENCE", "hub-clients", "auth.audience", "hub-clients"),
    ("JWT_ISSUER", "https://auth.example", "auth.issuer", "https://auth.example"),
])
def test_legacy_environment_names(env_name: str, value: str, dotted: str, expected: Any) -> None:
    """Each historical environment name sets its dotted key, converted to the key's type."""
    assert LEGACY_ENV[env_name] == dotted
    config = load_config(None, {**BASE, env_name: value})
    assert get(config, dotted) == expected
    assert type(get(config, dotted)) is type(expected)


def test_every_legacy_name_is_tested() -> None:
    """The legacy-name table above covers exactly the names hub.config knows."""
    tested = {"REDIS_URL", "DATABASE_URL", "WEBSOCKET_ENCRYPTION_KEY", "WEBSOCKET_MAX_CONNECTIONS_PER_IP",
              "WEBSOCKET_MESSAGE_RATE_LIMIT", "WEBSOCKET_CONNECTION_TIMEOUT", "JWT_SECRET", "JWT_ALGORITHM",
              "JWT_PUBLIC_KEY_FILE", "JWT_AUDIENCE", "JWT_ISSUER"}
    assert set(LEGACY_ENV) == tested


def test_rs256_with_an_existing_public_key_file(tmp_path: Path) -> None:
    """JWT_ALGORITHM=RS256 with JWT_PUBLIC_KEY_FILE naming a file loads without any secret."""
    pem = tmp_path / "jwt.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n", encoding="utf-8")
    config = load_config(None, {"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY_FILE": str(pem)})
    assert config.auth.algorithm == "RS256" and config.auth.public_key_file == str(pem)


@pytest.mark.parametrize(("env_name", "value", "dotted", "expected"), [
    ("HUB_SERVER_PORT", "9001", "server.port", 9001),
    ("HUB_SERVER_HOST", "0.0.0.0", "server.host", "0.0.0.0"),
    ("HUB_SERVER_PING_INTERVAL_S", "2.5", "server.ping_interval_s", 2.5),
    ("HUB_SERVER_COMPRESSION", "on", "server.compression", True),
    ("HUB_SERVER_MAX_FRAME_BYTES", "2097152", "server.max_frame_bytes", 2_097_152),
    ("HUB_SERVER_MAX_CONTENT_BYTES", "1024", "server.max_content_bytes", 1024),
    ("HUB_REDIS_KEY_PREFIX", "other:", "redis.key_prefix", "other:"),
    ("HUB_REDIS_EMBEDDED", "never", "redis.embedded", "never"),
    ("HUB_REDIS_CONFIGURE_KEYSPACE_EVENTS", "false", "redis.configure_keyspace_events", False),
    ("HUB_POSTGRES_URL", "postgresql://x@y/z", "postgres.url", "postgresql://x@y/z"),
    ("HUB_AUTH_SECRET", "h" * 32, "auth.secret", "h" * 32),
    ("HUB_AUTH_LEEWAY_S", "3", "auth.leeway_s", 3.0),
    ("HUB_ROOMS_MAX_REPLAY", "50", "rooms.max_replay", 50),
    ("HUB_ROOMS_CHANNEL_PUBLISH_ROLES", "admin,support", "rooms.channel_publish_roles", ("admin", "support")),
    ("HUB_ROOMS_ADMIN_ALL_ROOMS", "no", "rooms.admin_all_rooms", False),
    ("HUB_RELAY_READ_COUNT", "10", "relay.read_count", 10),
    ("HUB_ENCRYPTION_KEY", "a-passphrase-of-some-length", "encryption.key", "a-passphrase-of-some-length"),
    ("HUB_LOGGING_LEVEL", "DEBUG", "logging.level", "DEBUG"),
    ("HUB_LOGGING_JSON", "1", "logging.json", True),
])
def test_generic_hub_section_key_variables(env_name: str, value: str, dotted: str, expected: Any) -> None:
    """HUB_<SECTION>_<KEY> sets the dotted key, converted to the key's type."""
    environ = {"HUB_AUTH_SECRET": value} if env_name == "HUB_AUTH_SECRET" else {**BASE, env_name: value}
    config = load_config(None, environ)
    assert get(config, dotted) == expected


@pytest.mark.parametrize(("section", "key"), [(s, k) for s, k, _f in all_fields()],
                         ids=[f"{s}.{k}" for s, k, _f in all_fields()])
def test_every_key_has_a_hub_variable(section: str, key: str) -> None:
    """Every config key is read from HUB_<SECTION>_<KEY>: a string lands (or is refused naming the key)
    and a garbage value for a typed key is refused naming the key."""
    env_name = f"HUB_{section}_{key}".upper()
    field_type = get(Config(), f"{section}.{key}").__class__
    if field_type is str:
        try:
            config = load_config(None, {env_name: "probe-value"}, require_auth=False)
        except ConfigError as exc:
            assert f"{section}.{key}" in exc.message
        else:
            assert get(config, f"{section}.{key}") == "probe-value"
    elif field_type is tuple:
        try:
            config = load_config(None, {env_name: "probe-a,probe-b"}, require_auth=False)
        except ConfigError as exc:  # a list whose entries are checked (encryption keys)
            assert f"{section}.{key}" in exc.message
        else:
            assert get(config, f"{section}.{key}") == ("probe-a", "probe-b")
    else:
        assert f"{section}.{key}" in config_error(None, {env_name: "!bad"}, require_auth=False)


def test_empty_legacy_variable_is_ignored_but_empty_hub_variable_is_not() -> None:
    """REDIS_URL="" leaves the default (not explicit); HUB_SERVER_PORT="" is an error naming server.port."""
    config = load_config(None, {**BASE, "REDIS_URL": "", "WEBSOCKET_MAX_CONNECTIONS_PER_IP": ""})
    assert config.redis.url == "redis://127.0.0.1:6379/0" and config.redis_url_explicit is False
    assert config.server.max_connections_per_ip == 10
    assert "server.port" in config_error(None, {**BASE, "HUB_SERVER_PORT": ""})


@pytest.mark.parametrize(("yaml_text", "environ", "overrides", "explicit"), [
    ("", {}, {}, False),
    ("redis:\n  url: redis://127.0.0.1:6379/0\n", {}, {}, True),
    ("", {"HUB_REDIS_URL": "redis://127.0.0.1:6379/0"}, {}, True),
    ("", {"REDIS_URL": "redis://127.0.0.1:6379/0"}, {}, True),
    ("", {}, {"redis.url": "redis://127.0.0.1:6379/0"}, True),
    ("redis:\n  key_prefix: x\n", {"HUB_REDIS_EMBEDDED": "auto"}, {}, False),
])
def test_redis_url_explicit_tracks_any_url_setting(tmp_path: Path, yaml_text: str, environ: dict[str, str],
                                                   overrides: dict[str, Any], explicit: bool) -> None:
    """redis_url_explicit is true exactly when some layer set redis.url, even to the default."""
    config = load_config(write_yaml(tmp_path, yaml_text), {**BASE, **environ}, overrides)
    assert config.redis_url_explicit is explicit


# ====================================================================== precedence


@pytest.mark.parametrize("layers", [0, 1, 2, 3, 4])
def test_precedence(tmp_path: Path, layers: int) -> None:
    """defaults < YAML file < HUB_* < legacy names < overrides argument: each layer beats the ones below."""
    path = write_yaml(tmp_path, "server:\n  max_connections_per_ip: 3\n  port: 1001\n") if layers >= 1 else None
    environ = dict(BASE)
    if layers >= 2:
        environ["HUB_SERVER_MAX_CONNECTIONS_PER_IP"] = "4"
    if layers >= 3:
        environ["WEBSOCKET_MAX_CONNECTIONS_PER_IP"] = "5"
    overrides = {"server.max_connections_per_ip": 6} if layers >= 4 else None
    config = load_config(path, environ, overrides)
    assert config.server.max_connections_per_ip == [10, 3, 4, 5, 6][layers]
    assert config.server.port == (1001 if layers >= 1 else 8000)  # lower layers survive for other keys


def test_legacy_secret_beats_hub_secret_and_yaml(tmp_path: Path) -> None:
    """JWT_SECRET wins over HUB_AUTH_SECRET, which wins over the YAML file's auth.secret."""
    path = write_yaml(tmp_path, f"auth:\n  secret: {'y' * 32}\n")
    assert load_config(path, {}).auth.secret == "y" * 32
    assert load_config(path, {"HUB_AUTH_SECRET": "h" * 32}).auth.secret == "h" * 32
    assert load_config(path, {"HUB_AUTH_SECRET": "h" * 32, "JWT_SECRET": "j" * 32}).auth.secret == "j" * 32


def test_yaml_values_are_typed_and_partial_sections_keep_defaults(tmp_path: Path) -> None:
    """YAML values set their keys (lists become tuples), and keys a section leaves out keep defaults."""
    path = write_yaml(tmp_path, "server:\n  port: 0\n  compression: true\n  allowed_origins: [https://a.example]\n"
                                "rooms:\nlogging:\n  level: warning\n")
    config = load_config(path, BASE)
    assert config.server.port == 0 and config.server.compression is True
    assert config.server.allowed_origins == ("https://a.example",)
    assert config.server.max_frame_bytes == ServerConfig().max_frame_bytes
    assert config.logging.level == "warning"
    assert config.rooms == Config().rooms


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    """An empty (or comments-only) YAML file is the defaults."""
    assert load_config(write_yaml(tmp_path, "# nothing\n"), BASE) == load_config(None, BASE)


# ====================================================================== the repository's hub.yaml


def test_repo_hub_yaml_equals_the_defaults() -> None:
    """The shipped hub.yaml loads and yields exactly the built-in defaults."""
    assert load_config(HUB_YAML, BASE) == load_config(None, BASE)


def yaml_sections(text: str) -> dict[str, str]:
    """hub.yaml's text split into top-level sections (comments included)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"([a-z_]+):\s*$", line)
        if m:
            current = m.group(1)
            blocks[current] = ""
        elif current is not None:
            blocks[current] += line + "\n"
    return blocks


def test_repo_hub_yaml_documents_every_key() -> None:
    """Every dataclass field appears in hub.yaml under its section (as a key or a commented key) together
    with its HUB_ variable name, and every legacy environment name is mentioned."""
    text = HUB_YAML.read_text(encoding="utf-8")
    blocks = yaml_sections(text)
    missing = [f"{section} (section)" for section in SECTIONS if section not in blocks]
    for section, key, _f in all_fields():
        block = blocks.get(section, "")
        if not re.search(rf"^\s+(#\s*)?{key}:", block, re.M):
            missing.append(f"{section}.{key} (key)")
        if f"HUB_{section}_{key}".upper() not in block:
            missing.append(f"{section}.{key} (HUB_ variable)")
    missing += [name for name in LEGACY_ENV if name not in text]
    assert missing == []


# ====================================================================== errors name the key


@pytest.mark.parametrize(("environ", "key"), [
    ({"WEBSOCKET_MAX_CONNECTIONS_PER_IP": "abc"}, "server.max_connections_per_ip"),
    ({"WEBSOCKET_MAX_CONNECTIONS_PER_IP": "0"}, "server.max_connections_per_ip"),
    ({"WEBSOCKET_MESSAGE_RATE_LIMIT": "lots"}, "server.message_rate_limit_per_min"),
    ({"WEBSOCKET_MESSAGE_RATE_LIMIT": "-1"}, "server.message_rate_limit_per_min"),
    ({"WEBSOCKET_CONNECTION_TIMEOUT": "-5"}, "server.connection_timeout_s"),
    ({"WEBSOCKET_CONNECTION_TIMEOUT": "0"}, "server.connection_timeout_s"),
    ({"WEBSOCKET_CONNECTION_TIMEOUT": "soon"}, "server.connection_timeout_s"),
    ({"HUB_SERVER_PING_INTERVAL_S": "-1"}, "server.ping_interval_s"),
    ({"HUB_SERVER_PING_TIMEOUT_S": "-0.1"}, "server.ping_timeout_s"),
    ({"HUB_SERVER_SLOW_CLOSE_GRACE_S": "0"}, "server.slow_close_grace_s"),
    ({"HUB_SERVER_DRAIN_TIMEOUT_S": "-3"}, "server.drain_timeout_s"),
    ({"HUB_SERVER_PORT": "70000"}, "server.port"),
    ({"HUB_SERVER_PORT": "-1"}, "server.port"),
    ({"HUB_SERVER_PORT": "80.5"}, "server.port"),
    ({"HUB_SERVER_MAX_CONTENT_BYTES": "2000000"}, "server.max_content_bytes"),
    ({"HUB_SERVER_MAX_FRAME_BYTES": "0"}, "server.max_frame_bytes"),
    ({"HUB_SERVER_COMPRESSION": "maybe"}, "server.compression"),
    ({"REDIS_URL": "http://127.0.0.1:6379"}, "redis.url"),
    ({"HUB_REDIS_KEY_PREFIX": "a{b"}, "redis.key_prefix"),
    ({"HUB_REDIS_EMBEDDED": "sometimes"}, "redis.embedded"),
    ({"JWT_ALGORITHM": "none"}, "auth.algorithm"),
    ({"JWT_ALGORITHM": "NONE"}, "auth.algorithm"),
    ({"JWT_ALGORITHM": "hs256"}, "auth.algorithm"),
    ({"HUB_AUTH_LEEWAY_S": "-1"}, "auth.leeway_s"),
    ({"HUB_ROOMS_MAX_NAME_LENGTH": "8"}, "rooms.max_name_length"),
    ({"HUB_ROOMS_TYPING_TTL_MS": "100"}, "rooms.typing_ttl_ms"),
    ({"HUB_ROOMS_MAX_REPLAY": "0"}, "rooms.max_replay"),
    ({"HUB_RELAY_NODE_HEARTBEAT_S": "20"}, "relay.node_heartbeat_s"),
    ({"HUB_LOGGING_LEVEL": "verbose"}, "logging.level"),
])
def test_bad_environment_values_name_the_key(environ: dict[str, str], key: str) -> None:
    """A bad or out-of-range value fails with ConfigError whose message names the dotted key."""
    assert key in config_error(None, {**BASE, **environ})


@pytest.mark.parametrize("environ", [
    {},
    {"JWT_SECRET": ""},
    {"JWT_SECRET": "s" * 31},
    {"JWT_SECRET": "s" * 31, "JWT_ALGORITHM": "HS512"},
    {"HUB_AUTH_SECRET": "short"},
])
def test_hs_algorithms_need_a_32_character_secret(environ: dict[str, str]) -> None:
    """HS* with a missing, empty or short secret fails naming auth.secret."""
    assert "auth.secret" in config_error(None, environ)


def test_asymmetric_algorithms_need_an_existing_public_key_file(tmp_path: Path) -> None:
    """RS256 without JWT_PUBLIC_KEY_FILE, or with one naming no file, fails naming auth.public_key_file."""
    assert "auth.public_key_file" in config_error(None, {**BASE, "JWT_ALGORITHM": "RS256"})
    missing = str(tmp_path / "absent.pem")
    message = config_error(None, {"JWT_ALGORITHM": "ES256", "JWT_PUBLIC_KEY_FILE": missing})
    assert "auth.public_key_file" in message and missing in message


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("nonsense:\n  a: 1\n", "nonsense"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("server:\n  port: [1]\n", "server.port"),
    ("server:\n  port: eighty\n", "server.port"),
    ("server:\n  compression: maybe\n", "server.compression"),
    ("server:\n  allowed_origins: 5\n", "server.allowed_origins"),
    ("server:\n  connection_timeout_s: -1\n", "server.connection_timeout_s"),
    ("rooms:\n  max_replay: true\n", "rooms.max_replay"),
    ("auth:\n  audience: [a, b]\n", "auth.audience"),
    ("server: 5\n", "server"),
    ("server: [port]\n", "server"),
])
def test_bad_yaml_values_name_the_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    """Unknown sections and keys, wrong types and bad values in the YAML file fail naming the key."""
    assert needle in config_error(write_yaml(tmp_path, yaml_text), BASE)


@pytest.mark.parametrize("yaml_text", ["- server\n- redis\n", "just a string\n", "42\n"])
def test_yaml_top_level_must_be_a_mapping(tmp_path: Path, yaml_text: str) -> None:
    """A YAML document that is a list or a scalar fails with ConfigError naming the file."""
    path = write_yaml(tmp_path, yaml_text)
    message = config_error(path, BASE)
    assert str(path) in message and "mapping" in message


@pytest.mark.parametrize("yaml_text", ["server: [\n", "server:\n  port: 1\n port: 2\n", "\tserver: {}\n",
                                       "server: {port: 1\n"])
def test_invalid_yaml_fails_naming_the_file(tmp_path: Path, yaml_text: str) -> None:
    """A file that is not valid YAML fails with ConfigError naming the file."""
    path = write_yaml(tmp_path, yaml_text)
    message = config_error(path, BASE)
    assert str(path) in message and "YAML" in message


def test_missing_file_fails_naming_the_file(tmp_path: Path) -> None:
    """A config path that does not exist fails with ConfigError naming it."""
    path = tmp_path / "nope.yaml"
    assert str(path) in config_error(path, BASE)


def test_bad_override_names_the_key() -> None:
    """A bad value in the overrides argument (a command-line flag) also names the key."""
    assert "server.port" in config_error(None, BASE, {"server.port": "x"})
    assert "server.port" in config_error(None, BASE, {"server.port": 65536})


# ====================================================================== value parsing


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True), (" on ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("off", False), ("OFF", False),
])
def test_bool_parsing(value: str, expected: bool) -> None:
    """Booleans from the environment accept 1/true/yes/on and 0/false/no/off, case-insensitively."""
    assert load_config(None, {**BASE, "HUB_SERVER_COMPRESSION": value}).server.compression is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "y", "enabled", "tru", "-1"])
def test_bool_garbage_is_refused(value: str) -> None:
    """Anything else is a ConfigError naming the key and quoting the value."""
    message = config_error(None, {**BASE, "HUB_SERVER_COMPRESSION": value})
    assert "server.compression" in message and repr(value) in message


@pytest.mark.parametrize(("value", "expected"), [
    ("https://a.example", ("https://a.example",)),
    ("https://a.example,https://b.example", ("https://a.example", "https://b.example")),
    (" https://a.example , https://b.example ,", ("https://a.example", "https://b.example")),
    (",,", ()),
    ("", ()),
])
def test_lists_from_comma_separated_environment_strings(value: str, expected: tuple[str, ...]) -> None:
    """List keys take comma-separated strings; items are trimmed and empty items dropped."""
    config = load_config(None, {**BASE, "HUB_SERVER_ALLOWED_ORIGINS": value})
    assert config.server.allowed_origins == expected


# ====================================================================== hubctl serve


def cli_env(**extra: str) -> dict[str, str]:
    """The current environment without any hub variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_") and k not in LEGACY_ENV}
    env.update(extra)
    return env


def test_hubctl_serve_with_a_bad_environment_value_exits_naming_the_key() -> None:
    """hubctl serve with WEBSOCKET_MESSAGE_RATE_LIMIT=lots exits non-zero before serving, and stderr names
    server.message_rate_limit_per_min."""
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=cli_env(WEBSOCKET_MESSAGE_RATE_LIMIT="lots", JWT_SECRET=SECRET),
        capture_output=True, timeout=20, check=False)
    assert result.returncode != 0
    assert b"server.message_rate_limit_per_min" in result.stderr
    assert b"ready" not in result.stdout


def test_hubctl_serve_with_a_bad_config_file_exits_naming_the_key(tmp_path: Path) -> None:
    """hubctl --config FILE serve with a bad value in the file exits non-zero and stderr names the key."""
    path = write_yaml(tmp_path, "server:\n  port: eighty\n")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "--config", str(path), "serve"],
        cwd=ROOT, env=cli_env(JWT_SECRET=SECRET), capture_output=True, timeout=20, check=False)
    assert result.returncode != 0
    assert b"server.port" in result.stderr
    assert b"ready" not in result.stdout
