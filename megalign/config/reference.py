"""The configuration reference (docs/configuration.md), generated from the sections themselves:
every key with its type, default and the comment written beside it in ``sections.py``.

Why generated: the reference cannot drift from the code; ``tools/config_reference.py`` writes
it and a unit test fails when the file in the repository differs from what this produces.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from megalign.config.sections import Config, Section, choices_of, sections

HEADER = """# Configuration reference

Generated from `megalign/config/sections.py` by `python tools/config_reference.py` (a unit test
fails when this file is out of date). Configs are YAML files (`--config`, merged in order) and
`key.sub=value` overrides; every section checks its own values when it is built, and the command
checks the rest against the launch and the tokenizer before anything starts. `null` means the
default that the comment names.
"""

FIELD = re.compile(r"^\s+(\w+): [^=]+?(?:= .*)?$")


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment lines right above a field and the one beside it."""
    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").rstrip())
            continue
        code, _, trailing = line.partition("  # ")
        match = FIELD.match(code)
        if match and not stripped.startswith(("KEY", "def ", "@")):
            text = " ".join([*pending, trailing.strip()]).strip()
            comments[match.group(1)] = text
        pending = []
    return comments


def type_text(cls: type, name: str, annotation: str) -> str:
    allowed = choices_of(cls).get(name)
    if allowed:
        return " \\| ".join("null" if value is None else f"`{value}`" for value in allowed)
    optional = annotation.startswith("Optional[")
    inner = annotation[len("Optional["):-1] if optional else annotation
    return f"{inner} or null" if optional else inner


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:
        value = field.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '`""`'


def section_table(cls: type, prefix: str) -> list[str]:
    comments = field_comments(cls)
    annotations = typing.get_type_hints(cls, include_extras=False)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        hint = annotations[field.name]
        if isinstance(hint, type) and issubclass(hint, Section):
            continue
        annotation = cls.__annotations__.get(field.name) or next(
            base.__annotations__[field.name] for base in cls.__mro__
            if field.name in getattr(base, "__annotations__", {}))
        meaning = comments.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{field.name}` | {type_text(cls, field.name, annotation)} | "
                    f"{default_text(field)} | {meaning} |")
    return rows


def reference_markdown() -> str:
    blocks = [HEADER.strip(), "## Top level", first_paragraph(Config),
              "\n".join(section_table(Config, ""))]
    for name, cls in sections().items():
        blocks.append(f"## `{name}`")
        if cls.__doc__:
            blocks.append(first_paragraph(cls))
        blocks.append("\n".join(section_table(cls, f"{name}.")))
    return "\n\n".join(blocks) + "\n"


def first_paragraph(cls: type) -> str:
    return " ".join(inspect.getdoc(cls).split("\n\n")[0].split())
