"""``kefu serve`` and ``kefu agent ...``: loaded by engine.cli through the ``kefu.commands`` group."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from pathlib import Path
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the chat server (WebSockets, REST, pages)",
                                  description="Run the kefu chat server. Settings: config.toml [server] "
                                              "and KEFU_SERVER_* variables; these flags win over both.")
    serve.add_argument("--host", help="address to listen on (server.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (server.port, default 8000)")
    serve.add_argument("--data-dir", type=Path, help="SQLite file and generated secret (server.data_dir, default ./data)")
    serve.add_argument("--workers", type=int, help="worker processes (server.workers, default 1; more than 1 "
                                                   "needs server.redis_url)")
    # also after the command (``kefu serve --config FILE``); SUPPRESS keeps ``kefu --config FILE serve``
    serve.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config.toml (as kefu --config)")
    serve.set_defaults(func=cmd_serve)

    agent = subparsers.add_parser("agent", help="manage agent accounts")
    asub = agent.add_subparsers(dest="agent_command", metavar="ACTION")
    asub.required = True
    add = asub.add_parser("add", help="create an agent account")
    add.add_argument("username")
    add.add_argument("--display-name", default="", help="name shown to visitors (default: the username)")
    add.add_argument("--capacity", type=int, help="conversations at once (default server.agent_capacity, 5)")
    add.add_argument("--team", default="default")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (else prompted)")
    add.add_argument("--data-dir", type=Path, help="as for serve")
    add.set_defaults(func=cmd_agent_add)
    pw = asub.add_parser("password", help="set an agent's password (revokes their tokens; a running server closes their open sockets within server.token_check_s)")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true")
    pw.add_argument("--data-dir", type=Path)
    pw.set_defaults(func=cmd_agent_password)
    ls = asub.add_parser("list", help="list agent accounts")
    ls.add_argument("--data-dir", type=Path)
    ls.set_defaults(func=cmd_agent_list)

    visitor = subparsers.add_parser("visitor", help="a visitor's data: export or erase (privacy requests)")
    vsub = visitor.add_subparsers(dest="visitor_command", metavar="ACTION")
    vsub.required = True
    ex = vsub.add_parser("export", help="print every conversation and message of a visitor as JSON")
    ex.add_argument("visitor_id")
    ex.add_argument("--data-dir", type=Path)
    ex.set_defaults(func=cmd_visitor_export)
    er = vsub.add_parser("erase", help="delete a visitor's closed conversations and their messages")
    er.add_argument("visitor_id")
    er.add_argument("--data-dir", type=Path)
    er.set_defaults(func=cmd_visitor_erase)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [server] settings given as flags (they win over the file and the environment)."""
    flags = {"host": "host", "port": "port", "data_dir": "data_dir", "workers": "workers"}
    out: dict[str, Any] = {}
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None and value != "":
            out[key] = str(value) if isinstance(value, Path) else value
    return out


def _config(args: argparse.Namespace) -> Any:
    return _load_config(getattr(args, "config", None), _overrides(args))


def _load_config(path: Path | None, overrides: dict[str, Any]) -> Any:
    from .config import load_server_config

    config = load_server_config(path)
    config["server"].update(overrides)
    return config


def worker_app(path: Path | None, overrides: dict[str, Any], config: Any = None) -> Any:
    """The app of one worker process: with ``--workers N`` Sanic starts N processes, and each
    builds its own app here from the same file, environment and flags (nothing is opened until
    the worker's ``before_server_start``); one process passes the ``config`` it has read."""
    from .app import create_app

    logging.getLogger("kefu").setLevel(logging.INFO)
    return create_app(config if config is not None else _load_config(path, overrides))


def cmd_serve(args: argparse.Namespace) -> int:
    from functools import partial

    from .config import Settings

    path, overrides = getattr(args, "config", None), _overrides(args)
    config = _load_config(path, overrides)
    s = Settings.from_config(config)          # a bad setting (workers > 1 without Redis...) fails here
    if s.shared:
        # here, once, so that a Redis that does not answer is one clear error and exit status,
        # not a traceback in each worker and a process manager killing the rest
        from .redis_client import open_checked

        async def check() -> None:
            await (await open_checked(s.redis_url)).aclose()
        asyncio.run(check())
    where = f"http://{s.host}:{s.port}"
    if s.workers == 1:
        app = worker_app(path, overrides, config)      # (the config read above: no second read)
        print(f"kefu: serving on {where} (data in {s.data_dir})", file=sys.stderr, flush=True)
        app.run(host=s.host, port=s.port, single_process=True, access_log=False, motd=False)
        return 0
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    loader = AppLoader(factory=partial(worker_app, path, overrides))
    app = loader.load()
    app.prepare(host=s.host, port=s.port, workers=s.workers, access_log=False, motd=False)
    print(f"kefu: serving on {where} with {s.workers} workers sharing Redis (data in {s.data_dir})",
          file=sys.stderr, flush=True)
    Sanic.serve(primary=app, app_loader=loader)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("kefu: passwords differ")
    if len(password) < 8:
        raise SystemExit("kefu: a password needs at least 8 characters")
    return password


