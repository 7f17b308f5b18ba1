"""The `kefu` command: ask, chat, knowledge check, bots."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.cli import main

from .conftest import MINI


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_json_prints_one_object_with_the_documented_fields(capsys):
    code, out, _ = run(capsys, "ask", "--bot", "shop", "--json", "how much does delivery cost?")
    assert code == 0
    data = json.loads(out)
    assert {"intent", "confidence", "answer", "handoff", "source"} <= set(data)
    assert data["source"] in ("model", "keyword", "faq", "fuzzy", "plugin", "fallback")
    assert isinstance(data["handoff"], bool) and data["answer"]


def test_ask_prints_the_answer_and_the_turn_information(capsys):
    code, out, _ = run(capsys, "ask", "--bot", "shop", "I want to talk to a human")
    assert code == 0
    assert "handoff:" in out and "intent=" in out


def test_ask_an_unknown_bot_is_a_clear_error_and_exit_2(capsys):
    code, _, err = run(capsys, "ask", "--bot", "nope", "hi")
    assert code == 2 and "unknown bot 'nope'" in err and "shop" in err


def test_ask_empty_text_is_a_clear_error(capsys):
    code, _, err = run(capsys, "ask", "--bot", "shop", "  ")
    assert code == 2 and "text is empty" in err


def test_chat_keeps_context_across_turns():
    # The shop plugin asks for the order number, then reads it alone on the next turn.
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "chat", "--bot", "shop", "--json"],
                          input="where is my order\nKF-10023\n/quit\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line[line.index("{"):]) for line in proc.stdout.splitlines() if "{" in line]
    assert len(turns) == 2
    assert "KF-10023" in turns[1]["answer"] and turns[1]["intent"] == "order/status"


def test_knowledge_check_accepts_good_files(capsys):
    code, out, _ = run(capsys, "knowledge", "check", str(MINI))
    assert code == 0 and "ok (bot mini" in out


def test_knowledge_check_prints_file_line_message_and_fails(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bot: b\nfallback: [x]\nintents:\n  a:\n    answers: [1]\n    exmples: [typo]\n")
    code, _, err = run(capsys, "knowledge", "check", str(MINI), str(bad))
    assert code == 1
    assert any(line.startswith(f"{bad}:6: unknown key 'exmples'") for line in err.splitlines())


def test_the_shipped_knowledge_files_are_valid(capsys):
    from engine import paths

    files = sorted(str(p) for p in paths.knowledge_dir().glob("*.yaml"))
    assert files
    code, _, err = run(capsys, "knowledge", "check", *files)
    assert code == 0, err
    assert "warning" not in err, err


def test_knowledge_check_warns_of_an_faq_intent_nothing_defines(capsys, tmp_path):
    """Rule: an FAQ entry reporting an undefined intent (a likely typo) is a warning with
    file:line, not a failure: such names were free labels before the check existed."""
    kb = tmp_path / "kb.yaml"
    kb.write_text("bot: kb\nintents:\n  refund:\n    answers: [ok]\n"
                  "faq:\n  - q: where is my refund\n    a: on its way\n    intent: refnud\n"
                  "  - q: refund policy\n    a: 30 days\n    intent: refund\n")
    code, out, err = run(capsys, "knowledge", "check", str(kb))
    assert code == 0 and "ok (bot kb" in out
    assert err.splitlines() == [f"{kb}:6: warning: faq entry 'where is my refund' reports intent 'refnud', "
                                "which is not defined under intents"]


def test_bots_lists_the_demo_bots(capsys):
    code, out, _ = run(capsys, "bots")
    assert code == 0 and "shop\t" in out and "shop_zh\t" in out
