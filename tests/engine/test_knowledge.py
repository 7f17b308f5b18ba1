"""Knowledge files: validation with file:line, tries, fuzzy matching, type-ahead, reload."""
from __future__ import annotations

import pytest

from engine import KnowledgeError, load_knowledge
from engine.knowledge import parse_knowledge

from .conftest import MINI

BASE = """\
bot: t
fallback: [sorry]
intents:
  a:
    answers: [A]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(KnowledgeError) as err:
        parse_knowledge(text, "kb.yaml")
    return [str(p) for p in err.value.problems]


def test_invalid_yaml_reports_file_and_line():
    assert problems_of("bot: t\nintents:\n  a: [unclosed\n  b: 1\n")[0].startswith("kb.yaml:4: invalid YAML")


def test_duplicate_intent_reports_both_lines():
    text = BASE + "  a:\n    answers: [again]\n"
    assert problems_of(text) == ["kb.yaml:6: duplicate key 'a' (first at line 4)"]


def test_unknown_key_is_an_error_at_its_line():
    assert problems_of(BASE + "    answrs: [typo]\n") == [
        "kb.yaml:6: unknown key 'answrs' in intents.a (expected one of: answers, description, examples, "
        "handoff, keywords)"]


def test_every_problem_is_reported_not_just_the_first():
    text = ("bot: t\nlanguage: fr\nfallback: []\nintents:\n  Bad Name:\n    answers: [x]\n"
            "  b:\n    examples: [hi]\nhandoff:\n  intents: [nobody]\n  min_confidence: 3\n")
    found = problems_of(text)
    assert "kb.yaml:2: language must be one of en, zh" in found
    assert "kb.yaml:3: fallback must list at least one text" in found
    assert any(p.startswith("kb.yaml:5: intent name 'Bad Name'") for p in found)
    assert "kb.yaml:7: intent 'b' has no answers and no parent with answers" in found
    assert "kb.yaml:10: handoff intent 'nobody' is not defined under intents" in found
    assert "kb.yaml:11: handoff.min_confidence must be between 0 and 1" in found


def test_a_keyword_claimed_by_two_intents_is_an_error():
    text = BASE + "    keywords: [parcel]\n  b:\n    answers: [B]\n    keywords: [Parcel!]\n"
    assert problems_of(text) == ["kb.yaml:9: keyword 'Parcel!' is also a keyword of intent 'a'"]


def test_empty_and_non_mapping_files_are_errors(tmp_path):
    assert problems_of("") == ["kb.yaml: file is empty"]
    assert problems_of("- just\n- a list\n") == ["kb.yaml:1: the file must be a mapping"]
    missing = tmp_path / "nope.yaml"
    with pytest.raises(KnowledgeError, match="nope.yaml: file not found"):
        load_knowledge(missing)


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"bot: t\nfallback: [caf\xe9]\n")
    with pytest.raises(KnowledgeError, match=r"latin1.yaml:2: not valid UTF-8"):
        load_knowledge(path)


def test_child_intent_inherits_answers_from_nearest_ancestor():
    kn = load_knowledge(MINI)
    assert kn.answers_for("order/cancel") == ("Tell me your order number and I will look.",)
    assert kn.answers_for("order/status") == ("Order {order_id} is on its way.",)
    assert kn.answers_for("nothing/here") == ()


def test_keyword_hits_need_whole_words_and_the_longest_wins():
    kn = parse_knowledge(BASE + "    keywords: [track]\n  b:\n    answers: [B]\n    keywords: [track order]\n")
    assert kn.keyword_hit(kn.prepare("please track order 12")) == ("track order", "b")
    assert kn.keyword_hit(kn.prepare("Track it")) == ("track", "a")
    assert kn.keyword_hit(kn.prepare("racetrack")) is None


def test_chinese_keywords_match_inside_text_without_spaces():
    kn = parse_knowledge("bot: z\nlanguage: zh\nintents:\n  wuliu:\n    answers: [在路上]\n"
                         "    keywords: [物流]\nsynonyms:\n  物流: [快递]\n")
    assert kn.keyword_hit(kn.prepare("我的快递到哪了？")) == ("物流", "wuliu")


def test_full_width_forms_and_punctuation_normalise_to_the_same_text():
    kn = load_knowledge(MINI)
    assert kn.prepare("ＷＨＥＲＥ　is my ORDER？！") == kn.prepare("where is my order") == "where is my order"


def test_synonyms_rewrite_variants_to_the_canonical_word():
    kn = load_knowledge(MINI)
    assert kn.prepare("I want my Money Back!") == "i want my refund"
    assert kn.prepare("moneyback") == "moneyback"  # whole words only


def test_faq_exact_hit_by_question_or_alternative():
    kn = load_knowledge(MINI)
    assert kn.faq_exact(kn.prepare("what are your OPENING hours")).intent == "hours"
    assert kn.faq_exact(kn.prepare("When are you open?")).intent == "hours"


def test_fuzzy_faq_matching_tolerates_typos_and_reordering_but_not_unrelated_text():
    kn = load_knowledge(MINI)
    entry, score = kn.fuzzy_faq(kn.prepare("what are yuor openin hours"))
    assert entry.intent == "hours" and score >= 80
    entry, _ = kn.fuzzy_faq(kn.prepare("your phone number is what"))
    assert entry.intent == "phone"
    assert kn.fuzzy_faq(kn.prepare("do you sell bicycles")) is None


def test_type_ahead_suggests_faq_questions_by_prefix(mini_engine):
    eng = mini_engine()
    assert eng.suggest("mini", "What") == ["What is your phone number?", "What are your opening hours?"]
    assert eng.suggest("mini", "when are") == ["What are your opening hours?"]
    assert eng.suggest("mini", "zzz") == []
    assert eng.suggest("mini", "what", limit=1) == ["What is your phone number?"]


def test_reload_keeps_the_last_good_knowledge_live_and_reports_the_problem(mini_engine, tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI.read_text())
    eng = mini_engine(path=path)
    path.write_text(MINI.read_text().replace("Refunds take 5 days.", "Refunds take 3 days."))
    assert eng.reload("mini") == {"mini": None}
    assert eng.ask("mini", "i want a refund").answer == "Refunds take 3 days."
    path.write_text(MINI.read_text() + "intents: {}\n")  # a duplicate top-level key
    error = eng.reload("mini")["mini"]
    assert error is not None and f"{path}:" in str(error) and "duplicate key 'intents'" in str(error)
    assert eng.bot("mini").last_error is error
    assert eng.ask("mini", "i want a refund").answer == "Refunds take 3 days."


def test_a_changed_file_is_seen_by_the_watcher_check(mini_engine, tmp_path):
    import os

    path = tmp_path / "mini.yaml"
    path.write_text(MINI.read_text())
    eng = mini_engine(path=path)
    bot = eng.bot("mini")
    assert not bot.changed_on_disk()
    path.write_text(MINI.read_text().replace("Call 0800", "Ring 0800"))
    os.utime(path, ns=(1, 10**18))
    assert bot.changed_on_disk()


async def test_the_watch_task_reloads_a_changed_file(tmp_path):
    import asyncio
    import os

    from engine import Engine
    from engine.testing import testing_config

    from .conftest import MiniBot

    path = tmp_path / "mini.yaml"
    path.write_text(MINI.read_text())
    engine = await Engine(testing_config(watch_interval_s=0.01), plugins=[MiniBot(path)],
                          load_entrypoints=False).start()
    reloaded = asyncio.Event()
    bot = engine.bot("mini")
    original = bot.reload

    def spy():
        result = original()
        reloaded.set()
        return result

    bot.reload = spy
    engine.watch()
    path.write_text(MINI.read_text().replace("Refunds take 5 days.", "Refunds take 1 day."))
    os.utime(path, ns=(1, 10**18))
    await asyncio.wait_for(reloaded.wait(), 5)
    assert (await engine.handle("mini", "i want a refund")).answer == "Refunds take 1 day."
    await engine.close()


def test_latin_keywords_need_latin_word_boundaries_but_chinese_neighbours_are_boundaries():
    kn = parse_knowledge("bot: z\nlanguage: zh\nintents:\n  a:\n    answers: [x]\n"
                         "    keywords: [ems, shipping fee]\n")
    assert kn.keyword_hit(kn.prepare("能发EMS吗？")) == ("ems", "a")
    assert kn.keyword_hit(kn.prepare("shipping fee多少")) == ("shipping fee", "a")
    assert kn.keyword_hit(kn.prepare("systems")) is None
    assert kn.keyword_hit(kn.prepare("emsx")) is None


def test_punctuation_between_chinese_characters_leaves_no_space():
    kn = parse_knowledge("bot: z\nlanguage: zh\nintents:\n  a:\n    answers: [x]\n")
    assert kn.prepare("退款，什么时候到账？") == kn.prepare("退款什么时候到账") == "退款什么时候到账"
    assert kn.prepare("app 登录 不了") == "app 登录不了"
