"""Longer fuzz runs than the suite's bounded one (README, "Bad input").

    python tests/fuzz/run.py --scale 50 [-k corpus]      # tests/test_fuzz.py, 50x the examples,
                                                         # drawn at random (hypothesis)
    python tests/fuzz/run.py --atheris corpus -- -max_total_time=600   # coverage-guided
    python tests/fuzz/run.py --atheris config -- -max_total_time=600

hypothesis explores every reader with structured inputs; atheris (``pip install -e .[fuzz]``)
mutates raw bytes of a JSONL corpus or a YAML config under coverage guidance, for the byte-level
readers where that pays. Both check the invariant of tests/fuzz/targets.py; a failure prints the
input that broke it (hypothesis: a reproduce blob; atheris: a crash-* file).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: `fuzz` as the suite imports it


def run_hypothesis(scale: int, expression: str | None) -> int:
    command = [sys.executable, "-m", "pytest", str(HERE.parent / "test_fuzz.py"), "-q",
               "-p", "no:cacheprovider", *(["-k", expression] if expression else [])]
    return subprocess.call(command, cwd=HERE.parents[1],
                           env={**os.environ, "MEGALIGN_FUZZ_SCALE": str(scale)})


def run_atheris(target: str, fuzzer_args: list[str]) -> int:
    import atheris

    from fuzz import strategies, targets

    workdir = Path(tempfile.mkdtemp(prefix="megalign-fuzz-"))
    samples = strategies.corpus_sample(str(targets.REPO / "data" / "corpus" / "kjv.jsonl.gz"))
    for module in ("megalign.cli.train", "megalign.data.preprocess"):  # instrumented below
        importlib.import_module(module)

    if target == "corpus":
        seed, body = samples["corpus.jsonl"], lambda data: targets.read_corpus(workdir, data)
    else:
        (workdir / "seed").mkdir()
        from megalign.data.preprocess import preprocess

        prefix = preprocess([str(targets.REPO / "data" / "corpus" / "kjv.jsonl.gz")],
                            str(targets.TOKENIZER), str(workdir / "seed" / "kjv"), "text", True,
                            progress=False)
        base = {"parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
                "data": {"global_batch_size": 2, "paths": [prefix],
                         "tokenizer": str(targets.TOKENIZER), "eod_token": None}}
        seed, body = targets.TINY_CONFIG.read_bytes(), lambda data: targets.train_check(
            workdir, data, [], base, strategies.KEYS)
    atheris.instrument_all()  # coverage of every Python function loaded by now
    corpus_dir = workdir / "inputs"
    corpus_dir.mkdir()
    (corpus_dir / "seed").write_bytes(seed)
    atheris.Setup([sys.argv[0], *fuzzer_args, str(corpus_dir)], body)
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=20, help="times the suite's examples")
    parser.add_argument("-k", dest="expression", help="only the tests pytest -k selects")
    parser.add_argument("--atheris", choices=["corpus", "config"],
                        help="coverage-guided byte mutation of one reader instead")
    parser.add_argument("fuzzer_args", nargs="*", help="after --: libFuzzer's options")
    args = parser.parse_args()
    if args.atheris:
        return run_atheris(args.atheris, args.fuzzer_args)
    return run_hypothesis(args.scale, args.expression)


if __name__ == "__main__":
    sys.exit(main())
