"""The few spec fields the runs table shows (kind, name, model), read without building the whole document.

Constructing a full spec with PyYAML costs about a millisecond, which is seconds for thousands of
runs. Specs written by clipforge (yaml.safe_dump in block style, starting with kind, name, storage,
model) are read by scanning their first lines for `key: plain value`, which costs microseconds; any
line that scan cannot read for certain (quotes, flow collections, anchors, tags, comments, tabs,
multi-line values) sends the document to libyaml's event parser instead, which stops once the
sections are closed. The run page parses the whole spec.
"""
from __future__ import annotations

import re

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_RESOLVER = yaml.resolver.Resolver()


def _scalar(event: yaml.ScalarEvent):
    """The value PyYAML's safe loader gives this scalar (its own tag resolution and constructors)."""
    tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    node = yaml.ScalarNode(tag, event.value, style=event.style)
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError:
        return event.value


_KEY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?$")
_CANONICAL_INT = re.compile(r"^(0|[1-9][0-9]*)$")
_PLAIN_STRING = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./+-]*$")
# YAML 1.1 (PyYAML) reads these as booleans.
_BOOLS = {"yes": True, "Yes": True, "YES": True, "no": False, "No": False, "NO": False, "true": True,
          "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False, "on": True, "On": True,
          "ON": True, "off": False, "Off": False, "OFF": False, "y": True, "Y": True, "n": False, "N": False}


class _NeedsParser(Exception):
    """The line scan met YAML it does not read; the event parser decides."""


def _resolve_plain(v: str):
    """The value of a plain scalar the scan is sure about: null, booleans, canonical integers, simple words
    and paths. Anything else (floats, dates, quoted or special forms) is left to the parser."""
    if v in ("~", "null", "Null", "NULL"):
        return None
    if v in _BOOLS:
        return _BOOLS[v] if v.lower() in ("true", "false") else _needs_parser()
    if _CANONICAL_INT.match(v):
        return int(v)
    if _PLAIN_STRING.match(v):
        return v
    return _needs_parser()


def _needs_parser():
    raise _NeedsParser


def _opens_block(line: str) -> bool:
    """Whether an indented line starts a mapping or a list (rather than continuing a scalar)."""
    stripped = line.strip()
    return stripped == "-" or stripped.startswith("- ") or _KEY_LINE.match(stripped) is not None


def _scan(text: str, sections: tuple[str, ...], wanted: tuple[str, ...]) -> dict:
    out: dict = {}
    remaining = set(sections)
    wanted_set = set(wanted)
    section: str | None = None  # the section whose lines we are in
    empty: str | None = None  # a top-level key with nothing after the colon: null, unless a block follows
    block_key: str | None = None  # a section key with nothing after the colon: null, unless a block follows
    scalar_indent = -1  # indentation of the scalar on the previous line: a deeper line would continue it
    for line in text.splitlines():
        if not line.strip():
            continue
        if "\t" in line or line.startswith(("---", "...", "%", "#")):
            raise _NeedsParser
        indent = len(line) - len(line.lstrip(" "))
        if indent > scalar_indent >= 0:
            raise _NeedsParser  # a multi-line plain scalar
        if not remaining and indent == 0 and empty is None and wanted_set <= out.keys():
            return out  # the previous value is complete, and everything asked for has been read
        scalar_indent = -1
        if indent:
            if (empty is not None or (block_key is not None and indent > 2)) and not _opens_block(line):
                raise _NeedsParser  # the value of a key is a plain scalar on the next line
            empty = None
            if section is None:
                continue  # inside a block we do not read
            if line.startswith("   ") or line.startswith("  - "):
                if block_key is not None:
                    del out[section][block_key]  # it holds a nested block, not a scalar
                    block_key = None
                elif not out[section]:
                    raise _NeedsParser  # the section is not indented by two spaces, or is a list
                continue
            m = _KEY_LINE.match(line[2:])
            if m is None:
                raise _NeedsParser
            block_key = None
            if m.group(2) is None:
                out[section][m.group(1)] = None
                block_key = m.group(1)
            else:
                out[section][m.group(1)] = _resolve_plain(m.group(2))
                scalar_indent = 2
            continue
        if line[0] == "-":
            if section is not None or empty is not None:
                raise _NeedsParser  # a list at the top-level key's own indentation
            continue  # items of a top-level list value
        if section is not None:
            if not out[section]:
                raise _NeedsParser  # an empty section
            remaining.discard(section)
            section = block_key = None
        if empty is not None:
            out[empty] = None
            remaining.discard(empty)
            empty = None
        m = _KEY_LINE.match(line)
        if m is None:
            raise _NeedsParser
        key, value = m.group(1), m.group(2)
        if value is None:
            if key in remaining:
                section = key
                out[key] = {}
            else:
                empty = key
            continue
        out[key] = _resolve_plain(value)
        remaining.discard(key)
        scalar_indent = 0
    if section is not None or empty is not None:
        raise _NeedsParser  # the document ends inside them: let the parser say what they hold
    return out


