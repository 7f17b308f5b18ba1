"""Text normalisation shared by knowledge loading and matching.

Both sides of every comparison go through :func:`normalize`, so a visitor's
"ＷＨＥＲＥ is my order？" and a knowledge file's "where is my order" meet.
"""
from __future__ import annotations

import re
import unicodedata

# Characters that never carry meaning for matching: controls, and every punctuation
# or symbol category (Chinese punctuation included, after NFKC folds full-width forms).
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So"}
_SPACES = re.compile(r"\s+")
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK = re.compile(f"[{_CJK_RANGES}]")
# Chinese and Japanese put no spaces between words, so a space between two such
# characters (left where punctuation stood: "退款，什么时候" -> "退款 什么时候") is noise.
_CJK_GAP = re.compile(f"(?<=[{_CJK_RANGES}]) (?=[{_CJK_RANGES}])")
_LATIN_WORD_CHAR = re.compile(r"[0-9a-z\u00c0-\u024f]")

#: Texts longer than this are cut before matching: nobody types a 100 KB question, and
#: matching cost must not grow with what an attacker sends.
MAX_MATCH_CHARS = 1000


def normalize(text: str) -> str:
    """Lower-case, fold full-width and compatibility forms, drop punctuation and controls,
    collapse whitespace.  Keeps letters and digits of every script, and ``'`` inside words
    is dropped (``don't`` -> ``dont``) so contractions match either spelling."""
    text = unicodedata.normalize("NFKC", text[: MAX_MATCH_CHARS * 2]).casefold()
    out = []
    for ch in text:
        if ch == "'" or ch == "\u2019":
            continue
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat in _DROP_CATEGORIES:
            out.append(" ")
        else:
            out.append(ch)
    text = _SPACES.sub(" ", "".join(out)).strip()
    return _CJK_GAP.sub("", text)[:MAX_MATCH_CHARS]


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def is_latin_word_char(ch: str) -> bool:
    """True for characters that continue a Latin-script word (letters, digits)."""
    return bool(_LATIN_WORD_CHAR.match(ch))


def replace_phrases(text: str, table: dict[str, str], cjk: bool) -> str:
    """Rewrite every variant in ``table`` (already normalised) to its canonical form.

    Latin text matches whole words; CJK text has no word spaces, so substrings.
    Longest variants first, so "money back guarantee" beats "money back".
    """
    if not table:
        return text
    for variant in sorted(table, key=len, reverse=True):
        canonical = table[variant]
        if cjk or has_cjk(variant):
            text = text.replace(variant, canonical)
        else:
            text = re.sub(rf"(?<!\w){re.escape(variant)}(?!\w)", canonical, text)
    return text
