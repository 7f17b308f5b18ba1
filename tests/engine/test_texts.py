"""System texts for visitors (engine/texts.py): built-in per language, overridable per bot
in the knowledge file's ``texts:`` section, read with ``Engine.text``."""
from __future__ import annotations

import string
from pathlib import Path

import pytest

from engine import KnowledgeError, UnknownBotError, load_knowledge
from engine.cli import main
from engine.knowledge import LANGUAGES, TOP_KEYS, parse_knowledge
from engine.texts import DEFAULTS, KEYS, PLACEHOLDERS, check

from .conftest import MINI

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "knowledge").glob("*.yaml"))

BASE = """\
bot: t
fallback: [sorry]
"""


def knowledge_of(text: str):
    return parse_knowledge(text, "kb.yaml")


def problems_of(text: str) -> list[str]:
    with pytest.raises(KnowledgeError) as err:
        parse_knowledge(text, "kb.yaml")
    return [str(p) for p in err.value.problems]


def names_in(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


# -- the built-in texts ----------------------------------------------------------------------


def test_every_language_of_the_knowledge_schema_has_built_in_texts_and_no_other():
    assert set(DEFAULTS) == set(LANGUAGES)


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_built_in_key_exists_in_every_language_with_the_same_placeholders(language):
    texts = DEFAULTS[language]
    assert list(texts) == list(KEYS)
    for key, template in texts.items():
        assert template.strip(), (language, key)
        assert names_in(template) == set(PLACEHOLDERS[key]), (language, key)
        assert check(key, template) == [], (language, key)


def test_the_documented_keys_are_exactly_the_built_in_keys():
    assert set(KEYS) == {"queued", "requeued", "offline", "closed_hours", "unavailable", "assigned",
                         "transferred", "closed", "bot_trouble", "an_agent"}
    assert PLACEHOLDERS["queued"] == PLACEHOLDERS["requeued"] == ("position",)
    assert PLACEHOLDERS["assigned"] == PLACEHOLDERS["transferred"] == ("agent",)
    assert all(PLACEHOLDERS[k] == () for k in KEYS if k not in ("queued", "requeued", "assigned", "transferred"))


def test_the_schema_doc_lists_every_key_and_its_built_in_texts():
    doc = (ROOT / "knowledge" / "README.md").read_text(encoding="utf-8")
    assert "| `texts` |" in doc
    for key in KEYS:
        assert f"| `{key}` |" in doc, key
        for language in LANGUAGES:
            assert DEFAULTS[language][key] in doc, (language, key)


def test_texts_is_a_known_top_level_key():
    assert "texts" in TOP_KEYS


# -- defaults by language ------------------------------------------------------------------


def test_an_english_bot_without_texts_gets_the_english_defaults():
    kn = knowledge_of(BASE)
    assert kn.texts == DEFAULTS["en"]
    assert kn.text("queued", position=3) == "Connecting you to a person. You are number 3 in the queue."
    assert kn.text("closed") == "The conversation was closed."


def test_a_chinese_bot_without_texts_gets_the_chinese_defaults():
    kn = knowledge_of(BASE + "language: zh\n")
    assert kn.texts == DEFAULTS["zh"]
    assert "3" in kn.text("queued", position=3)
    assert kn.text("an_agent") == DEFAULTS["zh"]["an_agent"]


def test_an_empty_texts_section_keeps_every_default():
    assert knowledge_of(BASE + "texts:\n").texts == DEFAULTS["en"]
    assert knowledge_of(BASE + "texts: {}\n").texts == DEFAULTS["en"]


def test_a_knowledge_object_built_in_code_has_every_text_of_its_language():
    from engine.knowledge import Knowledge

    assert Knowledge(bot="x", path=Path("x.yaml"), language="zh").texts == DEFAULTS["zh"]


# -- overrides -----------------------------------------------------------------------------


def test_a_yaml_override_replaces_that_text_and_the_other_keys_keep_the_defaults():
    kn = knowledge_of(BASE + "language: zh\ntexts:\n  queued: \"请稍等，您排第 {position} 位\"\n"
                             "  closed: 再见～\n")
    assert kn.text("queued", position=2) == "请稍等，您排第 2 位"
    assert kn.text("closed") == "再见～"
    assert kn.text("offline") == DEFAULTS["zh"]["offline"]
    assert set(kn.texts) == set(KEYS)


def test_placeholders_are_filled_and_extra_fields_are_ignored():
    kn = knowledge_of(BASE + "texts:\n  assigned: \"Hi, {agent} here. {{smile}}\"\n"
                             "  queued: \"Please hold, a person is coming.\"\n")
    assert kn.text("assigned", agent="Li") == "Hi, Li here. {smile}"
    assert kn.text("queued", position=4) == "Please hold, a person is coming."  # may leave it out
    assert kn.text("closed", agent="Li") == "The conversation was closed."
    assert kn.text("transferred", agent="{position}") == "{position} is taking over your conversation."


def test_engine_text_returns_the_bots_text_with_fields_filled(mini_engine, tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI.read_text() + "texts:\n  assigned: \"{agent} is with you now.\"\n", encoding="utf-8")
    eng = mini_engine(path=path)
    assert eng.text("mini", "assigned", agent="Sam") == "Sam is with you now."
    assert eng.text("mini", "queued", position=1) == "Connecting you to a person. You are number 1 in the queue."
    assert eng.text("mini", "transferred", agent=eng.text("mini", "an_agent")) == \
        "an agent is taking over your conversation."


def test_engine_text_for_an_unknown_bot_is_the_same_error_as_greeting(mini_engine):
    eng = mini_engine()
    with pytest.raises(UnknownBotError) as greeting_error:
        eng.greeting("nope")
    with pytest.raises(UnknownBotError) as text_error:
        eng.text("nope", "closed")
    assert str(text_error.value) == str(greeting_error.value)


def test_engine_text_for_an_unknown_key_is_a_key_error(mini_engine):
    with pytest.raises(KeyError):
        mini_engine().text("mini", "no_such_text")


def test_reloading_the_knowledge_file_changes_the_texts(mini_engine, tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI.read_text(), encoding="utf-8")
    eng = mini_engine(path=path)
    assert eng.text("mini", "closed") == "The conversation was closed."
    path.write_text(MINI.read_text() + "texts:\n  closed: Bye for now.\n", encoding="utf-8")
    assert eng.reload("mini") == {"mini": None}
    assert eng.text("mini", "closed") == "Bye for now."


# -- problems, each as file:line -------------------------------------------------------------


def test_an_unknown_texts_key_is_reported_with_its_line_and_the_known_keys():
    assert problems_of(BASE + "texts:\n  closed: bye\n  queud: hi\n") == [
        "kb.yaml:5: unknown key 'queud' in texts (expected one of: " + ", ".join(sorted(KEYS)) + ")"]


def test_texts_that_is_not_a_mapping_is_reported():
    assert problems_of(BASE + "texts: [queued]\n") == ["kb.yaml:3: texts must be a mapping"]


@pytest.mark.parametrize("value", ["''", "'   '", ""])
def test_an_empty_text_is_reported_at_its_line(value):
    assert problems_of(BASE + f"texts:\n  closed: {value}\n") == ["kb.yaml:4: texts.closed must not be empty"]


@pytest.mark.parametrize("value", ["5", "[a, b]", "{a: b}", "true"])
def test_a_text_that_is_not_a_string_is_reported_at_its_line(value):
    assert problems_of(BASE + f"texts:\n  closed: {value}\n") == ["kb.yaml:4: texts.closed must be text"]


def test_a_placeholder_the_key_does_not_take_is_reported_naming_it_and_the_allowed_ones():
    assert problems_of(BASE + "texts:\n  offline: x\n  queued: \"Hi {name}, you are {position}\"\n") == [
        "kb.yaml:5: texts.queued has placeholder {name}, which queued does not take (allowed: {position})"]
    assert problems_of(BASE + "texts:\n  closed: \"Bye {agent}\"\n") == [
        "kb.yaml:4: texts.closed has placeholder {agent}, which closed does not take (it takes no placeholders)"]


@pytest.mark.parametrize("template,placeholder", [
    ("You are {}", "{}"), ("You are {0}", "{0}"), ("You are {position!r}", "{position!r}"),
    ("You are {position:>3}", "{position:>3}"), ("You are {position.real}", "{position.real}"),
])
def test_positional_and_decorated_placeholders_are_reported(template, placeholder):
    found = problems_of(BASE + f"texts:\n  queued: \"{template}\"\n")
    assert len(found) == 1 and found[0].startswith(f"kb.yaml:4: texts.queued has placeholder {placeholder}")
    assert "{position}" in found[0]


@pytest.mark.parametrize("template", ["You are {position", "You are position}", "{ {position}"])
def test_a_malformed_template_is_reported_with_the_allowed_placeholders(template):
    found = problems_of(BASE + f"texts:\n  requeued: \"{template}\"\n")
    assert len(found) == 1
    assert found[0].startswith("kb.yaml:4: texts.requeued is not a valid template")
    assert "{{" in found[0] and "allowed: {position}" in found[0]


def test_every_bad_text_is_reported_not_just_the_first():
    found = problems_of(BASE + "texts:\n  queued: \"{who}\"\n  closed: ''\n  nope: x\n  assigned: \"{agent\"\n")
    assert sorted(p.split(":")[1] for p in found) == ["4", "5", "6", "7"]


def test_knowledge_check_reports_texts_problems_as_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "texts:\n  queued: \"{name}\"\n  gone: x\n", encoding="utf-8")
    assert main(["knowledge", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:4: texts.queued has placeholder {{name}}" in err
    assert f"{path}:5: unknown key 'gone' in texts" in err


# -- the shipped knowledge files ---------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_the_shipped_knowledge_files_load_and_have_every_text(path):
    kn = load_knowledge(path)
    assert set(kn.texts) == set(KEYS)
    for key in KEYS:
        fields = {name: "x" for name in PLACEHOLDERS[key]}
        assert kn.text(key, **fields).strip()


def test_the_shipped_knowledge_files_pass_knowledge_check(capsys):
    assert main(["knowledge", "check", *map(str, SHIPPED)]) == 0
    assert capsys.readouterr().err == ""
