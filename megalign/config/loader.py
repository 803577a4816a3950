"""Loading the run configuration: YAML files merged in order, dotted ``key.sub=value``
overrides, values coerced to each field's type (``Literal`` fields to one of their values).

Every problem is a ``ConfigError`` in one line naming the file and line or the key, and what to
give instead; a built config has passed its sections' own checks (``sections.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml

from megalign.config.sections import Config
from megalign.errors import ConfigError, one_line

INT64_LIMIT = 2**63
CONFIG_DIR = "${config_dir}"


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a {base.__name__}")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {base.__name__} fields, got {value!r}")
        return _build(base, value, key + ".")
    origin = typing.get_origin(base) or base
    if origin is Literal:
        allowed = typing.get_args(base)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        shown = [None, *allowed] if optional else list(allowed)
        raise ConfigError(f"{key}={value!r} is not one of {shown}")
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_LIMIT <= value < INT64_LIMIT:
                raise ConfigError(f"{key}={value} is too large for a 64-bit integer")
            return value
    elif origin is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < INT64_LIMIT else math.inf
        elif isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value} is not a finite number")
            return number
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            element = typing.get_args(base)
            if not element:  # a list checked where it is read (data.paths: a blend)
                return value
            return [_coerce(f"{key}[{i}]", item, element[0]) for i, item in enumerate(value)]
    raise ConfigError(
        f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r} "
        f"({type(value).__name__})"
    )


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r}{f' under {prefix[:-1]!r}' if prefix else ''} "
                              f"is not a name; known keys: {names}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {names}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree['a']['b'] = value`` for ``dotted`` = ``a.b`` (sections created as needed)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value``; the value is parsed as YAML (``3``, ``1e-4``, ``true``, ``[1, 2]``,
    ``null``)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"override '{text}'") if raw != "" else ""
    return key.strip(), value


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML, or a ConfigError in one line naming ``where``, the line and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{where}{at}: not valid YAML ({problem})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({one_line(err)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a configuration") from None


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def expand_config_dir(tree, directory: str):
    """``tree`` with ``${config_dir}`` in its strings replaced by ``directory``.

    Why: files megalign writes next to a model (megalign-convert's megalign.yaml, a checkpoint's
    recorded config) name its tokenizer and weights relative to where they are, so the directory
    can be moved or shared without holding paths of the machine it was made on."""
    if isinstance(tree, dict):
        return {key: expand_config_dir(value, directory) for key, value in tree.items()}
    if isinstance(tree, list):
        return [expand_config_dir(value, directory) for value in tree]
    if isinstance(tree, str) and CONFIG_DIR in tree:
        return os.path.normpath(tree.replace(CONFIG_DIR, directory or "."))
    return tree


def load_config(paths=None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file(s), merged in order (later wins), + overrides -> ``Config``; ``${config_dir}``
    in a file's values is that file's directory."""
    tree: dict = {}
    for path in [paths] if isinstance(paths, str) else (paths or []):
        path = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ConfigError(f"config file '{path}', line {line}: not UTF-8 text") from None
        part = parse_yaml(text, f"config file '{path}'")
        part = {} if part is None else part
        if not isinstance(part, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        part = expand_config_dir(part, os.path.dirname(path))
        data = part.get("data")
        if isinstance(data, dict) and "tokenizer" in data and "eod_token" not in data:
            _forget_eod_token(tree, data["tokenizer"])
        _merge(tree, part)
    parsed = [parse_override(text) for text in overrides or []]
    given = dict(parsed)
    if "data.tokenizer" in given and "data.eod_token" not in given:
        _forget_eod_token(tree, given["data.tokenizer"])
    for key, value in parsed:
        set_dotted(tree, key, value)
    return _build(Config, tree)


def _forget_eod_token(tree: dict, tokenizer) -> None:
    """An end-of-document token belongs to the tokenizer it was given with (megalign.yaml names
    a converted model's): another tokenizer given later without one brings its own rule
    (megalign/data/tokenizer.py)."""
    data = tree.get("data")
    if isinstance(data, dict) and data.get("tokenizer") != tokenizer:
        data.pop("eod_token", None)


def config_from_dict(tree: dict, directory: Optional[str] = None) -> Config:
    """A ``Config`` from a nested dict (as stored in checkpoints, whose ``${config_dir}`` is
    ``directory``); unknown keys are errors."""
    return _build(Config, tree if directory is None else expand_config_dir(tree, directory))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
