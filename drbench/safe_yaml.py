"""YAML from untrusted text (suite files, ``--only`` values), read with limits that keep a small file small.

:func:`load_yaml` is ``yaml.safe_load`` (no Python objects) and also refuses what ``safe_load`` accepts silently or
at any cost:

- duplicate keys in a mapping (YAML says keys are unique; ``safe_load`` keeps the last one, dropping a whole
  ``fixed:`` block without a word); merge keys (``<<: *base``) still override as YAML defines;
- aliases that expand to more than :data:`MAX_VALUES` values (a 400-byte "billion laughs" file) or that refer to
  themselves: a reader walking the data (validation, hashing, an error message quoting it) would never finish;
- nesting deeper than Python's recursion allows.

This module is a leaf: it imports nothing of drbench.

>>> load_yaml("a: 1\\nb: [2, 3]")[0]
{'a': 1, 'b': [2, 3]}
>>> load_yaml("a: 1\\na: 2")
Traceback (most recent call last):
...
drbench.safe_yaml.YamlError: line 2: duplicate key 'a'
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000
"""The most values (scalars, lists, mappings) a document may hold once its aliases are expanded; a suite holds a
few hundred."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """Text that is not YAML, or YAML beyond the limits above; ``line`` (1-based) is where, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.problem = message
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so with its own message
                break
            if duplicate:
                raise YamlError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The data of YAML ``text`` and its node tree (for line numbers); :class:`YamlError` for anything refused
    (see the module docstring)."""
    try:
        loader = _UniqueKeyLoader(text)  # reads the text at once: refuses control characters here
        try:
            root = loader.get_single_node()
            if root is None:
                return None, None
            expanded_size(root)
            return loader.construct_document(root), root
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        raise YamlError(f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from None
    except RecursionError:
        raise YamlError("YAML nested too deeply") from None


def expanded_size(root: yaml.Node, limit: int = MAX_VALUES) -> int:
    """The number of values of the document once every alias is expanded, counted without expanding (each node
    once); YamlError beyond ``limit`` or for an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in visiting:
            raise YamlError("an alias refers to its own anchor (the data would be infinite)",
                            node.start_mark.line + 1)
        visiting.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1 + sum(size(child) for child in children)
        visiting.discard(id(node))
        if total > limit:
            raise YamlError(f"aliases expand to more than {limit} values; write the values out instead",
                            node.start_mark.line + 1)
        sizes[id(node)] = total
        return total

    return size(root)
