"""Preprocessing throughput: megalign-preprocess at 1 and 2 workers, side by side with
Megatron-LM's tools/preprocess_data.py when a checkout is given.

    python bench/preprocess.py [--repeat 5] [--megatron-lm DIR [--megatron-lm-path EXTRA]]

Input: the bundled corpus written out ``--repeat`` times as one plain JSONL file; tokenizer: the
bundled SentencePiece model. Each command is timed end to end (process start included) and the
outputs are checked to be byte-identical. Megatron-LM needs its own ``megatron/training`` tree and
its imports (six, triton) on ``--megatron-lm-path``; it is not a megalign dependency.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data/corpus/kjv.jsonl.gz"
TOKENIZER = REPO / "data/tokenizer/kjv_bpe4k.model"


def timed(cmd, env) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--megatron-lm", help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--megatron-lm-path", default="", help="extra PYTHONPATH for Megatron-LM")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    data = work / "corpus.jsonl"
    with gzip.open(CORPUS, "rb") as source:
        text = source.read()
    data.write_bytes(text * args.repeat)
    megabytes = data.stat().st_size / 1e6
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    rows, outputs = [], {}
    for workers in (1, 2):
        prefix = work / f"megalign_w{workers}"
        seconds = timed([sys.executable, "-m", "megalign.data.preprocess", "--input", str(data),
                         "--tokenizer", str(TOKENIZER), "--output-prefix", str(prefix),
                         "--append-eod", "--workers", str(workers), "--no-progress"], env)
        rows.append(("megalign", workers, seconds))
        outputs[("megalign", workers)] = prefix
    if args.megatron_lm:
        mlm_env = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (args.megatron_lm, args.megatron_lm_path) if p))
        for workers in (1, 2):
            prefix = work / f"megatron_w{workers}"
            seconds = timed([sys.executable, os.path.join(args.megatron_lm, "tools/preprocess_data.py"),
                             "--input", str(data), "--output-prefix", str(prefix),
                             "--tokenizer-type", "SentencePieceTokenizer",
                             "--tokenizer-model", str(TOKENIZER), "--append-eod",
                             "--workers", str(workers)], mlm_env)
            rows.append(("Megatron-LM", workers, seconds))
            outputs[("Megatron-LM", workers)] = prefix

    tokens = None
    reference = (str(outputs[("megalign", 1)]) + "_text_document.bin")
    for (tool, workers), prefix in outputs.items():
        same = Path(str(prefix) + "_text_document.bin").read_bytes() == Path(reference).read_bytes()
        if not same:
            print(f"warning: {tool} workers={workers} output differs from megalign workers=1")
    tokens = (Path(reference).stat().st_size) // 2  # uint16 tokens
    print(f"input: {megabytes:.1f} MB of JSONL ({args.repeat} x bundled corpus), {tokens} tokens")
    print(f"{'tool':<12} {'workers':>7} {'seconds':>8} {'MB/s':>7} {'tokens/s':>10}")
    for tool, workers, seconds in rows:
        print(f"{tool:<12} {workers:>7} {seconds:>8.2f} {megabytes / seconds:>7.2f} "
              f"{tokens / seconds:>10.0f}")
    if args.megatron_lm:
        for workers in (1, 2):
            ours = next(s for t, w, s in rows if t == "megalign" and w == workers)
            theirs = next(s for t, w, s in rows if t == "Megatron-LM" and w == workers)
            print(f"speed ratio megalign / Megatron-LM at {workers} worker(s): {theirs / ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
