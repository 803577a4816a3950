"""Preprocessing throughput: megalign-preprocess at 1 and 2 workers, side by side with
Megatron-LM's tools/preprocess_data.py when a checkout is given.

    python bench/preprocess.py [--copies 5] [--repeats 4] [--tokenizer PATH]
        [--megatron-lm DIR [--megatron-lm-path EXTRA]] [--out bench/results/preprocess]

Input: the bundled corpus written out ``--copies`` times as one plain JSONL file; tokenizer: the
bundled SentencePiece model unless ``--tokenizer`` names another (a Hugging Face directory is given
to Megatron-LM as ``HuggingFaceTokenizer``; it ends documents with the directory's eos token, so
pass that token to ``--eod-token`` for byte-identical outputs). Each command is timed end to end
(process start included), the two tools alternating within each of ``--repeats`` rounds (which
one goes first alternates too), and the medians are reported; the outputs are checked to be
byte-identical. Two reference rates come from the same documents: the tokenizer's own batched
encoding (``encode_batch`` over batches of the size megalign's workers get, one thread, in this
process) and megalign's in-loop rate (reading, tokenizing and writing, without start-up: its
summary line). Targets (issue #21): megalign's wall time at most 1/1.5 of Megatron-LM's at each
worker count, and its in-loop rate at least 0.8 x the batched rate x workers. Megatron-LM needs
its own ``megatron/training`` tree and its imports (six, triton) on ``--megatron-lm-path``; it is
not a megalign dependency. Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalign.data.preprocess import BATCH_DOCS  # noqa: E402
from megalign.data.tokenizer import build_tokenizer  # noqa: E402

CORPUS = REPO / "data/corpus/kjv.jsonl.gz"
TOKENIZER = REPO / "data/tokenizer/kjv_bpe4k.model"
WORKERS = (1, 2)
LOOP_RATE = re.compile(r"tokenizing loop [0-9.]+ s \(([0-9.]+) MB/s\)")
TOKENS = re.compile(r"documents, ([0-9]+) tokens")


def timed(cmd, env) -> tuple[float, str]:
    """Wall seconds of ``cmd`` and its stderr."""
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds, result.stderr


def megalign_command(data, tokenizer, prefix, workers, eod_token):
    return [sys.executable, "-m", "megalign.cli.preprocess", "--input", str(data),
            "--tokenizer", str(tokenizer), "--output-prefix", str(prefix), "--append-eod",
            "--workers", str(workers), "--no-progress",
            *(["--eod-token", eod_token] if eod_token else [])]


def megatron_command(megatron_lm, data, tokenizer, prefix, workers):
    kind = "HuggingFaceTokenizer" if Path(tokenizer).is_dir() else "SentencePieceTokenizer"
    return [sys.executable, os.path.join(megatron_lm, "tools/preprocess_data.py"),
            "--input", str(data), "--output-prefix", str(prefix), "--tokenizer-type", kind,
            "--tokenizer-model", str(tokenizer), "--append-eod", "--workers", str(workers)]


def batched_rate(data: Path, tokenizer_path, repeats: int) -> float:
    """MB/s of JSONL input that the tokenizer's batch API encodes on one thread (median)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in each megalign worker
    tokenizer = build_tokenizer(str(tokenizer_path))
    texts = [json.loads(line)["text"] for line in data.read_bytes().splitlines() if line.strip()]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH_DOCS):
            tokenizer.encode_batch(texts[i:i + BATCH_DOCS])
        seconds.append(time.perf_counter() - start)
    return data.stat().st_size / 1e6 / statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5, help="copies of the bundled corpus")
    parser.add_argument("--repeats", type=int, default=4, help="alternating rounds (medians)")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--eod-token", help="megalign's --eod-token (see above)")
    parser.add_argument("--megatron-lm", help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--megatron-lm-path", default="", help="extra PYTHONPATH for Megatron-LM")
    parser.add_argument("--out", default=str(REPO / "bench/results/preprocess"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    data = work / "corpus.jsonl"
    with gzip.open(CORPUS, "rb") as source:
        data.write_bytes(source.read() * args.copies)
    megabytes = data.stat().st_size / 1e6
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mlm_env = dict(env, PYTHONPATH=os.pathsep.join(
        p for p in (args.megatron_lm, args.megatron_lm_path) if p))
    tools = ["megalign", "Megatron-LM"] if args.megatron_lm else ["megalign"]

    runs, outputs, tokens = [], {}, None
    for round_index in range(args.repeats):
        for workers in WORKERS:
            order = tools if round_index % 2 == 0 else tools[::-1]
            for tool in order:
                prefix = work / f"{tool}_w{workers}_r{round_index}"
                if tool == "megalign":
                    cmd = megalign_command(data, args.tokenizer, prefix, workers, args.eod_token)
                    seconds, stderr = timed(cmd, env)
                    loop = float(LOOP_RATE.search(stderr).group(1))
                    tokens = int(TOKENS.search(stderr).group(1))
                else:
                    cmd = megatron_command(args.megatron_lm, data, args.tokenizer, prefix, workers)
                    seconds, loop = timed(cmd, mlm_env)[0], None
                runs.append({"tool": tool, "workers": workers, "round": round_index,
                             "seconds": seconds, "in_loop_MB_s": loop})
                outputs[(tool, workers, round_index)] = Path(f"{prefix}_text_document")
                print(f"round {round_index}: {tool} workers={workers}: {seconds:.2f} s",
                      file=sys.stderr)

    reference = outputs[("megalign", 1, 0)]
    identical = all(Path(f"{p}{ext}").read_bytes() == Path(f"{reference}{ext}").read_bytes()
                    for p in outputs.values() for ext in (".bin", ".idx"))
    batched = batched_rate(data, args.tokenizer, args.repeats)
    results = {"input": {"copies": args.copies, "megabytes": megabytes, "tokens": tokens},
               "tokenizer": str(args.tokenizer), "repeats": args.repeats,
               "outputs_identical": identical, "batched_encode_MB_s_one_thread": batched,
               "runs": runs, "medians": {}}
    print(f"input: {megabytes:.1f} MB of JSONL ({args.copies} x bundled corpus), {tokens} "
          f"tokens; outputs "
          f"{'byte-identical' if identical else 'DIFFER'}; tokenizer batched on one thread: "
          f"{batched:.2f} MB/s")
    print(f"{'tool':<12} {'workers':>7} {'median s':>9} {'MB/s':>7} {'in-loop MB/s':>13} "
          f"{'in-loop / (batched x workers)':>30}")
    for tool in tools:
        for workers in WORKERS:
            mine = [r for r in runs if r["tool"] == tool and r["workers"] == workers]
            seconds = statistics.median(r["seconds"] for r in mine)
            median = {"seconds": seconds, "MB_s": megabytes / seconds}
            line = f"{tool:<12} {workers:>7} {seconds:>9.2f} {megabytes / seconds:>7.2f}"
            if tool == "megalign":
                loop = statistics.median(r["in_loop_MB_s"] for r in mine)
                median.update(in_loop_MB_s=loop, in_loop_share=loop / (batched * workers))
                line += f" {loop:>13.2f} {loop / (batched * workers):>30.2f}"
            results["medians"][f"{tool} workers={workers}"] = median
            print(line)
    if args.megatron_lm:
        for workers in WORKERS:
            ratio = (results["medians"][f"Megatron-LM workers={workers}"]["seconds"]
                     / results["medians"][f"megalign workers={workers}"]["seconds"])
            results["medians"][f"speed ratio workers={workers}"] = ratio
            print(f"speed ratio megalign / Megatron-LM at {workers} worker(s): {ratio:.2f} "
                  "(target >= 1.5)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
