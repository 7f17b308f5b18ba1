"""The ``[server]`` section of config.toml: its defaults, the typed :class:`Settings` read from
it once at start-up, and the secrets kept in the data dir.

Every key can be overridden by ``KEFU_SERVER_<KEY>`` (engine.config does that).  Each key is
documented in docs/operations.md and config.example.toml.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engine import Config, ConfigError, load_config

SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "data_dir": "data",                 # SQLite file, generated secret key
    "database_url": "",                 # default: sqlite+aiosqlite:///<data_dir>/kefu.sqlite3
    "origins": [],                      # allowed Origin values for WebSocket upgrades; empty: same host only
    "public_urls": [],                  # this server's own origins (https://chat.example.com); set: only these
                                        # and `origins` may open sockets (the Host header is not trusted)
    "allow_no_origin": True,            # non-browser clients send no Origin header
    "proxies_count": 0,                 # trusted reverse proxies in front (for the client IP)
    "secret_key": "",                   # HMAC key for tokens; default: generated into <data_dir>/secret.key
    "identity_secret": "",              # shared with the host site for signed visitor identities; empty: off
    "identity_max_age_s": 600,          # accepted age of a signed identity's timestamp (0: no window)
    "agent_token_ttl_s": 43200,         # 12 h
    "visitor_token_ttl_s": 2592000,     # 30 days
    "default_bot": "",                  # bot for new conversations when the client names none; "": the first bot
    "max_frame_bytes": 65536,           # larger frames close with 1009
    "max_text_chars": 4000,             # longer messages get error text_too_long
    "max_client_id_chars": 64,
    "max_errors": 10,                   # protocol errors before the connection is closed (4009)
    "rate_per_s": 5.0,                  # messages (and other frames) per second per connection, sustained
    "rate_burst": 20,                   # token-bucket size
    "new_conversations_per_ip_per_min": 20,
    "max_connections_per_ip": 200,      # open WebSockets per client IP (429 on the upgrade); 0: no cap
    "login_failures_per_ip_per_min": 10,
    "login_failures_per_account_per_min": 10,   # failed logins for one username per minute, from anywhere
    "send_queue_frames": 256,           # frames waiting for a slow client before it is closed (4008)
    "resume_max_messages": 1000,        # more missed than this: "resync" (not recovered), reload over REST
    "tick_s": 1.0,                      # timing-wheel resolution (heartbeats, auth deadline, router tick)
    "heartbeat_s": 20.0,                # ping a connection silent this long
    "heartbeat_timeout_s": 20.0,        # ... and close it if still silent this much later (4000)
    "auth_timeout_s": 10.0,             # a socket must send hello this soon (4001)
    "bot_timeout_s": 10.0,              # a bot turn longer than this hands the visitor to a person
    "grace_s": 60.0,                    # an agent who disconnects keeps conversations this long
    "business_hours": "",               # "mon-fri 09:00-18:00; sat 10:00-14:00" or a table {mon = "09:00-18:00"}; "": always open
    "timezone": "UTC",
    "agent_capacity": 5,                # default capacity for `kefu agent add`
    "bot_teams": {},                    # table bot -> team owning its conversations; unlisted bots: "default"
    # -- several workers and nodes (docs/operations.md, "Scaling out")
    "workers": 1,                       # worker processes on this machine; more than 1 needs redis_url
    "redis_url": "",                    # redis://host:6379/0: shared state, fan-out between workers and nodes
    "redis_prefix": "kefu:",            # every Redis key starts with this (several deployments on one Redis)
    "node_id": "",                      # this machine's name among the nodes; "": hostname:port
    "presence_ttl_s": 10.0,             # a worker that stops refreshing its presence this long counts as dead
    "metrics_push_s": 5.0,              # with Redis: how often each worker stores its /metrics snapshot there
    "token_check_s": 5.0,               # how often live agent sockets are checked for a revoked or expired token
    "metrics_token": "",                # set: /metrics needs "Authorization: Bearer <metrics_token>"; "": open
    "visitor_sessions_per_ip_per_min": 60,   # POST /api/v1/visitor/session per client IP per minute
    "retention_days": 0.0,              # closed conversations older than this are deleted (hourly); 0: kept
}


def load_server_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """config.toml (optional) + ``KEFU_*`` variables over the engine's and the server's defaults."""
    return load_config(path, env, defaults={"server": SERVER_DEFAULTS})


def server_settings(config: Config) -> dict[str, Any]:
    """The [server] section, filled with defaults for keys a caller's Config lacks."""
    if "server" not in config:
        raise ConfigError("the config has no [server] section; build it with server.config.load_server_config")
    merged = dict(SERVER_DEFAULTS)
    merged.update(config["server"])
    return merged


