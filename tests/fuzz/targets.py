"""Fuzz targets: every reader of user input, run as its command runs it (the command's ``main``,
in this process), and the one invariant they all keep.

The invariant (README, "Bad input"): the command exits 0 with valid output, or exits 2 with
exactly one line ``<command>: error: ...`` naming the file (and line) or the key at fault; never
a traceback, never exit 1 (an environment failure) for something the input caused, and nothing
left in the output directory after a failure. A target raises ``InvariantBroken`` (an
AssertionError, so pytest and hypothesis report it) or lets the traceback escape; either is a bug.

The targets are shared by the bounded run in the suite (tests/test_fuzz.py, hypothesis) and the
longer runs of tests/fuzz/run.py (hypothesis for longer, or atheris with coverage guidance).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy

from megalign.errors import one_line

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "data" / "tokenizer" / "kjv_bpe4k.model"
TINY_CONFIG = REPO / "examples" / "configs" / "tiny.yaml"


class InvariantBroken(AssertionError):
    """A reader of user input broke the invariant above."""


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_main(main: Callable, argv: list[str]) -> Outcome:
    """``main(argv)`` with its output captured; usage errors (SystemExit) give their code. The
    environment is restored afterwards (a command sets MASTER_PORT for its process group, which
    processes started later by this one must not inherit)."""
    out, err = io.StringIO(), io.StringIO()
    environment = dict(os.environ)
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(environment)
    return Outcome(code, out.getvalue(), err.getvalue())


def files_under(directory: Path) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                  for name in names)


def check(outcome: Outcome, prog: str, names: Iterable[str] = (),
          output: Optional[Path] = None) -> None:
    """The invariant, for ``outcome`` of ``prog``; a failure must name one of ``names`` (when
    given) and leave ``output`` (a directory) empty."""
    problem = None
    if "Traceback" in outcome.stderr:
        problem = "a traceback"
    elif outcome.code not in (0, 2):
        problem = f"exit {outcome.code} (0 or 2 expected)"
    elif outcome.code == 2:
        lines = outcome.stderr.strip().split("\n")  # lines a terminal shows (not str.splitlines)
        names = [str(name) for name in names]  # as one_line folds them into the message
        if len(lines) != 1 or not lines[0].startswith(f"{prog}: error: "):
            problem = f"{len(lines)} lines instead of one '{prog}: error: ...'"
        elif names and not any(one_line(name) in lines[0] for name in names):
            problem = f"an error naming none of {names[:8]}"
        elif output is not None and files_under(output):
            problem = f"files left behind: {files_under(output)}"
    elif output is not None and any(".tmp-" in name for name in files_under(output)):
        problem = f"temporary files left behind: {files_under(output)}"
    if problem:
        raise InvariantBroken(f"{prog} gave {problem}\nexit {outcome.code}\nstderr:\n"
                              f"{outcome.stderr[-3000:]}")


def fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


# ----------------------------------------------------------------------------- corpora


def preprocess(workdir: Path, data: bytes, name: str = "corpus.jsonl", extra=(),
               tokenizer: Path = TOKENIZER) -> Outcome:
    """megalign-preprocess on one input file holding ``data``; returns the checked outcome."""
    from megalign.cli.preprocess import main

    source, output = fresh(workdir / "in") / name, fresh(workdir / "out")
    source.write_bytes(data)
    outcome = run_main(main, ["--input", str(source), "--tokenizer", str(tokenizer),
                              "--output-prefix", str(output / "x"), "--no-progress", *extra])
    check(outcome, "megalign-preprocess", [source, tokenizer], output)
    return outcome


def read_corpus(workdir: Path, data: bytes, name: str = "corpus.jsonl") -> None:
    """The corpus reader itself, in this process (megalign-preprocess runs it in its worker
    processes, where a coverage-guided fuzzer cannot see): every line is blank, a document, or a
    DataError naming the file and that line."""
    from megalign.data.preprocess import read_records
    from megalign.errors import DataError

    source = fresh(workdir / "in") / name
    source.write_bytes(data)
    try:
        for number, record, _ in read_records(str(source), ["text"]):
            if isinstance(record, DataError):
                if not str(record).startswith(f"{source}:{number}: "):
                    raise InvariantBroken(f"a refusal not naming {source}:{number}: {record}")
            elif record is not None and not isinstance(record.get("text"), str):
                raise InvariantBroken(f"line {number} read as {record!r}")
    except DataError as err:  # damaged gzip data stops the file, naming where
        if not str(err).startswith(f"{source}:"):
            raise InvariantBroken(f"a refusal not naming {source}: {err}") from None


def documents(prefix: str) -> list[list[int]]:
    """The token ids of every document of a dataset megalign-preprocess wrote."""
    from megalign.data.indexed import get_bin_path, read_index

    index = read_index(prefix)
    tokens = numpy.fromfile(get_bin_path(prefix), dtype=index.dtype)
    ends = numpy.cumsum(index.lengths, dtype=numpy.int64)
    starts = ends - index.lengths
    return [tokens[start:end].tolist() for start, end in zip(starts, ends)]


def is_document(text: str, tokenizer) -> bool:
    """What the JSONL reader accepts as a document: text that UTF-8 can hold (no lone
    surrogate), not blank, and of at least one token."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(text.strip()) and bool(tokenizer.encode(text))