def cmd_visitor_export(args: argparse.Namespace) -> int:
    import json

    from .views import conversation_dict

    async def export(storage: Any) -> dict[str, Any]:
        out = []
        before = None
        while True:                      # newest first, in pages
            page = await storage.list_conversations(visitor_id=args.visitor_id, limit=500, before=before)
            for conv in page:
                messages, after = [], 0
                while True:
                    batch = await storage.messages(conv.id, after_seq=after, limit=500)
                    messages += [m.as_dict() for m in batch]
                    if len(batch) < 500:
                        break
                    after = batch[-1].seq
                out.append({**conversation_dict(conv), "messages": messages})
            if len(page) < 500:
                return {"visitor": args.visitor_id, "conversations": out}
            before = page[-1].created_at

    data = asyncio.run(_with_storage(_config(args), export))
    _audit_log("export", args.visitor_id, conversations=len(data["conversations"]))
    print(json.dumps(data, ensure_ascii=False, indent=1))
    return 0


def cmd_visitor_erase(args: argparse.Namespace) -> int:
    from .storage.base import CLOSED

    async def erase(storage: Any) -> tuple[int, int]:
        deleted = await storage.delete_closed_conversations(visitor_id=args.visitor_id)
        left = [c for c in await storage.list_conversations(visitor_id=args.visitor_id, limit=500)
                if c.state != CLOSED]
        return deleted, len(left)

    deleted, left = asyncio.run(_with_storage(_config(args), erase))
    _audit_log("erase", args.visitor_id, conversations=deleted, open_left=left)
    print(f"visitor {args.visitor_id}: {deleted} closed conversation(s) deleted with their messages"
          + (f"; {left} open conversation(s) kept: close them in the console, then erase again" if left else ""))
    return 0


def _audit_log(action: str, visitor_id: str, **detail: Any) -> None:
    """Privacy requests are recorded (the log line names the action, the visitor and counts)."""
    import getpass as _getpass

    extra = " ".join(f"{k}={v}" for k, v in detail.items())
    # warning: audit records pass every log level but "silent", as server/audit.py's do
    logging.getLogger("kefu.audit").warning("audit: visitor %s by %s: visitor=%s %s", action,
                                            _getpass.getuser(), visitor_id, extra)


async def _with_storage(config: Any, fn: Any) -> Any:
    from .config import database_url, server_settings
    from .storage import open_storage

    storage = await open_storage(database_url(server_settings(config)))
    try:
        return await fn(storage)
    finally:
        await storage.close()


def cmd_agent_add(args: argparse.Namespace) -> int:
    from .auth import hash_password
    from .storage import DuplicateKey

    config = _config(args)
    capacity = args.capacity if args.capacity is not None else int(config["server"]["agent_capacity"])
    password_hash = hash_password(_read_password(args))

    async def add(storage: Any) -> Any:
        return await storage.add_agent(args.username, password_hash, display_name=args.display_name or args.username,
                                       capacity=capacity, team=args.team)
    try:
        agent = asyncio.run(_with_storage(config, add))
    except DuplicateKey as exc:
        print(f"kefu: {exc}", file=sys.stderr)
        return 1
    print(f"agent {agent.username} created (id {agent.id}, capacity {agent.capacity})")
    return 0


def cmd_agent_password(args: argparse.Namespace) -> int:
    from .auth import hash_password

    config = _config(args)
    password_hash = hash_password(_read_password(args))

    async def change(storage: Any) -> Any:
        agent = await storage.get_agent(username=args.username)
        return agent and await storage.update_agent(agent.id, password_hash=password_hash)
    if not asyncio.run(_with_storage(config, change)):
        print(f"kefu: no agent {args.username!r}", file=sys.stderr)
        return 1
    print(f"password of {args.username} changed; older tokens are revoked")
    return 0


def cmd_agent_list(args: argparse.Namespace) -> int:
    config = _config(args)
    agents = asyncio.run(_with_storage(config, lambda storage: storage.list_agents()))
    for a in agents:
        print(f"{a.username}\t{a.display_name}\tcapacity={a.capacity}\tteam={a.team}\t{a.id}")
    return 0
