"""The ``[server]`` section of config.toml: its defaults, and the secrets kept in the data dir.

Every key can be overridden by ``KEFU_SERVER_<KEY>`` (engine.config does that).  Each key is
documented in docs/operations.md and config.example.toml.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from engine import Config, ConfigError, load_config

SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "data_dir": "data",                 # SQLite file, generated secret key
    "database_url": "",                 # default: sqlite+aiosqlite:///<data_dir>/kefu.sqlite3
    "origins": [],                      # allowed Origin values for WebSocket upgrades; empty: same host only
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


def data_dir(settings: Mapping[str, Any]) -> Path:
    path = Path(settings["data_dir"] or "data").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url(settings: Mapping[str, Any]) -> str:
    if settings.get("database_url"):
        return str(settings["database_url"])
    return f"sqlite+aiosqlite:///{(data_dir(settings) / 'kefu.sqlite3').resolve()}"


def secret_key(settings: Mapping[str, Any]) -> bytes:
    """The configured secret, or one generated on first run into ``<data_dir>/secret.key`` (mode 0600)."""
    configured = settings.get("secret_key")
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
