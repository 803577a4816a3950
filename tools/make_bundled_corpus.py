"""Rebuild the bundled corpora under ``data/corpus/`` from Debian packages.

Both texts are public domain (see ``data/corpus/LICENSE.md``); the outputs are committed, so users
never need this.

* ``kjv.jsonl.gz`` (the default): the King James Version, one JSON object per chapter,
  ``{"text": ..., "id": "Ge1"}``, verse references stripped. Needs
  ``apt-get install bible-kjv bible-kjv-text``.
* ``--corpus devil``: ``devil.jsonl.gz``, Ambrose Bierce's *The Devil's Dictionary* (1911), one
  object per entry, ``{"text": ..., "id": "ABASEMENT"}``; a second corpus of a different style
  that conversions never train on. Needs ``apt-get install dict-devil``.
"""

import argparse
import gzip
import json
import re
import subprocess

VERSE = re.compile(r"^(?P<chapter>\d?[A-Za-z]+\d+):\d+ (?P<text>.*)$")


def chapters(lines):
    current, verses = None, []
    for line in lines:
        match = VERSE.match(line.strip())
        if not match:
            continue
        if match["chapter"] != current and verses:
            yield current, " ".join(verses)
            verses = []
        current = match["chapter"]
        verses.append(match["text"])
    if verses:
        yield current, " ".join(verses)


DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    """dictd's index numbers: base 64 with its own digit order."""
    value = 0
    for char in text:
        value = value * 64 + DICTD_DIGITS.index(char)
    return value


def dictionary_entries(index_path: str, dict_path: str):
    """(headword, definition as one paragraph) of a dictd database, in index order."""
    with gzip.open(dict_path, "rb") as handle:
        data = handle.read()
    with open(index_path, encoding="utf-8") as handle:
        for line in handle:
            word, offset, length = line.rstrip("\n").split("\t")
            if word.startswith("00database"):
                continue
            body = data[dictd_number(offset) : dictd_number(offset) + dictd_number(length)]
            yield word, " ".join(body.decode("utf-8").split())


def kjv():
    text = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    yield from chapters(text.splitlines())


def devil():
    yield from dictionary_entries("/usr/share/dictd/devil.index", "/usr/share/dictd/devil.dict.dz")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", choices=("kjv", "devil"), default="kjv")
    parser.add_argument("--output", help="default: data/corpus/<corpus>.jsonl.gz")
    args = parser.parse_args()
    output = args.output or f"data/corpus/{args.corpus}.jsonl.gz"
    documents = kjv() if args.corpus == "kjv" else devil()
    with gzip.GzipFile(output, "wb", mtime=0) as raw, open_text(raw) as out:
        for name, body in documents:
            out.write(json.dumps({"id": name, "text": body}) + "\n")


def open_text(raw):
    import io

    return io.TextIOWrapper(raw, encoding="utf-8")


if __name__ == "__main__":
    main()
