"""megalign-preprocess and megalign-train-tokenizer as a user meets them on bad input, in a bad
environment and under Ctrl-C/SIGTERM: one line, exit code 2 (input), 1 (environment), 130/143
(signals), no traceback, nothing left behind. Each runs the real command in a process of its own;
the signals are real and go to its whole process group, as a terminal sends them."""

import gzip
import os
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import CORPUS, REPO, TOKENIZER, run_env

PREPROCESS = [sys.executable, "-m", "megalign.cli.preprocess"]
TRAIN_TOKENIZER = [sys.executable, "-m", "megalign.cli.train_tokenizer"]
OUTPUT_SUFFIXES = (".bin", ".idx", ".model", ".vocab")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


def preprocess(input_path, out, *extra, **kwargs) -> subprocess.CompletedProcess:
    return run([*PREPROCESS, "--input", str(input_path), "--tokenizer", str(TOKENIZER),
                "--output-prefix", str(out), "--append-eod", "--workers", "2", "--no-progress",
                *extra], **kwargs)


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in result.stderr, \
        result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def leftovers(directory) -> list[str]:
    """Outputs or temporaries anywhere under ``directory``."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                  for name in names if ".tmp-" in name or name.endswith(OUTPUT_SUFFIXES))


def write_gz_prefix(path, size: int) -> None:
    with gzip.open(CORPUS, "rb") as source:
        path.write_bytes(gzip.compress(source.read(size)))


def inputs(tmp_path) -> dict:
    """Bad inputs by name: (input file, extra arguments, output prefix)."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    write_gz_prefix(tmp_path / "whole.jsonl.gz", 200_000)
    data = (tmp_path / "whole.jsonl.gz").read_bytes()
    (tmp_path / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    with gzip.open(CORPUS, "rb") as source:
        (tmp_path / "plain.jsonl.gz").write_bytes(source.read(5000))
    (tmp_path / "a_file").write_text("")
    # valid JSON, not valid Unicode text: a lone surrogate (found by generated inputs, issue #31)
    (tmp_path / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    good = tmp_path / "whole.jsonl.gz"
    out = tmp_path / "out" / "x"
    return {
        "empty": (tmp_path / "empty.jsonl", [], out),
        "blank lines only": (tmp_path / "blank.jsonl", [], out),
        "truncated gzip": (tmp_path / "truncated.jsonl.gz", [], out),
        "plain file named .gz": (tmp_path / "plain.jsonl.gz", [], out),
        "prefix under a file": (good, [], tmp_path / "a_file" / "x"),
        "unknown eod token": (good, ["--eod-token", "<|nope|>"], out),
        "eod id out of range": (good, ["--eod-token", "4000"], out),
        "not a tokenizer": (good, ["--tokenizer", str(CORPUS)], out),
        "unknown option": (good, ["--frobnicate"], out),
        "lone surrogate": (tmp_path / "surrogate.jsonl", [], out),
    }


@pytest.mark.parametrize("case, message", [
    ("empty", "empty.jsonl: no documents to write (0 blank lines"),
    ("blank lines only", "blank.jsonl: no documents to write (3 blank lines"),
    ("truncated gzip", "truncated.jsonl.gz:"),
    ("plain file named .gz", "plain.jsonl.gz:1: not gzip data"),
    ("prefix under a file", "a_file' is a file, not a directory"),
    ("unknown eod token", "has no token '<|nope|>'"),
    ("eod id out of range", "end-of-document id 4000 is outside"),
    ("not a tokenizer", "kjv.jsonl.gz' cannot be read"),
    ("unknown option", "unrecognized arguments: --frobnicate"),
    ("lone surrogate", "surrogate.jsonl:2: invalid Unicode text in key 'text'"),
])
def test_preprocess_bad_input_is_one_line_exit_2(tmp_path, case, message):
    input_path, extra, out = inputs(tmp_path)[case]
    assert_one_line_error(preprocess(input_path, out, *extra), 2, message)
    assert leftovers(tmp_path) == []


def test_preprocess_truncated_gzip_names_where_it_ends(tmp_path):
    input_path, _, out = inputs(tmp_path)["truncated gzip"]
    result = preprocess(input_path, out)
    assert_one_line_error(result, 2, "the gzip data ends early (a truncated file)")
    line = int(result.stderr.split("truncated.jsonl.gz:")[1].split(":")[0])
    assert line > 1  # the lines before it were read; the run still wrote nothing


def test_preprocess_environment_errors_exit_1(tmp_path):
    big = tmp_path / "big.jsonl.gz"
    write_gz_prefix(big, 2_000_000)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # "disk full"

    assert_one_line_error(preprocess(big, tmp_path / "out" / "x", preexec_fn=limit), 1,
                          ".bin': File too large")
    assert leftovers(tmp_path / "out") == []
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o555)
        assert_one_line_error(preprocess(big, tmp_path / "locked" / "x"), 1, "Permission denied")
        assert leftovers(tmp_path / "locked") == []


def start(cmd, env=None) -> subprocess.Popen:
    """A command in a session (and process group) of its own, as a terminal starts it."""
    return subprocess.Popen(cmd, cwd=REPO, env={**run_env(), **(env or {})}, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_until(condition, process, seconds=120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


def finish_within(process, seconds: float) -> tuple[int, str]:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running {seconds} s after the signal")
    return process.returncode, process.stderr.read()


def session_processes(sid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


def start_preprocessing(tmp_path, *extra) -> subprocess.Popen:
    """A run on 30 x the bundled corpus, returned once it is writing its output."""
    process = start([*PREPROCESS, "--input", *[str(CORPUS)] * 30, "--tokenizer", str(TOKENIZER),
                     "--output-prefix", str(tmp_path / "out" / "big"), "--append-eod",
                     "--no-progress", *extra])

    def working():
        return any(".tmp-" in path and os.path.getsize(path) > 100_000
                   for path in leftovers(tmp_path / "out"))

    wait_until(working, process)
    return process


@pytest.mark.parametrize("signum, group, extra", [
    (signal.SIGINT, True, ["--workers", "2"]),  # Ctrl-C, three times: it hung in 2 of 3 tries
    (signal.SIGINT, True, ["--workers", "2"]),
    (signal.SIGINT, True, ["--workers", "2"]),
    (signal.SIGTERM, True, ["--workers", "2"]),
    (signal.SIGTERM, False, ["--workers", "2"]),  # kill PID: the main process alone
    (signal.SIGINT, True, ["--workers", "1"]),
    (signal.SIGINT, True, ["--workers", "2", "--partitions", "2"]),
    (signal.SIGTERM, False, ["--workers", "2", "--partitions", "2"]),
])
def test_preprocess_stops_on_signals_leaving_nothing(tmp_path, signum, group, extra):
    process = start_preprocessing(tmp_path, *extra)
    (os.killpg if group else os.kill)(process.pid, signum)
    code, stderr = finish_within(process, 10)
    assert code == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip() == f"megalign-preprocess: stopped by {name}; no output written"
    assert leftovers(tmp_path / "out") == []
    assert session_processes(process.pid) == []  # no worker outlives it


def test_preprocess_reports_a_killed_worker(tmp_path):
    process = start_preprocessing(tmp_path, "--workers", "2")
    psutil.Process(process.pid).children()[0].kill()  # as the out-of-memory killer would
    code, stderr = finish_within(process, 10)
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "tokenizing worker" in stderr and "died (killed by SIGKILL" in stderr
    assert leftovers(tmp_path / "out") == []
    assert session_processes(process.pid) == []


def train_tokenizer(tmp_path, *args) -> subprocess.CompletedProcess:
    return run([*TRAIN_TOKENIZER, "--output-prefix", str(tmp_path / "out" / "tok"), *args])


def test_train_tokenizer_failures_are_one_line(tmp_path):
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    assert_one_line_error(train_tokenizer(tmp_path, "--input", str(tmp_path / "blank.jsonl")), 2,
                          "blank.jsonl: no documents to train on (2 blank lines)")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": broken\n')
    assert_one_line_error(train_tokenizer(tmp_path, "--input", str(tmp_path / "bad.jsonl")), 2,
                          "bad.jsonl:2: malformed JSON")
    assert_one_line_error(train_tokenizer(tmp_path, "--input", str(CORPUS), "--vocab-size",
                                          "100000"), 2, "Vocabulary size too high")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "a \\ud800 b"}\n')
    assert_one_line_error(train_tokenizer(tmp_path, "--input", str(tmp_path / "surrogate.jsonl")),
                          2, "surrogate.jsonl:1: invalid Unicode text")
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(run([*TRAIN_TOKENIZER, "--input", str(CORPUS), "--output-prefix",
                               str(tmp_path / "a_file" / "tok")]), 2, "is a file")
    assert_one_line_error(run([*TRAIN_TOKENIZER, "--input", str(CORPUS)]), 2,
                          "required: --output-prefix")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_train_tokenizer_stops_on_signals_leaving_nothing(tmp_path, signum):
    """The signal arrives while SentencePiece trains (in C++, which Python cannot interrupt)."""
    (tmp_path / "tmp").mkdir()
    process = start([*TRAIN_TOKENIZER, "--input", *[str(CORPUS)] * 3, "--vocab-size", "8000",
                     "--model-type", "unigram", "--output-prefix", str(tmp_path / "out" / "tok")],
                    env={"TMPDIR": str(tmp_path / "tmp")})
    wait_until(lambda: psutil.Process(process.pid).children(), process)  # the trainer
    os.killpg(process.pid, signum)
    code, stderr = finish_within(process, 10)
    assert code == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip() == f"megalign-train-tokenizer: stopped by {name}; no output written"
    assert leftovers(tmp_path / "out") == [] and os.listdir(tmp_path / "tmp") == []
    assert session_processes(process.pid) == []
