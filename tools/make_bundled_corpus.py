"""Rebuild the bundled corpus ``data/corpus/kjv.jsonl.gz`` from Debian's ``bible-kjv`` package.

The King James Version text is public domain (see ``data/corpus/LICENSE.md``). One JSON object per
chapter, ``{"text": ..., "id": "Ge1"}``, verse references stripped. Run on Debian with
``apt-get install bible-kjv bible-kjv-text``; the output is committed, so users never need this.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="data/corpus/kjv.jsonl.gz")
    args = parser.parse_args()
    text = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    with gzip.open(args.output, "wt", encoding="utf-8") as out:
        for chapter, body in chapters(text.splitlines()):
            out.write(json.dumps({"id": chapter, "text": body}) + "\n")


if __name__ == "__main__":
    main()
