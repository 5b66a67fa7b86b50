"""Configuration: frozen dataclasses loaded once, from hub.yaml plus environment overrides.

Only this module reads ``os.environ``; everything else receives a :class:`Config`.

Precedence, lowest first: the defaults below, the YAML file, generic ``HUB_<SECTION>_<KEY>``
variables, then the platform's historical names (``REDIS_URL``, ``JWT_SECRET``, ...), which
operators already use. A bad value fails at start with :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hub.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # REST port (aiohttp): every endpoint, including POSTs with a body, which the WebSocket port
    # cannot read. The WebSocket port answers the GET endpoints too. -1 turns it off.
    api_port: int = 8001
    # Largest WebSocket frame accepted; bigger frames close the socket with 1009 (websockets).
    max_frame_bytes: int = 1_048_576
    # Largest chat content accepted; bigger ones get error "message_too_large" and nothing is stored.
    max_content_bytes: int = 65_536
    # Protocol-level keepalive; also sent to clients as heartbeat_s.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # Idle timeout: a connection that sends no frame for this long is closed (code 4002).
    connection_timeout_s: float = 1800.0
    # Concurrent connections from one IP, across all nodes (HTTP 429 beyond).
    max_connections_per_ip: int = 10
    # Concurrent connections of one user, across all nodes (HTTP 429 beyond).
    max_connections_per_user: int = 20
    # New connections per IP per minute, after a burst (HTTP 429 beyond).
    connect_rate_limit_per_min: int = 120
    connect_burst: int = 30
    # Chat messages per user per minute, after a burst (error rate_limited beyond; nothing stored).
    message_rate_limit_per_min: int = 60
    message_burst: int = 20
    # Typing indicators per user per minute, after a burst (error rate_limited beyond).
    typing_rate_limit_per_min: int = 120
    typing_burst: int = 10
    # When Redis cannot be asked: True lets messages/typing/connects through (fail open), False
    # refuses them (fail closed). Separate for rates and for connection caps.
    rate_limits_fail_open: bool = True
    connection_caps_fail_open: bool = True
    # Who may read /metrics and /ws/connection-stats: these client IPs (exact), or a token with the
    # admin role. Default: loopback only.
    admin_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    # Peers whose X-Forwarded-For is believed (exact IPs of your reverse proxies); others' is ignored.
    trusted_proxies: tuple[str, ...] = ()
    # A connection whose unsent bytes exceed this is closed with 4008 "slow".
    outbox_limit_bytes: int = 1_048_576
    # Outgoing frames are collected this long and written together (0: at the end of each loop turn).
    write_delay_ms: float = 0.0
    # Under load, client messages are sent to Redis at most once per linger, in one pipeline (0: each
    # loop turn). After a quiet spell a message goes at once.
    publish_linger_ms: float = 5.0
    # After the slow close frame is queued, the TCP connection is aborted after this long.
    slow_close_grace_s: float = 5.0
    # On SIGTERM, how long clients get to finish the close handshake before the node exits.
    drain_timeout_s: float = 10.0
    # permessage-deflate: off by default (3x slower fan-out, ~33 KB per connection).
    compression: bool = False
    # Allowed Origin header values (exact match); empty allows any origin.
    allowed_origins: tuple[str, ...] = ()
    # Publishes a single connection may have in flight before the hub stops reading from it.
    max_inflight_publishes: int = 64
    # Development only: GET /ui/dev-token mints a token for any user name (loopback clients only), so the
    # web UI logs in without a backend. hubctl --dev serve turns it on.
    dev_login: bool = False


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    # The url names a Redis Cluster (seed nodes; a redis+cluster:// url says so by itself).
    cluster: bool = False
    key_prefix: str = "hub:"
    # Turn on the keyspace notifications that wake the relay (CONFIG SET), if they are off.
    configure_keyspace_events: bool = True
    # "auto": start the embedded Redis when nothing is configured and nothing answers.
    # "always": always start it. "never": fail if Redis does not answer.
    embedded: str = "auto"
    embedded_dir: str = ".hub-data/redis"
    # A command (or pipeline) with no reply after this long fails and its connection is dropped: a Redis that
    # stalls or a network that silently drops packets turns into errors and reconnects instead of hanging the
    # node. The relay's subscription connection is pinged after this much silence and re-made without a pong.
    socket_timeout_s: float = 5.0

    @property
    def is_cluster(self) -> bool:
        """Whether the url names a Redis Cluster (by its scheme or the cluster setting)."""
        return self.cluster or self.url.startswith(("redis+cluster://", "rediss+cluster://"))


@dataclass(frozen=True)
class PostgresConfig:
    url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # Schema holding the hub's tables (search_path of every connection).
    schema: str = "public"
    # Statement timeout for queries answering users (history, search).
    statement_timeout_ms: int = 5000


@dataclass(frozen=True)
class ArchiverConfig:
    # A batch is written when it holds this many entries (larger batches amortise the round trips:
    # 500 reached 0.43 of raw COPY here, 2000 0.58, 5000 0.69)...
    batch_max_rows: int = 4000
    # ...or this many bytes of entries (bounds memory when entries are large)...
    batch_max_bytes: int = 8_388_608
    # ...or when its oldest entry has waited this long.
    batch_max_age_ms: int = 200
    # Entries read per room per XREADGROUP call.
    read_count: int = 1000
    # Entries pending this long with another (dead) archiver are claimed (XAUTOCLAIM).
    claim_idle_ms: int = 30_000
    # How often known rooms are checked for entries to claim, and re-read as a safety net.
    sweep_interval_s: float = 30.0
    # Larger entries are dead-lettered instead of stored.
    max_entry_bytes: int = 262_144
    # Entries stay in Redis at least this long after they were archived (resume window).
    hot_window_s: int = 3600
    # How often rooms that received entries are trimmed below what was archived.
    trim_interval_s: float = 60.0
    # Longest wait between retries while PostgreSQL is unreachable.
    max_retry_delay_s: float = 5.0
    # Consumer name in the archiver group; stable across restarts so a restarted archiver re-reads
    # what it had in flight. Empty: derived from the host name.
    name: str = ""
    # Message partitions (months) older than this are dropped by the monthly maintenance; 0 keeps all.
    retention_months: int = 0
    # How often archivers check for due maintenance (daily rollup, weekly report, monthly retention).
    maintenance_interval_s: float = 60.0
    # Test-only fault injection: exit abruptly after the first commit, before XACK.
    crash_after_commit: bool = False


@dataclass(frozen=True)
class AuthConfig:
    # Exactly one algorithm is accepted; tokens signed with any other (including "none") are refused.
    algorithm: str = "HS256"
    secret: str = ""
    public_key_file: str = ""
    audience: str = ""
    issuer: str = ""
    leeway_s: float = 0.0
    # Key ring for rotation: "KID:SECRET" (HS*) or "KID:/path/to/public.pem" (others); a token's kid header
    # picks its key, an unknown kid is refused. secret/public_key_file stay the key of tokens without kid.
    keys: tuple[str, ...] = ()
    # When set, a token's token_use claim (or, without one, its typ header) must equal this (case-insensitive).
    token_type: str = ""
    # A connection gets token_expiring this long before its token's exp; at exp it is closed (4502).
    expiry_warning_s: float = 60.0
    # Redis unreachable for the revocation check: true admits the token unchecked, false refuses (503).
    revocation_fail_open: bool = True


@dataclass(frozen=True)
class AuditConfig:
    # Write audit events (auth failures, denials, limits, revocations, admin actions) to hub:audit.
    enabled: bool = True
    # Entries kept in the stream (XADD MAXLEN ~); hubctl archiver copies them to PostgreSQL.
    stream_max_len: int = 1_000_000
    # Events a node holds while Redis is slow or away; beyond, events are dropped (and counted).
    queue_size: int = 10_000


@dataclass(frozen=True)
class RoomsConfig:
    max_name_length: int = 128
    # Roles allowed to publish into channel_* rooms; empty means every authenticated user.
    channel_publish_roles: tuple[str, ...] = ()
    # The admin role may read and write every room.
    admin_all_rooms: bool = True
    # A resume that would replay more than this is answered recovered: false (fetch history instead).
    max_replay: int = 1000
    # Most recent messages a fresh join may ask for with "history".
    max_join_history: int = 100
    # A connection that sends nothing for this long is shown as "away" until its next frame.
    away_after_idle_s: float = 300.0
    # A typing indicator that is never stopped ends by itself after this long.
    typing_ttl_ms: int = 6000
    # How long a client_msg_id is remembered for idempotent retries.
    idempotency_ttl_s: int = 86_400


@dataclass(frozen=True)
class RelayConfig:
    # Entries read per room per XREADGROUP call.
    read_count: int = 256
    # Streams named in one XREADGROUP call.
    streams_per_read: int = 256
    # Safety net: every room with local members is read this often even without a wake-up.
    sweep_interval_s: float = 30.0
    node_heartbeat_s: float = 5.0
    node_ttl_s: float = 15.0


@dataclass(frozen=True)
class EncryptionConfig:
    # The current key: new sensitive messages are sealed with it (base64 of 32 bytes, 64 hex digits, or a
    # passphrase; "KID:KEY" names its key id). Empty: encryption at rest is off.
    key: str = ""
    # Older keys still accepted for reading ("KID:KEY", ...), for rotation.
    keys: tuple[str, ...] = ()
    # Rooms whose every message is sealed (fnmatch patterns).
    sensitive_rooms: tuple[str, ...] = ("quote_*",)
    # Seal messages holding a Luhn-valid payment card number / a mod-97-valid IBAN.
    detect_cards: bool = True
    detect_ibans: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    json: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    archiver: ArchiverConfig = field(default_factory=ArchiverConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    rooms: RoomsConfig = field(default_factory=RoomsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where each value came from is not kept; whether Redis was configured explicitly is.
    redis_url_explicit: bool = False

    def validate(self) -> Config:
        _check(self.server.port >= 0 and self.server.port < 65536, "server.port", "must be 0..65535")
        _check(-1 <= self.server.api_port < 65536, "server.api_port", "must be -1 (off) or 0..65535")
        for name in ("max_frame_bytes", "max_content_bytes", "outbox_limit_bytes", "max_inflight_publishes",
                     "max_connections_per_ip", "message_rate_limit_per_min", "max_connections_per_user",
                     "connect_rate_limit_per_min", "connect_burst", "message_burst", "typing_rate_limit_per_min",
                     "typing_burst"):
            _check(getattr(self.server, name) > 0, f"server.{name}", "must be positive")
        _check(self.server.max_content_bytes <= self.server.max_frame_bytes, "server.max_content_bytes",
               "must not exceed server.max_frame_bytes")
        for name in ("ping_interval_s", "ping_timeout_s", "connection_timeout_s", "slow_close_grace_s",
                     "drain_timeout_s"):
            _check(getattr(self.server, name) > 0, f"server.{name}", "must be positive")
        _check(0 <= self.server.write_delay_ms <= 1000, "server.write_delay_ms", "must be 0..1000")
        _check(0 <= self.server.publish_linger_ms <= 1000, "server.publish_linger_ms", "must be 0..1000")
        _check(self.redis.url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://",
                                          "redis+sentinel://", "rediss+sentinel://")),
               "redis.url", "must start with redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, "
               "redis+sentinel:// or rediss+sentinel://")
        _check(not (self.redis.cluster and self.redis.url.startswith("unix://")), "redis.cluster",
               "a Redis Cluster is reached over TCP, not unix://")
        _check(not (self.redis.is_cluster and self.redis.embedded == "always"), "redis.embedded",
               "cannot be always with a Redis Cluster")
        _check(bool(self.redis.key_prefix) and "{" not in self.redis.key_prefix, "redis.key_prefix",
               "must be non-empty and contain no '{'")
        _check(self.redis.embedded in ("auto", "always", "never"), "redis.embedded",
               "must be auto, always or never")
        _check(self.auth.algorithm in ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256",
                                       "ES384", "ES512", "EdDSA"),
               "auth.algorithm", "must be one of HS256/384/512, RS256/384/512, ES256/384/512, EdDSA")
        _check(self.auth.leeway_s >= 0, "auth.leeway_s", "must not be negative")
        _check(self.auth.expiry_warning_s >= 0, "auth.expiry_warning_s", "must not be negative")
        from hub.auth import parse_key_ring

        parse_key_ring(self.auth)  # raises ConfigError naming auth.keys and the entry
        _check(self.audit.stream_max_len > 0, "audit.stream_max_len", "must be positive")
        _check(self.audit.queue_size > 0, "audit.queue_size", "must be positive")
        _check(16 <= self.rooms.max_name_length <= 1024, "rooms.max_name_length", "must be 16..1024")
        _check(self.rooms.max_replay > 0, "rooms.max_replay", "must be positive")
        _check(self.rooms.max_join_history >= 0, "rooms.max_join_history", "must not be negative")
        _check(self.rooms.away_after_idle_s > 0, "rooms.away_after_idle_s", "must be positive")
        _check(500 <= self.rooms.typing_ttl_ms <= 60_000, "rooms.typing_ttl_ms", "must be 500..60000")
        _check(self.rooms.idempotency_ttl_s > 0, "rooms.idempotency_ttl_s", "must be positive")
        _check(self.postgres.url.startswith(("postgresql://", "postgres://")), "postgres.url",
               "must start with postgresql://")
        _check(self.postgres.schema.isidentifier(), "postgres.schema", "must be a plain identifier")
        _check(self.postgres.statement_timeout_ms > 0, "postgres.statement_timeout_ms", "must be positive")
        for name in ("batch_max_rows", "batch_max_bytes", "batch_max_age_ms", "read_count", "claim_idle_ms",
                     "max_entry_bytes", "hot_window_s"):
            _check(getattr(self.archiver, name) > 0, f"archiver.{name}", "must be positive")
        _check(self.archiver.retention_months >= 0, "archiver.retention_months", "must not be negative")
        for name in ("sweep_interval_s", "trim_interval_s", "max_retry_delay_s", "maintenance_interval_s"):
            _check(getattr(self.archiver, name) > 0, f"archiver.{name}", "must be positive")
        from hub.crypto import SensitivityPolicy, load_keyring

        load_keyring(self.encryption.key, self.encryption.keys)  # raises ConfigError naming the key
        SensitivityPolicy(self.encryption.sensitive_rooms)
        _check(self.relay.read_count > 0, "relay.read_count", "must be positive")
        _check(self.relay.streams_per_read > 0, "relay.streams_per_read", "must be positive")
        _check(self.relay.sweep_interval_s > 0, "relay.sweep_interval_s", "must be positive")
        _check(0 < self.relay.node_heartbeat_s < self.relay.node_ttl_s, "relay.node_heartbeat_s",
               "must be positive and below relay.node_ttl_s")
        _check(self.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level",
               "must be DEBUG, INFO, WARNING or ERROR")
        return self

    def check_auth(self) -> Config:
        """The key material a node needs to verify tokens (not needed by grant/publish commands). With a
        key ring (auth.keys) the default key is optional: without it, tokens without kid are refused."""
        from hub.auth import check_key_material

        check_key_material(self.auth)  # raises ConfigError naming auth.keys and the key id
        default_key = self.auth.secret if self.auth.algorithm.startswith("HS") else self.auth.public_key_file
        if self.auth.keys and not default_key:
            return self
        if self.auth.algorithm.startswith("HS"):
            _check(len(self.auth.secret) >= 32, "auth.secret",
                   "must be set (JWT_SECRET) and at least 32 characters for HS* algorithms")
        else:
            _check(bool(self.auth.public_key_file), "auth.public_key_file",
                   f"must be set (JWT_PUBLIC_KEY_FILE) for {self.auth.algorithm}")
            _check(Path(self.auth.public_key_file).is_file(), "auth.public_key_file",
                   f"file not found: {self.auth.public_key_file}")
        return self


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {why}")


# The platform's historical environment names, mapped to dotted keys.
LEGACY_ENV: dict[str, str] = {
    "REDIS_URL": "redis.url",
    "DATABASE_URL": "postgres.url",
    "WEBSOCKET_ENCRYPTION_KEY": "encryption.key",
    "WEBSOCKET_MAX_CONNECTIONS_PER_IP": "server.max_connections_per_ip",
    "WEBSOCKET_MESSAGE_RATE_LIMIT": "server.message_rate_limit_per_min",
    "WEBSOCKET_CONNECTION_TIMEOUT": "server.connection_timeout_s",
    "JWT_SECRET": "auth.secret",
    "JWT_ALGORITHM": "auth.algorithm",
    "JWT_PUBLIC_KEY_FILE": "auth.public_key_file",
    "JWT_AUDIENCE": "auth.audience",
    "JWT_ISSUER": "auth.issuer",
}


def load_config(path: str | Path | None, environ: Mapping[str, str],
                overrides: Mapping[str, Any] | None = None, *, require_auth: bool = True) -> Config:
    """Build the configuration: defaults < YAML file < HUB_SECTION_KEY < legacy env names < overrides.

    ``overrides`` maps dotted keys to values (command-line flags such as ``--port``). With
    ``require_auth`` (the default), the JWT key material must be configured too.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {p}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
        for section, values in loaded.items():
            if section not in _SECTIONS:
                raise ConfigError(f"config {section}: unknown section (known: {', '.join(_SECTIONS)})")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config {section}: must be a mapping")
            raw.setdefault(section, {}).update(values)

    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            name = f"HUB_{section}_{f.name}".upper()
            if name in environ:
                raw.setdefault(section, {})[f.name] = environ[name]
    redis_url_explicit = "url" in raw.get("redis", {})
    for env_name, dotted in LEGACY_ENV.items():
        if env_name in environ and environ[env_name] != "":
            section, key = dotted.split(".")
            raw.setdefault(section, {})[key] = environ[env_name]
            if dotted == "redis.url":
                redis_url_explicit = True
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
        if dotted == "redis.url":
            redis_url_explicit = True

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        sections[section] = _build_section(section, cls, raw.get(section, {}))
    config = Config(**sections, redis_url_explicit=redis_url_explicit).validate()
    return config.check_auth() if require_auth else config


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "redis": RedisConfig,
    "postgres": PostgresConfig,
    "archiver": ArchiverConfig,
    "auth": AuthConfig,
    "audit": AuditConfig,
    "rooms": RoomsConfig,
    "relay": RelayConfig,
    "encryption": EncryptionConfig,
    "logging": LoggingConfig,
}


def _build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"config {section}.{key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Turn a YAML or environment value into the field's type, or name the key in the error."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config {key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {key}: expected a number, got {value!r}") from None
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"config {key}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = [str(v) for v in value]
        else:
            raise ConfigError(f"config {key}: expected a list, got {value!r}")
        return tuple(items)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional fields yet
        return value
    raise ConfigError(f"config {key}: unsupported type {hint!r}")  # pragma: no cover
