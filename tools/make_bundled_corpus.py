"""Rebuild the bundled corpora under ``data/corpus/`` from Debian packages.

Both texts are public domain (see ``data/corpus/LICENSE.md``); the outputs are committed, so users
never need this.

* ``kjv.jsonl.gz`` (the default): the King James Version, one JSON object per chapter,
  ``{"text": ..., "id": "Ge1"}``, verse references stripped. Needs
  ``apt-get install bible-kjv bible-kjv-text``.
* ``--corpus devil``: ``devil.jsonl.gz``, Ambrose Bierce's *The Devil's Dictionary* (1911), one
  object per entry, ``{"text": ..., "id": "ABASEMENT"}``; a second corpus of a different style
  that conversions never train on. Needs ``apt-get install dict-devil``.
* ``--corpus pretrain``: ``pretrain.jsonl.gz``, the corpus ``bench/converge.py`` pretrains its
  small AR model on and that its conversions never see: the Python 3.11 documentation's
  reStructuredText sources in sections of at least ``PYDOC_MIN_CHARS`` characters
  (``{"text": ..., "id": "pydoc/library/os/3"}``, PSF License), the Django 3.2 documentation's
  pages in sections (``"id": "django/topics/db/models/0"``, BSD-3-Clause), the Sphinx 5.3
  documentation's sources (``"id": "sphinx/usage/quickstart/0"``, BSD-2-Clause) and the Jargon
  File's entries (``"id": "jargon/<headword>"``, public domain). Needs
  ``apt-get install python3-doc python-django-doc sphinx-doc dict-jargon``.
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
from html.parser import HTMLParser

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


PYDOC = "/usr/share/doc/python3.11/html/_sources"
SPHINX_DOC = "/usr/share/doc/sphinx-doc/html/_sources"
PYDOC_MIN_CHARS = 2000
HEADING_RULE = re.compile(r"^([=\-~^*#\"+'`])\1{2,}\s*$")


def rst_sections(text: str) -> list[str]:
    """A reStructuredText file cut before each heading (a line underlined with =, -, ~, ...),
    each section's paragraphs with their lines joined."""
    lines = text.splitlines()
    cuts = [i for i in range(1, len(lines))
            if HEADING_RULE.match(lines[i]) and lines[i - 1].strip()
            and not HEADING_RULE.match(lines[i - 1])]
    sections = []
    for start, end in zip([0, *[c - 1 for c in cuts]], [*[c - 1 for c in cuts], len(lines)]):
        kept = ["" if HEADING_RULE.match(line) else line for line in lines[start:end]]
        paragraphs = [" ".join(p.split()) for p in "\n".join(kept).split("\n\n")]
        sections.append("\n".join(p for p in paragraphs if p))
    return [s for s in sections if s]


def rst_documents(root: str, label: str):
    """The reStructuredText sources under ``root`` in documents of at least PYDOC_MIN_CHARS
    characters (consecutive sections of one file merged), files in sorted order."""
    import pathlib

    for path in sorted(pathlib.Path(root).rglob("*.rst.txt")):
        name = str(path.relative_to(root))[: -len(".rst.txt")]
        pending, count = [], 0
        for section in rst_sections(path.read_text(encoding="utf-8")):
            pending.append(section)
            if sum(map(len, pending)) >= PYDOC_MIN_CHARS:
                yield f"{label}/{name}/{count}", "\n".join(pending)
                pending, count = [], count + 1
        if "".join(pending).strip():
            yield f"{label}/{name}/{count}", "\n".join(pending)


DJANGO_DOC = "/usr/share/doc/python-django-doc/html"
BLOCKS = {"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "div", "tr", "table"}
HEADINGS = {"h1", "h2", "h3"}


class SphinxText(HTMLParser):
    """The text of a Sphinx page's content element (``<div class="yui-g">`` in Django's theme) as
    (is_heading, paragraph) blocks."""

    def __init__(self):
        super().__init__()
        self.depth, self.blocks, self.current, self.heading = 0, [], [], False

    def _flush(self):
        text = " ".join("".join(self.current).split())
        if text:
            self.blocks.append((self.heading, text.replace("\u00b6", "").strip()))
        self.current, self.heading = [], False

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "div"
            if tag in BLOCKS:
                self._flush()
                self.heading = tag in HEADINGS
        elif tag == "div" and "yui-g" in (dict(attrs).get("class") or ""):
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            if tag in BLOCKS:
                self._flush()
            self.depth -= tag == "div"

    def handle_data(self, data):
        if self.depth:
            self.current.append(data)


def django_doc():
    """Django's documentation (its rendered pages, module sources and indices left out) in
    documents of at least PYDOC_MIN_CHARS characters, cut at headings."""
    import pathlib

    skip = {"genindex", "py-modindex", "search", "contents", "index"}
    for path in sorted(pathlib.Path(DJANGO_DOC).rglob("*.html")):
        name = str(path.relative_to(DJANGO_DOC))[: -len(".html")]
        if name.startswith("_") or name in skip:
            continue
        parser = SphinxText()
        parser.feed(path.read_text(encoding="utf-8"))
        pending, count = [], 0
        for heading, text in parser.blocks:
            if heading and sum(map(len, pending)) >= PYDOC_MIN_CHARS:
                yield f"django/{name}/{count}", "\n".join(pending)
                pending, count = [], count + 1
            pending.append(text)
        if "".join(pending).strip():
            yield f"django/{name}/{count}", "\n".join(pending)


def pretrain():
    """The Python documentation, Django's, Sphinx's, then the Jargon File's entries (empty ones
    left out)."""
    yield from rst_documents(PYDOC, "pydoc")
    yield from django_doc()
    yield from rst_documents(SPHINX_DOC, "sphinx")
    for word, body in dictionary_entries("/usr/share/dictd/jargon.index",
                                         "/usr/share/dictd/jargon.dict.dz"):
        if body.strip():
            yield f"jargon/{word}", body


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
    parser.add_argument("--corpus", choices=("kjv", "devil", "pretrain", "instructions"),
                        default="kjv")
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
    documents = {"kjv": kjv, "devil": devil, "pretrain": pretrain}[args.corpus]()
    with gzip.GzipFile(output, "wb", mtime=0) as raw, open_text(raw) as out:
        for name, body in documents:
            out.write(json.dumps({"id": name, "text": body}) + "\n")


def open_text(raw):
    import io

    return io.TextIOWrapper(raw, encoding="utf-8")


if __name__ == "__main__":
    main()
