"""Zero-shot prompt templates: built-in sets by name, or user lists / JSON files.

A template is a string with a `{c}` placeholder for the class name (CLIP_benchmark's format).
A JSON file may hold a list of templates, or a mapping class name -> its own prompts (CuPL style).
"""
from __future__ import annotations

import json
from importlib import resources

import fsspec

_BUILTIN_PACKAGE = "clipforge.eval"
_BUILTIN_DIR = "templates"


def builtin_template_names() -> list[str]:
    folder = resources.files(_BUILTIN_PACKAGE).joinpath(_BUILTIN_DIR)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _check_templates(templates, source: str) -> list[str] | dict[str, list[str]]:
    if isinstance(templates, dict):
        if not templates:
            raise ValueError(f"{source}: class-specific templates are empty")
        for classname, prompts in templates.items():
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise ValueError(f"{source}: class {classname!r} needs a non-empty list of prompt strings")
        return {str(k): list(v) for k, v in templates.items()}
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{source}: templates must be a non-empty list of strings (or a class -> prompts mapping)")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or "{c}" not in template:
            raise ValueError(f"{source}: template #{i} {template!r} must be a string containing `{{c}}`")
        try:
            template.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{source}: template #{i} {template!r} has braces other than `{{c}}`: {e!r}") from None
    return list(templates)


def _load_json(path: str):
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"template file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"template file {path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def templates_problem(value: str | list[str], read_files: bool = True) -> str | None:
    """Why a spec's `templates` value cannot work (None when it can), checked without any network access: a list
    must hold `{c}` templates, a name must be a built-in set, and a local `.json` file must exist and hold templates
    (with `read_files`; remote files are read when the job runs)."""
    if isinstance(value, str) and value.endswith(".json") and ("://" in value or not read_files):
        return None
    try:
        get_templates(value)
    except ValueError as e:
        return str(e)
    return None


def get_templates(name_or_list: str | list[str] | dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
    """Templates from a built-in set name (`openai_imagenet`, `fashion_mnist`, `simple`), a `.json`
    file path (local or fsspec), or an explicit list / class -> prompts mapping (validated, copied)."""
    if isinstance(name_or_list, (list, dict)):
        return _check_templates(name_or_list, "templates")
    if not isinstance(name_or_list, str):
        raise ValueError(f"templates must be a set name, a .json path or a list, got {type(name_or_list).__name__}")
    name = name_or_list
    if name.endswith(".json"):
        return _check_templates(_load_json(name), name)
    names = builtin_template_names()
    if name not in names:
        raise ValueError(f"unknown template set {name!r}; built-in sets: {', '.join(names)} (or give a .json file)")
    text = resources.files(_BUILTIN_PACKAGE).joinpath(_BUILTIN_DIR).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return _check_templates(json.loads(text), f"built-in template set {name!r}")