@dataclass(frozen=True)
class Settings:
    """The ``[server]`` section, typed and checked once (:meth:`from_config`); the server reads
    attributes, never string keys.  Each field is a key of :data:`SERVER_DEFAULTS`."""

    host: str
    port: int
    data_dir: str
    database_url: str
    origins: tuple[str, ...]
    public_urls: tuple[str, ...]
    allow_no_origin: bool
    proxies_count: int
    secret_key: str
    identity_secret: str
    identity_max_age_s: float
    agent_token_ttl_s: float
    visitor_token_ttl_s: float
    default_bot: str
    max_frame_bytes: int
    max_text_chars: int
    max_client_id_chars: int
    max_errors: int
    rate_per_s: float
    rate_burst: float
    new_conversations_per_ip_per_min: int
    max_connections_per_ip: int
    login_failures_per_ip_per_min: int
    login_failures_per_account_per_min: int
    send_queue_frames: int
    resume_max_messages: int
    tick_s: float
    heartbeat_s: float
    heartbeat_timeout_s: float
    auth_timeout_s: float
    bot_timeout_s: float
    grace_s: float
    business_hours: Any            # a string or a table: server.routing.hours reads it
    timezone: str
    agent_capacity: int
    bot_teams: Mapping[str, str]
    workers: int
    redis_url: str
    redis_prefix: str
    node_id: str
    presence_ttl_s: float
    metrics_push_s: float
    token_check_s: float
    metrics_token: str
    visitor_sessions_per_ip_per_min: int
    retention_days: float

    @classmethod
    def from_config(cls, config: Config) -> "Settings":
        """Every key converted to its field's type; a value that is not is a ConfigError
        naming ``server.<key>``."""
        raw = server_settings(config)
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown [server] keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {f.name: _typed(f.name, raw[f.name], hints[f.name]) for f in dataclasses.fields(cls)}
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.workers < 1:
            raise ConfigError("server.workers must be at least 1")
        if self.workers > 1 and not self.redis_url:
            raise ConfigError(f"server.workers = {self.workers} needs server.redis_url (KEFU_SERVER_REDIS_URL): "
                              "the workers share routing, fan-out and limits through Redis")
        if min(self.presence_ttl_s, self.tick_s, self.metrics_push_s, self.token_check_s) <= 0:
            raise ConfigError("server.presence_ttl_s, tick_s, metrics_push_s and token_check_s must be positive")

    @property
    def shared(self) -> bool:
        """State is shared through Redis (several workers or nodes) rather than in process."""
        return bool(self.redis_url)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _typed(key: str, value: Any, kind: Any) -> Any:
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            if kind is int and float(value) != int(value):
                raise TypeError
            return kind(value)
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == tuple[str, ...]:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind == Mapping[str, str]:
            return bot_teams(value)
    except (TypeError, ValueError):
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a list of strings")
        raise ConfigError(f"server.{key} must be {want}, not {value!r}") from None
    return value


def bot_teams(value: Any) -> Mapping[str, str]:
    """``[server] bot_teams``: a table bot -> team (a conversation belongs to its bot's team;
    a bot not listed to "default")."""
    if not value:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise ConfigError('server.bot_teams must be a table of bot = "team" strings')
    return {k: v.strip() for k, v in value.items()}


def _get(settings: Settings | Mapping[str, Any], key: str) -> Any:
    return getattr(settings, key) if isinstance(settings, Settings) else settings.get(key)


def data_dir(settings: Settings | Mapping[str, Any]) -> Path:
    """The data folder, created readable by this user only (0700): it holds every transcript
    and the password hashes."""
    path = Path(_get(settings, "data_dir") or "data").expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def database_url(settings: Settings | Mapping[str, Any]) -> str:
    """``server.database_url``, or SQLite in the data folder, its file created 0600 (SQLite
    gives its -wal and -shm files the same mode)."""
    if _get(settings, "database_url"):
        return str(_get(settings, "database_url"))
    path = (data_dir(settings) / "kefu.sqlite3").resolve()
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    return f"sqlite+aiosqlite:///{path}"


def secret_key(settings: Settings | Mapping[str, Any]) -> bytes:
    """The configured secret, or one generated on first run into ``<data_dir>/secret.key`` (mode 0600)."""
    configured = _get(settings, "secret_key")
    if configured:
        if len(str(configured)) < 16:
            raise ConfigError("server.secret_key must be at least 16 characters")
        return str(configured).encode()
    path = data_dir(settings) / "secret.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_bytes().strip()
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return key
