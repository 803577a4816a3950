"""Shared fixtures: the bundled corpus as Megatron indexed files, an AR checkpoint, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny.yaml"
TOKENIZER = REPO / "data" / "tokenizer" / "kjv_bpe4k.model"
CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.gz"
INSTRUCTIONS = REPO / "data" / "corpus" / "kjv_instructions.jsonl.gz"
WORKERS = REPO / "tests" / "workers"


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc: int, script, args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes; fails the test with the output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-8000:]}")
    return result


def run_python(args, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-8000:]}")
    return result


def launch(nproc, args, launcher=(), env=None, **kwargs) -> subprocess.Popen:
    """Start torchrun (``launcher``: extra torchrun options) without waiting for it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *launcher, *args]
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(cmd, cwd=REPO, env=env or run_env(), text=True,
                            start_new_session=True, **kwargs)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def kill_group(process):
    """SIGKILL torchrun and every worker (the workers run in sessions of their own)."""
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.communicate()


def metrics(run_dir) -> dict:
    """metrics.jsonl by iteration (the last record wins: a restarted run logs again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["iteration"]: r for r in map(json.loads, path.read_text().splitlines())}


def chat_tokenizer(out: Path, chat_template=None) -> tuple[Path, Path]:
    """A tiny BPE tokenizer laid out like SmolLM2's: <|endoftext|>=0, <|im_start|>=1,
    <|im_end|>=2, written as a tokenizer.json and as a directory whose eos_token is the chat
    end-of-turn <|im_end|> (as megalign-convert writes SmolLM2's), with ``chat_template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megalign.data.preprocess import read_jsonl

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"])
    hf.train_from_iterator(list(read_jsonl(str(CORPUS)))[:50], trainer)
    hf.save(str(out / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>",
                            chat_template=chat_template).save_pretrained(
        str(out / "hf_dir"))
    return out / "tokenizer.json", out / "hf_dir"


class StartsNoProcess:
    """subprocess.Popen inside a unit test: refused, so the marker cannot drift."""

    def __init__(self, args, *rest, **kwargs):
        raise AssertionError(f"a unit test starts no process (it ran {args!r}): mark it "
                             "otherwise, or make it call the library in-process")


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """The unit tier (``-m unit``) runs in this process alone: no torchrun, no subprocess."""
    if request.node.get_closest_marker("unit"):
        monkeypatch.setattr(subprocess, "Popen", StartsNoProcess)


@pytest.fixture(scope="session")
def corpus_prefix(tmp_path_factory) -> str:
    from megalign.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("corpus")
    return preprocess([str(CORPUS)], str(TOKENIZER), str(out / "kjv"), "text", True)


@pytest.fixture(scope="session")
def sft_prefix(tmp_path_factory) -> str:
    """The bundled instruction set (prompt/response pairs) with its loss-mask stream."""
    from megalign.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("sft")
    return preprocess([str(INSTRUCTIONS)], str(TOKENIZER), str(out / "kjv_instructions"),
                      sft="prompt:response")


@pytest.fixture(scope="session")
def data_overrides(corpus_prefix, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("index_cache")
    return [f"data.paths=[{corpus_prefix}]", f"data.tokenizer={TOKENIZER}", "data.eod_token=null",
            f"data.cache_dir={cache}", "logging.tensorboard=false"]


def make_ar_checkpoint(out, data_overrides, extra=()) -> str:
    """'AR weights' shared by every layout: a tiny model written with dist_checkpointing."""
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, *data_overrides,
                "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                "schedule.train_iters=1", "schedule.warmup_iters=0", "align.weight=0",
                f"logging.run_dir={out}/run", f"checkpoint.save={out}/ckpt", *extra])
    return str(out / "ckpt" / "iter_0000001")


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory, data_overrides) -> str:
    return make_ar_checkpoint(tmp_path_factory.mktemp("ar"), data_overrides)


# Qwen3's attention: RMSNorm over each head's queries and keys, heads of 32 (not 64 / 4)
QWEN3 = ["model.qk_norm=true", "model.head_dim=32"]
# a Qwen3-MoE-like model: 4 experts of 64 per layer, top 2 of a softmax over all (not
# renormalised), QK-norm, a load-balancing loss large enough to move the gradients, and
# Qwen2-MoE's shared expert (48 wide) behind a sigmoid gate
MOE = [*QWEN3, "model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_topk=2",
       "model.moe_router_pre_softmax=true", "model.moe_aux_loss_coeff=0.1",
       "model.moe_shared_expert_ffn_hidden_size=48", "model.moe_shared_expert_gate=true"]


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory, data_overrides) -> str:
    """The AR checkpoint of the tiny mixture-of-experts model (``MOE``)."""
    return make_ar_checkpoint(tmp_path_factory.mktemp("moe_ar"), data_overrides, MOE)
