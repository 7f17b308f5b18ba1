"""The ``kefu`` command.

The engine's own sub-commands (``ask``, ``chat``, ``knowledge check``, ``bots``) live
here; ``serve``, ``agent``, ``train`` and ``eval`` arrive from the server and models
packages through the ``kefu.commands`` entry-point group, so this module imports
neither of them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Sequence

from .config import load_config
from .errors import KefuError, KnowledgeError
from .types import Turn

COMMAND_GROUP = "kefu.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu", description="kefu customer-service chat")
    parser.add_argument("--config", type=Path, help="config.toml (default: built-in defaults + KEFU_* variables)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ask = sub.add_parser("ask", help="ask a bot one question")
    ask.add_argument("--bot", required=True)
    ask.add_argument("--session", default="cli")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("text")
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="chat with a bot in the terminal")
    chat.add_argument("--bot", required=True)
    chat.add_argument("--session", default="chat")
    chat.add_argument("--json", action="store_true", help="print each turn as JSON")
    chat.set_defaults(func=cmd_chat)

    bots = sub.add_parser("bots", help="list the registered bots")
    bots.set_defaults(func=cmd_bots)

    knowledge = sub.add_parser("knowledge", help="knowledge-base tools")
    ksub = knowledge.add_subparsers(dest="knowledge_command", metavar="ACTION")
    ksub.required = True
    check = ksub.add_parser("check", help="validate knowledge files (file:line: message for each problem)")
    check.add_argument("paths", nargs="+", type=Path)
    check.set_defaults(func=cmd_knowledge_check)

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as exc:
            # e.g. `kefu train` without the [train] extra: the other commands still work.
            logging.getLogger("kefu").debug("commands %s unavailable: %s", ep.name, exc)
    return parser


def _engine(args: argparse.Namespace):
    from .testing import SyncEngine
    from .dialog import Engine

    config = load_config(args.config)
    config["engine"]["watch_knowledge"] = False
    config["engine"]["delays"] = False  # a terminal shows the answer at once
    return SyncEngine(Engine(config))


def _show(turn: Turn, as_json: bool) -> None:
    if as_json:
        print(json.dumps(turn.as_dict(), ensure_ascii=False))
        return
    print(turn.answer)
    extra = f"handoff: {turn.handoff.reason}" if turn.handoff else ""
    print(f"  [intent={turn.intent} confidence={turn.confidence:.2f} source={turn.source}"
          f"{' ' + extra if extra else ''}]")


def cmd_ask(args: argparse.Namespace) -> int:
    with _engine(args) as eng:
        _show(eng.ask(args.bot, args.text, session=args.session), args.json)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .errors import InputError

    with _engine(args) as eng:
        bot = eng.bot(args.bot)
        print(f"Chatting with {bot.name} (Ctrl-D or /quit to leave).")
        if bot.knowledge.greeting:
            print(bot.knowledge.greeting)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if not line.strip():
                continue
            try:
                turn = eng.ask(args.bot, line, session=args.session)
            except InputError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            _show(turn, args.json)


def cmd_bots(args: argparse.Namespace) -> int:
    with _engine(args) as eng:
        for name, bot in sorted(eng.bots.items()):
            model = "model" if bot.uses_model else "knowledge classifier"
            print(f"{name}\t{bot.spec.knowledge}\t{model}")
    return 0


def cmd_knowledge_check(args: argparse.Namespace) -> int:
    from .knowledge import load_knowledge

    failed = 0
    for path in args.paths:
        try:
            kn = load_knowledge(path)
        except KnowledgeError as exc:
            failed += 1
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            continue
        for warning in kn.warnings():
            print(warning, file=sys.stderr)
        print(f"{path}: ok (bot {kn.bot}, {len(kn.intents)} intents, {len(kn.faq)} FAQ entries)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KefuError as exc:
        print(f"kefu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
