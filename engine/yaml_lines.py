"""Load YAML keeping the line of every node, and refusing duplicate keys.

PyYAML's ``safe_load`` silently keeps the last of two duplicate keys, which hides a
duplicated intent; and plain Python values lose their line numbers, which users need
to find a mistake.  This composes the node tree instead and builds values from it,
recording ``path -> line`` (1-based) on the side.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import KnowledgeError, Problem

Lines = dict[tuple, int]


def load_yaml_with_lines(text: str, path: str | Path) -> tuple[Any, Lines]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise KnowledgeError([Problem(path, line, f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise KnowledgeError([Problem(path, None, f"invalid YAML: {exc}")]) from None
    if node is None:
        return None, {}
    lines: Lines = {}
    problems: list[Problem] = []
    constructor = yaml.SafeLoader("")

    def build(n: yaml.Node, at: tuple) -> Any:
        lines[at] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            out: dict = {}
            for key_node, value_node in n.value:
                key = constructor.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, (str, int, float, bool)):
                    problems.append(Problem(path, key_node.start_mark.line + 1, "mapping keys must be plain text"))
                    continue
                key = str(key) if not isinstance(key, str) else key
                if key in out:
                    problems.append(
                        Problem(path, key_node.start_mark.line + 1,
                                f"duplicate key {key!r} (first at line {lines[at + (key,)]})")
                    )
                    continue
                out[key] = build(value_node, at + (key,))
                # Point at the key, where the user reads the entry, not at its value.
                lines[at + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(item, at + (i,)) for i, item in enumerate(n.value)]
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.YAMLError as exc:
            problems.append(Problem(path, n.start_mark.line + 1, f"invalid value: {exc}"))
            return None

    value = build(node, ())
    if problems:
        raise KnowledgeError(problems)
    return value, lines
