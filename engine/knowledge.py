"""A bot's knowledge base: one YAML file (schema in knowledge/README.md) loaded into tries.

- ``intents``: a pygtrie ``StringTrie`` keyed by hierarchical name, so ``order/status``
  inherits answers from ``order`` by walking its prefixes.
- ``questions``: a ``CharTrie`` of normalised FAQ questions, for exact hits and type-ahead.
- ``keywords``: a ``CharTrie`` of normalised keywords, scanned at each word start (each
  character in Chinese) for the longest keyword inside a text.
- fuzzy FAQ matching with rapidfuzz.

Loading validates everything and reports every problem as ``file:line: message``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pygtrie
from rapidfuzz import fuzz, process

from . import texts as system_texts
from .errors import KnowledgeError, Problem
from .normalize import has_cjk, is_latin_word_char, normalize, replace_phrases
from .yaml_lines import Lines, load_yaml_with_lines

LANGUAGES = ("en", "zh")
INTENT_NAME = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)*$")
TOP_KEYS = {"bot", "language", "greeting", "fallback", "handoff", "delay", "synonyms", "intents", "faq", "texts"}
INTENT_KEYS = {"examples", "answers", "keywords", "handoff", "description"}
FAQ_KEYS = {"q", "a", "alt", "intent"}
HANDOFF_KEYS = {"min_confidence", "max_misunderstood", "intents", "phrases"}
DELAY_KEYS = {"min_ms", "max_ms", "per_char_ms"}
#: Largest knowledge file accepted: a knowledge base is edited by hand, and a runaway
#: generated file should fail loudly rather than eat memory.
MAX_FILE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Intent:
    name: str
    examples: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    handoff: bool = False
    line: int | None = None


@dataclass(frozen=True)
class FaqEntry:
    question: str
    answer: str
    alternatives: tuple[str, ...] = ()
    intent: str = "faq"
    line: int | None = None


@dataclass(frozen=True)
class HandoffRules:
    min_confidence: float = 0.5
    max_misunderstood: int = 2
    intents: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()

    def understood(self, classification: Any) -> bool:
        """A turn is understood when its best guess is in scope (the classifier's
        out-of-scope threshold) and at least ``min_confidence``."""
        return bool(classification.in_scope and classification.confidence >= self.min_confidence)


@dataclass(frozen=True)
class DelaySettings:
    min_ms: float = 150.0
    max_ms: float = 300.0
    per_char_ms: float = 0.0


@dataclass
class Knowledge:
    bot: str
    path: Path
    language: str = "en"
    greeting: str = ""
    fallback: tuple[str, ...] = ("Sorry, I did not understand that. Could you rephrase it?",)
    handoff: HandoffRules = field(default_factory=HandoffRules)
    delay: DelaySettings = field(default_factory=DelaySettings)
    synonyms: dict[str, str] = field(default_factory=dict)  # normalised variant -> canonical
    intents: pygtrie.StringTrie = field(default_factory=lambda: pygtrie.StringTrie(separator="/"))
    faq: list[FaqEntry] = field(default_factory=list)
    questions: pygtrie.CharTrie = field(default_factory=pygtrie.CharTrie)  # normalised q -> faq index
    keywords: pygtrie.CharTrie = field(default_factory=pygtrie.CharTrie)  # normalised kw -> intent
    handoff_phrases: tuple[str, ...] = ()
    #: System texts (engine/texts.py) by key: the file's ``texts:`` over the built-in
    #: texts of ``language``, so every key is present.
    texts: dict[str, str] = field(default_factory=dict)
    _fuzzy_keys: list[str] = field(default_factory=list)
    _fuzzy_index: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = {**system_texts.builtin(self.language), **self.texts}

    def text(self, key: str, **fields: Any) -> str:
        """The system text ``key`` with its placeholders filled; KeyError for an unknown key."""
        return self.texts[key].format(**fields)

    # -- matching -------------------------------------------------------------------

    @property
    def cjk(self) -> bool:
        return self.language == "zh"

    def prepare(self, text: str) -> str:
        """Normalise text and apply synonyms: the form every matcher compares."""
        return replace_phrases(normalize(text), self.synonyms, self.cjk)

    def answers_for(self, intent: str) -> tuple[str, ...]:
        """The intent's answers, or those of its nearest ancestor that has some."""
        if not self.intents.has_key(intent):
            return ()
        best: tuple[str, ...] = ()
        for _, node in self.intents.prefixes(intent):
            if node.answers:
                best = node.answers
        return best

    def intent(self, name: str) -> Intent | None:
        return self.intents.get(name)

    def warnings(self) -> list[Problem]:
        """Legal but probably unintended: an FAQ entry reporting an intent that no intent
        defines (reports, handoff rules and plugins would count it under a name nothing else
        uses; FAQ intents were free labels before this check, so it warns, not fails)."""
        return [Problem(self.path, e.line, f"warning: faq entry {e.question!r} reports intent {e.intent!r}, "
                                           "which is not defined under intents")
                for e in self.faq if e.intent != "faq" and e.intent not in self.intents]

    def intent_names(self) -> list[str]:
        return list(self.intents.keys())

    def examples(self) -> list[tuple[str, str]]:
        """(text, intent) pairs of every intent's examples: the classifier's training data.
        FAQ questions are not included; they are matched exactly and fuzzily instead."""
        return [(ex, it.name) for it in self.intents.values() for ex in it.examples]

    def faq_exact(self, prepared: str) -> FaqEntry | None:
        index = self.questions.get(prepared)
        return self.faq[index] if index is not None else None

    def keyword_hit(self, prepared: str) -> tuple[str, str] | None:
        """The longest keyword inside the text, as (keyword, intent).

        Latin keywords must start and end on word boundaries; Chinese ones may sit
        anywhere, since Chinese has no word spaces.
        """
        if not self.keywords or not prepared:
            return None
        best: tuple[str, str] | None = None
        for i in range(len(prepared)):
            # A Latin keyword must not start inside a Latin word ("ems" in "systems");
            # a CJK character or a space next to it is a boundary ("能发ems吗").
            latin_inside = i > 0 and is_latin_word_char(prepared[i - 1])
            for key, intent in self.keywords.prefixes(prepared[i:]):
                if not has_cjk(key):
                    end = i + len(key)
                    if latin_inside or (end < len(prepared) and is_latin_word_char(prepared[end])):
                        continue
                if best is None or len(key) > len(best[0]):
                    best = (key, intent)
        return best

    def fuzzy_faq(self, prepared: str, cutoff: float = 80.0) -> tuple[FaqEntry, float] | None:
        """The FAQ entry whose question (or alternative) is most similar, with a 0-100 score."""
        if not self._fuzzy_keys or not prepared:
            return None
        scorer = fuzz.ratio if self.cjk else fuzz.token_sort_ratio
        hit = process.extractOne(prepared, self._fuzzy_keys, scorer=scorer, score_cutoff=cutoff)
        if hit is None:
            return None
        _, score, index = hit
        return self.faq[self._fuzzy_index[index]], float(score)

    def asks_for_person(self, prepared: str) -> str | None:
        for phrase in self.handoff_phrases:
            if has_cjk(phrase) or self.cjk:
                if phrase in prepared:
                    return phrase
            elif re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", prepared):
                return phrase
        return None

    def suggest(self, prefix: str, limit: int = 5) -> list[str]:
        """Type-ahead: FAQ questions whose normalised form starts with the prefix."""
        key = self.prepare(prefix)
        if not key or not self.questions.has_node(key):
            return []
        seen: list[str] = []
        for _, index in sorted(self.questions.items(prefix=key), key=lambda kv: (len(kv[0]), kv[0])):
            question = self.faq[index].question
            if question not in seen:
                seen.append(question)
            if len(seen) >= limit:
                break
        return seen

    def pick(self, texts: tuple[str, ...], rng: random.Random | None = None) -> str:
        return (rng or random).choice(texts) if texts else ""