def preprocess_documents(workdir: Path, texts: list[str], workers: int = 1) -> Outcome:
    """Documents as JSONL records: accepted ones are tokenized exactly as the tokenizer does
    (each followed by the end-of-document token); a refused one is named by its line."""
    from megalign.data.preprocess import load_tokenizer

    data = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    outcome = preprocess(workdir, data, extra=["--append-eod", "--workers", str(workers)])
    tokenizer = load_tokenizer(str(TOKENIZER))
    accepted = [is_document(text, tokenizer) for text in texts]
    if outcome.code == 0:
        expected = [tokenizer.encode(text) + [tokenizer.eod] for text in texts]
        if documents(str(workdir / "out" / "x_text_document")) != expected:
            raise InvariantBroken("megalign-preprocess wrote tokens other than the tokenizer's")
        if not all(accepted):
            raise InvariantBroken("megalign-preprocess accepted a blank, empty or non-Unicode "
                                  "document")
    else:
        bad = accepted.index(False) + 1 if not all(accepted) else None
        if bad is None or f"corpus.jsonl:{bad}:" not in outcome.stderr:
            raise InvariantBroken(f"megalign-preprocess refused good documents or named the "
                                  f"wrong line (first bad line: {bad}): {outcome.stderr}")
    return outcome


def preprocess_sft(workdir: Path, records: list, fmt: str, tokenizer: Path = TOKENIZER) -> Outcome:
    """``--sft fmt`` on arbitrary JSON values, one per line."""
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    return preprocess(workdir, data, extra=["--sft", fmt], tokenizer=tokenizer)


# ----------------------------------------------------------------------------- configs


def dotted_keys(tree, prefix: str = "") -> list[str]:
    """Every key of a nested mapping, dotted, with every prefix: what an error may name."""
    keys = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            keys += [name, *dotted_keys(value, name + ".")]
    return keys


def train_check(workdir: Path, config: bytes, overrides: list[str], base: dict,
                keys: Iterable[str] = (), path: Optional[Path] = None) -> Outcome:
    """``megalign-train --check --config TINY --config BASE --config FILE <overrides>``: the
    config, tokenizer and datasets are checked as a run checks them before it starts. ``base``:
    what makes the tiny config valid for one process; ``keys``: the keys ``config`` holds;
    ``path``: where FILE is written (default: a directory of its own)."""
    import yaml

    from megalign.cli.train import main

    directory = fresh(workdir / "config")
    (directory / "base.yaml").write_text(yaml.safe_dump(base))
    path = path or directory / "fuzzed.yaml"
    path.write_bytes(config)
    outcome = run_main(main, ["--check", "--config", str(TINY_CONFIG), "--config",
                              str(directory / "base.yaml"), "--config", str(path), *overrides])
    names = [str(path), *overrides, *keys,
             *(text.split("=", 1)[0] for text in overrides),
             *(part for text in overrides for part in dotted_keys_of_override(text))]
    check(outcome, "megalign-train", names)
    return outcome


def dotted_keys_of_override(text: str) -> list[str]:
    key = text.split("=", 1)[0].strip()
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


# ----------------------------------------------------------------------------- checkpoints


def load_common(directory: Path) -> dict:
    """The common state of a checkpoint, in either release's format: common.pt (Megatron-Core
    0.16) or an object inside the distributed checkpoint (0.19)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(directory))


def save_common(directory: Path, common: dict) -> None:
    """Writes ``common`` as common.pt, which both releases read before anything else."""
    import torch

    torch.save(common, directory / "common.pt")


def copy_checkpoint(checkpoint: Path, workdir: Path) -> Path:
    """A root holding a copy of ``checkpoint`` and a ``latest`` naming it."""
    root = fresh(workdir / "ckpt")
    shutil.copytree(checkpoint, root / checkpoint.name)
    (root / "latest").write_text(checkpoint.name + "\n")
    return root


COMMANDS = ("generate", "eval", "convert")


def open_checkpoint(workdir: Path, root: Path, command: str) -> Outcome:
    """A megalign command given the checkpoint root ``root``: megalign-generate (one prompt, a
    few tokens), megalign-eval (a few held-out samples of ``--data``), megalign-convert to a
    transformers directory."""
    output = fresh(workdir / "output")
    if command == "generate":
        from megalign.cli.generate import main

        argv = ["--checkpoint", str(root), "--prompt", "In the beginning", "--gen-length", "4",
                "--steps", "2", "--output", str(output / "out.jsonl")]
        prog = "megalign-generate"
    elif command == "eval":
        from megalign.cli.evaluate import main

        argv = ["--checkpoint", str(root), "--samples", "2", "--t-grid", "1",
                "--output", str(output / "eval.json")]
        prog = "megalign-eval"
    else:
        from megalign.cli.convert import main

        argv = ["--from", "megalign", "--to", "hf", "--input", str(root),
                "--output", str(output / "hf")]
        prog = "megalign-convert"
    outcome = run_main(main, argv)
    check(outcome, prog, [root], output)
    return outcome


def convert_hf(workdir: Path, source: Path, gguf_file: Optional[str] = None) -> Outcome:
    """megalign-convert --from hf on the Hugging Face directory ``source`` (its GGUF file
    ``gguf_file`` when given)."""
    from megalign.cli.convert import main

    output = fresh(workdir / "converted")
    outcome = run_main(main, ["--from", "hf", "--to", "megalign", "--input", str(source),
                              *(["--gguf-file", gguf_file] if gguf_file else []),
                              "--output", str(output / "model")])
    check(outcome, "megalign-convert", [source], output)
    return outcome
