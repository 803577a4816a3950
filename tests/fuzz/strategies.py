"""Generated inputs for the fuzz targets (hypothesis strategies): documents with any Unicode
(lone surrogates included), byte-level damage of valid files, arbitrary JSON records, config
trees over megalign's real keys with values of every type and size, and override strings."""

from __future__ import annotations

import dataclasses
import gzip
import typing

import yaml
from hypothesis import strategies as st

from megalign.config import Config

# any code point, lone surrogates included (hypothesis leaves category Cs out by default)
any_text = st.text(st.characters(exclude_categories=[]), max_size=40)
documents = st.lists(st.one_of(any_text, st.text(max_size=40)), min_size=1, max_size=6)

_numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**400 // 10**380, 1e308]))
scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=12),
                    st.sampled_from(["", "null", "1e-4", ".inf", "[1, 2]", "~", "${config_dir}"]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                  allow_infinity=False),
              any_text),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)


def config_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the run config (sections and fields)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        name = prefix + item.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[item.name]):
            keys += config_keys(hints[item.name], name + ".")
    return keys


KEYS = config_keys()
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10),
                 st.sampled_from(KEYS).map(lambda key: key + "x"))


@st.composite
def config_trees(draw) -> dict:
    """A nested mapping: real config keys (some misspelt, some new) set to values of any type."""
    tree: dict = {}
    for key in draw(st.lists(keys, max_size=6)):
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = draw(st.one_of(scalars, st.lists(scalars, max_size=3),
                                             st.dictionaries(st.text(max_size=6), scalars,
                                                             max_size=2)))
    return tree


def yaml_text(tree: dict) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True).encode("utf-8")


overrides = st.lists(
    st.one_of(st.builds(lambda key, value: f"{key}={value}", keys,
                        st.one_of(scalars.map(str), st.text(max_size=12))),
              st.text(max_size=16)),
    max_size=3)


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


def corpus_sample(corpus: str, lines: int = 5) -> dict[str, bytes]:
    """The first lines of a bundled JSONL corpus in each input form megalign-preprocess reads."""
    import json

    with gzip.open(corpus, "rt", encoding="utf-8") as handle:
        records = [next(handle) for _ in range(lines)]
    jsonl = "".join(records).encode()
    text = "".join(json.loads(line)["text"].replace("\n", " ") + "\n" for line in records).encode()
    return {"corpus.jsonl": jsonl, "corpus.txt": text,
            "corpus.jsonl.gz": gzip.compress(jsonl, mtime=0),
            "corpus.txt.gz": gzip.compress(text, mtime=0)}
