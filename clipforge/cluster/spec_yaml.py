"""Spec YAML read safely and once: plain data only, bounded in size, depth and alias expansion.

A spec file may come from anyone (a scheduler or CI validating user specs, a sweep's base file), so
reading it must not cost more than the file's size suggests:
  - files over MAX_SPEC_BYTES are refused before they are parsed;
  - the node tree is composed once; nesting deeper than MAX_DEPTH is refused while composing (deep
    nesting would otherwise end in Python's RecursionError);
  - aliases are fine for real reuse, but the data they expand to is measured on the node graph
    (each node once) before anything is built: more than MAX_EXPANDED_NODES nodes (an alias bomb,
    `*i` nine levels deep = 9^9 strings) or an alias that contains itself is refused in milliseconds;
  - mapping keys must be names (`? [a, b]: 1`, `~: 1` and `on: 1`, a boolean in YAML, are refused), duplicate
    keys are errors, and tags
    that would build Python objects are refused (SafeLoader).
Every refusal is one SpecError naming the file and line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clipforge.errors import SpecError

# Real specs are a few KiB; a sweep listing every child by hand stays far below this.
MAX_SPEC_BYTES = 1 << 20
# The deepest real spec (a sweep of an inline eval spec with a labelled source) nests about 8 levels.
MAX_DEPTH = 32
# Nodes of the spec with every alias expanded: far above a large sweep, far below anything slow.
MAX_EXPANDED_NODES = 100_000


# Tags a mapping key may carry: a name, or the `<<` merge key.
_NAME_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"})


class _Refused(Exception):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


class _DuplicateKey(Exception):
    def __init__(self, line: int, key: Any):
        super().__init__(line, key)
        self.line, self.key = line, key


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_DEPTH and rejects duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise _DuplicateKey(key_node.start_mark.line + 1, key)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _measure(node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]], open_nodes: set[int]) -> tuple[int, int]:
    """(height, expanded node count) of `node`, each distinct node measured once; raises _Refused past a limit.

    Aliases are the same node object in several places, so the memo keeps this linear in the file while
    the counts are those of the data the aliases expand to.
    """
    key = id(node)
    if key in open_nodes:
        raise _Refused(node.start_mark, "an alias refers to a node that contains it (recursive data)")
    if key not in memo:
        open_nodes.add(key)
        height, count = 1, 1
        for child in _children(node):
            h, c = _measure(child, depth + 1, memo, open_nodes)
            height, count = max(height, h + 1), count + c
            if count > MAX_EXPANDED_NODES:
                raise _Refused(node.start_mark, f"aliases expand to more than {MAX_EXPANDED_NODES:,} values")
        open_nodes.discard(key)
        memo[key] = (height, count)
    height, count = memo[key]
    if depth + height - 1 > MAX_DEPTH:
        raise _Refused(node.start_mark, f"nested more than {MAX_DEPTH} levels deep (aliases expanded)")
    return height, count


def _check_keys(node: yaml.Node, seen: set[int]) -> None:
    """Every mapping key is a plain scalar (a list or mapping as a key cannot name a field)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                shape = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise _Refused(key_node.start_mark, f"a {shape} used as a mapping key; keys must be plain names")
            if key_node.tag not in _NAME_TAGS:
                kind = key_node.tag.rsplit(":", 1)[-1]
                raise _Refused(key_node.start_mark, f"key `{key_node.value or '~'}` reads as {kind} in YAML, not as "
                               "a name (quote it if it is meant as one)")
    for child in _children(node):
        _check_keys(child, seen)


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (as a tuple) to its 1-based line in the YAML text (bounded: measured first)."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (k.value,)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[prefix + (i,)] = v.start_mark.line + 1
            lines.update(_key_lines(v, prefix + (i,)))
    return lines


def _where(source: str, mark) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


def parse_yaml(text: str, source: str = "<spec>") -> tuple[Any, dict[tuple, int]]:
    """The data of one YAML document and the line of each key path, or SpecError naming `source` and the line."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: {len(text):,} characters; a spec may have at most {MAX_SPEC_BYTES:,}")
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _measure(node, 1, {}, set())
        _check_keys(node, set())
        data = loader.construct_document(node)
    except _Refused as e:
        raise SpecError(f"{_where(source, e.mark)}: refused: {e.message}") from None
    except _DuplicateKey as e:
        raise SpecError(f"{source}:{e.line}: duplicate key `{e.key}`") from None
    except yaml.constructor.ConstructorError as e:
        raise SpecError(f"{_where(source, e.problem_mark)}: YAML tag not allowed ({e.problem}); "
                        "specs are plain data") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{_where(source, getattr(e, 'problem_mark', None))}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    return data, _key_lines(node)


def parse_scalar(text: str, source: str) -> Any:
    """A command-line override's value, read as one YAML scalar or flow collection (`1e-4`, `[a, b]`)."""
    if not text.strip():
        return ""
    data, _ = parse_yaml(text, source)
    return data


def read_spec_file(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """The parsed YAML of a spec file and the line of each key, or SpecError."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_SPEC_BYTES and Path(path).is_file():
            raise SpecError(f"{path}: {size:,} bytes; a spec file may have at most {MAX_SPEC_BYTES:,}")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read spec file: {e}") from None
    return parse_yaml(text, str(path))