# clipforge's own dump: simple top-level `key: value` lines, then `model:` with simple two-space lines,
# then the next top-level key. One regular-expression match finds that head.
_SIMPLE_VALUE = r"[A-Za-z0-9_./+-]+"
_DUMPED_HEAD = re.compile(
    rf"((?:[A-Za-z_][A-Za-z0-9_]*: {_SIMPLE_VALUE}\n)*)model:\n((?:  [A-Za-z_][A-Za-z0-9_]*: {_SIMPLE_VALUE}\n)+)"
    r"(?=[A-Za-z_][A-Za-z0-9_]*:)")


# Plain value -> what it reads as. Most values repeat from run to run (train, tiny, null, false, 0) and
# are met in the first few specs: remembering them saves their regular-expression matches. Small, as
# names and paths, which do not repeat, fill it up.
_RESOLVED: dict[str, object] = {}
_RESOLVED_MAX = 512
_UNSURE = object()


def _resolve_remembered(value: str):
    resolved = _RESOLVED.get(value, _RESOLVED)
    if resolved is _RESOLVED:
        try:
            resolved = _resolve_plain(value)
        except _NeedsParser:
            resolved = _UNSURE
        if len(_RESOLVED) < _RESOLVED_MAX:
            _RESOLVED[value] = resolved
    if resolved is _UNSURE:
        raise _NeedsParser
    return resolved


def _dumped_head(text: str, wanted: tuple[str, ...]) -> dict:
    m = _DUMPED_HEAD.match(text)
    if m is None:
        raise _NeedsParser
    out: dict = {}
    for line in m.group(1).splitlines():
        key, value = line.split(": ", 1)
        out[key] = _resolve_remembered(value)
    out["model"] = model = {}
    for line in m.group(2).splitlines():
        key, value = line[2:].split(": ", 1)
        model[key] = _resolve_remembered(value)
    if not all(k in out for k in wanted):
        raise _NeedsParser  # a wanted key comes after the model section
    return out


def spec_header(text: str, sections: tuple[str, ...] = ("model",), wanted: tuple[str, ...] = ("kind", "name")) -> dict:
    """Top-level scalars of a YAML mapping, plus the scalars directly inside each of `sections`.

    Stops reading once every section has been closed and every `wanted` key seen (else reads it all).
    Raises yaml.YAMLError on broken YAML.
    """
    if sections == ("model",):
        try:
            return _dumped_head(text, wanted)
        except _NeedsParser:
            pass
    try:
        return _scan(text, sections, wanted)
    except _NeedsParser:
        pass
    return _parse_events(text, sections, wanted)


def _parse_events(text: str, sections: tuple[str, ...], wanted: tuple[str, ...]) -> dict:
    out: dict = {}

    def done() -> bool:
        return not remaining and all(k in out for k in wanted)

    # Open containers: [kind, key of the pending mapping value or None, key under which it sits].
    stack: list[list] = []
    remaining = set(sections)
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            parent_key = stack[-1][1] if stack and stack[-1][0] == "map" else None
            stack.append(["map" if isinstance(event, yaml.MappingStartEvent) else "seq", None, parent_key])
            if len(stack) == 2 and parent_key in remaining and stack[-1][0] == "map":
                out[parent_key] = {}
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            closed = stack.pop()
            if len(stack) == 1:
                remaining.discard(closed[2])
                stack[-1][1] = None
                if done():
                    break
            elif stack and stack[-1][0] == "map":
                stack[-1][1] = None
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            if not stack or stack[-1][0] != "map":
                continue
            top = stack[-1]
            if top[1] is None:
                top[1] = event.value if isinstance(event, yaml.ScalarEvent) else None
                continue
            value = _scalar(event) if isinstance(event, yaml.ScalarEvent) else None
            if len(stack) == 1:
                out[top[1]] = value
                remaining.discard(top[1])  # a section given as a scalar (e.g. `model: null`) is done too
                if done():
                    break
            elif len(stack) == 2 and top[2] in out and isinstance(out[top[2]], dict):
                out[top[2]][top[1]] = value
            top[1] = None
    return out
