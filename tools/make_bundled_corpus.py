"""Rebuild the bundled corpora under ``data/corpus/`` from Debian packages.

Both texts are public domain (see ``data/corpus/LICENSE.md``); the outputs are committed, so users
never need this.

* ``kjv.jsonl.gz`` (the default): the King James Version, one JSON object per chapter,
  ``{"text": ..., "id": "Ge1"}``, verse references stripped. Needs
  ``apt-get install bible-kjv bible-kjv-text``.
* ``--corpus devil``: ``devil.jsonl.gz``, Ambrose Bierce's *The Devil's Dictionary* (1911), one
  object per entry, ``{"text": ..., "id": "ABASEMENT"}``; a second corpus of a different style
  that conversions never train on. Needs ``apt-get install dict-devil``.
* ``--corpus instructions``: ``kjv_instructions.jsonl.gz``, a small instruction set for diffusion
  SFT made from the bundled ``kjv.jsonl.gz`` (nothing to install): per chapter, the instruction to
  continue its opening sentences and, as the response, the sentences that follow, both as
  ``prompt``/``response`` and as chat ``messages``.
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


SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")
INSTRUCTION = "Continue this passage from the King James Bible:\n"


def words(sentences: list[str]) -> int:
    return sum(len(sentence.split()) for sentence in sentences)


def instructions(path: str = "data/corpus/kjv.jsonl.gz"):
    """(id, prompt, response) per chapter: its opening sentences (at least 12 words) and the
    sentences after them (at most 48 words, at least one sentence)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            chapter = json.loads(line)
            sentences = SENTENCE_END.split(chapter["text"])
            opening = 1
            while opening < len(sentences) and words(sentences[:opening]) < 12:
                opening += 1
            rest = sentences[opening:]
            if not rest:
                continue
            end = 1
            while end < len(rest) and words(rest[: end + 1]) <= 48:
                end += 1
            yield chapter["id"], " ".join(sentences[:opening]), " ".join(rest[:end])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", choices=("kjv", "devil", "instructions"), default="kjv")
    parser.add_argument("--output", help="default: data/corpus/<corpus>.jsonl.gz")
    args = parser.parse_args()
    if args.corpus == "instructions":
        output = args.output or "data/corpus/kjv_instructions.jsonl.gz"
        with gzip.GzipFile(output, "wb", mtime=0) as raw, open_text(raw) as out:
            for name, opening, following in instructions():
                prompt = INSTRUCTION + opening
                messages = [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": following}]
                out.write(json.dumps({"id": name, "prompt": prompt, "response": following,
                                      "messages": messages}) + "\n")
        return
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