# -- loading -----------------------------------------------------------------------------


def load_knowledge(path: str | Path) -> Knowledge:
    """Load and validate one knowledge file; raises KnowledgeError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KnowledgeError([Problem(path, None, "file not found")]) from None
    except OSError as exc:
        raise KnowledgeError([Problem(path, None, f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise KnowledgeError([Problem(path, None, f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise KnowledgeError([Problem(path, line, "not valid UTF-8")]) from None
    return parse_knowledge(text, path)


def parse_knowledge(text: str, path: str | Path = "<string>") -> Knowledge:
    data, lines = load_yaml_with_lines(text, path)
    return _Builder(Path(path), lines).build(data)


class _Builder:
    def __init__(self, path: Path, lines: Lines) -> None:
        self.path, self.lines = path, lines
        self.problems: list[Problem] = []

    def problem(self, at: tuple, message: str) -> None:
        line = None
        while at and line is None:
            line = self.lines.get(at)
            at = at[:-1]
        self.problems.append(Problem(self.path, line if line is not None else self.lines.get(()), message))

    def where(self, at: tuple) -> str:
        return ".".join(str(p) for p in at)

    def text(self, value: Any, at: tuple, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.problem(at, f"{self.where(at)} is required")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.problem(at, f"{self.where(at)} must be text")
            return None
        value = str(value)
        if required and not value.strip():
            self.problem(at, f"{self.where(at)} must not be empty")
            return None
        return value

    def texts(self, value: Any, at: tuple) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            self.problem(at, f"{self.where(at)} must be a list of texts")
            return ()
        out = []
        for i, item in enumerate(value):
            t = self.text(item, at + (i,))
            if t is not None and t.strip():
                out.append(t)
            elif t is not None:
                self.problem(at + (i,), f"{self.where(at)} has an empty entry")
        return tuple(out)

    def number(self, value: Any, at: tuple, default: float, lo: float, hi: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(at, f"{self.where(at)} must be a number")
            return default
        if not lo <= value <= hi:
            self.problem(at, f"{self.where(at)} must be between {lo:g} and {hi:g}")
            return default
        return float(value)

    def mapping(self, value: Any, at: tuple, allowed: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(at, f"{self.where(at) or 'the file'} must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(at + (key,), f"unknown key {key!r} in {self.where(at) or 'the file'} "
                                          f"(expected one of: {', '.join(sorted(allowed))})")
        return value

    def build(self, data: Any) -> Knowledge:
        if data is None:
            raise KnowledgeError([Problem(self.path, None, "file is empty")])
        top = self.mapping(data, (), TOP_KEYS)
        if not isinstance(data, dict):
            raise KnowledgeError(self.problems)
        bot = self.text(top.get("bot"), ("bot",), required=True) or ""
        language = top.get("language", "en")
        if language not in LANGUAGES:
            self.problem(("language",), f"language must be one of {', '.join(LANGUAGES)}")
            language = "en"
        kn = Knowledge(bot=bot, path=self.path, language=language)
        kn.greeting = self.text(top.get("greeting"), ("greeting",)) or ""
        fallback = self.texts(top.get("fallback"), ("fallback",))
        if "fallback" in top and not fallback:
            self.problem(("fallback",), "fallback must list at least one text")
        if fallback:
            kn.fallback = fallback
        self._texts(kn, top.get("texts"))
        self._synonyms(kn, top.get("synonyms"))
        self._intents(kn, top.get("intents"))
        self._faq(kn, top.get("faq"))
        self._handoff(kn, top.get("handoff"))
        delay = self.mapping(top.get("delay"), ("delay",), DELAY_KEYS)
        kn.delay = DelaySettings(
            min_ms=self.number(delay.get("min_ms"), ("delay", "min_ms"), 150.0, 0, 60_000),
            max_ms=self.number(delay.get("max_ms"), ("delay", "max_ms"), 300.0, 0, 60_000),
            per_char_ms=self.number(delay.get("per_char_ms"), ("delay", "per_char_ms"), 0.0, 0, 1_000),
        )
        if kn.delay.min_ms > kn.delay.max_ms:
            self.problem(("delay",), "delay.min_ms must not exceed delay.max_ms")
        if self.problems:
            raise KnowledgeError(self.problems)
        return kn

    def _texts(self, kn: Knowledge, value: Any) -> None:
        table = self.mapping(value, ("texts",), set(system_texts.KEYS))
        for key, template in table.items():
            at = ("texts", key)
            if key not in system_texts.PLACEHOLDERS:
                continue  # reported by mapping()
            if template is not None and not isinstance(template, str):
                self.problem(at, f"texts.{key} must be text")
                continue
            if not (template or "").strip():
                self.problem(at, f"texts.{key} must not be empty")
                continue
            problems = system_texts.check(key, template)
            for message in problems:
                self.problem(at, message)
            if not problems:
                kn.texts[key] = template

    def _synonyms(self, kn: Knowledge, value: Any) -> None:
        table = self.mapping(value, ("synonyms",), set(value or {}) if isinstance(value, dict) else set())
        for canonical, variants in table.items():
            at = ("synonyms", canonical)
            canon = normalize(str(canonical))
            for variant in self.texts(variants, at):
                key = normalize(variant)
                if not key:
                    continue
                if key in kn.synonyms and kn.synonyms[key] != canon:
                    self.problem(at, f"synonym {variant!r} is listed under both "
                                     f"{kn.synonyms[key]!r} and {canon!r}")
                kn.synonyms[key] = canon

    def _intents(self, kn: Knowledge, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            self.problem(("intents",), "intents must be a mapping of intent name to its entry")
            return
        keyword_owner: dict[str, str] = {}
        for name, body in value.items():
            at = ("intents", name)
            if not INTENT_NAME.match(name):
                self.problem(at, f"intent name {name!r} must be lower-case letters, digits and _ "
                                 "with / between levels (e.g. order/status)")
                continue
            body = self.mapping(body, at, INTENT_KEYS) if body is not None else {}
            handoff = body.get("handoff", False)
            if not isinstance(handoff, bool):
                self.problem(at + ("handoff",), "handoff must be true or false")
                handoff = False
            intent = Intent(
                name=name,
                examples=self.texts(body.get("examples"), at + ("examples",)),
                answers=self.texts(body.get("answers"), at + ("answers",)),
                keywords=self.texts(body.get("keywords"), at + ("keywords",)),
                handoff=handoff,
                line=self.lines.get(at),
            )
            kn.intents[name] = intent
            for kw in intent.keywords:
                key = kn.prepare(kw)
                if not key:
                    self.problem(at + ("keywords",), f"keyword {kw!r} is empty after normalisation")
                elif key in keyword_owner and keyword_owner[key] != name:
                    self.problem(at + ("keywords",), f"keyword {kw!r} is also a keyword of "
                                                     f"intent {keyword_owner[key]!r}")
                else:
                    keyword_owner[key] = name
                    kn.keywords[key] = name
        for name, intent in kn.intents.items():
            if not intent.handoff and not kn.answers_for(name):
                self.problem(("intents", name), f"intent {name!r} has no answers and no parent with answers")

    def _faq(self, kn: Knowledge, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            self.problem(("faq",), "faq must be a list of {q, a} entries")
            return
        for i, item in enumerate(value):
            at = ("faq", i)
            item = self.mapping(item, at, FAQ_KEYS)
            question = self.text(item.get("q"), at + ("q",), required=True)
            answer = self.text(item.get("a"), at + ("a",), required=True)
            intent = self.text(item.get("intent"), at + ("intent",)) or "faq"
            if intent != "faq" and not INTENT_NAME.match(intent):
                self.problem(at + ("intent",), f"intent name {intent!r} is not valid")
            if question is None or answer is None:
                continue
            entry = FaqEntry(question, answer, self.texts(item.get("alt"), at + ("alt",)), intent,
                             self.lines.get(at))
            index = len(kn.faq)
            kn.faq.append(entry)
            for q in (entry.question, *entry.alternatives):
                key = kn.prepare(q)
                if not key:
                    continue
                other = kn.questions.get(key)
                if other is not None and kn.faq[other].answer != entry.answer:
                    self.problem(at, f"question {q!r} already appears in the FAQ entry at line "
                                     f"{kn.faq[other].line}")
                    continue
                kn.questions[key] = index
                kn._fuzzy_keys.append(key)
                kn._fuzzy_index.append(index)

    def _handoff(self, kn: Knowledge, value: Any) -> None:
        at = ("handoff",)
        body = self.mapping(value, at, HANDOFF_KEYS)
        intents = self.texts(body.get("intents"), at + ("intents",))
        for name in intents:
            if name not in kn.intents:
                self.problem(at + ("intents",), f"handoff intent {name!r} is not defined under intents")
        intents = tuple(dict.fromkeys(intents + tuple(n for n, it in kn.intents.items() if it.handoff)))
        max_mis = body.get("max_misunderstood", 2)
        if isinstance(max_mis, bool) or not isinstance(max_mis, int) or max_mis < 0:
            self.problem(at + ("max_misunderstood",), "handoff.max_misunderstood must be a whole number >= 0 "
                                                     "(0 turns the rule off)")
            max_mis = 2
        phrases = self.texts(body.get("phrases"), at + ("phrases",))
        kn.handoff = HandoffRules(
            min_confidence=self.number(body.get("min_confidence"), at + ("min_confidence",), 0.5, 0, 1),
            max_misunderstood=max_mis,
            intents=intents,
            phrases=phrases,
        )
        kn.handoff_phrases = tuple(p for p in (kn.prepare(x) for x in phrases) if p)
