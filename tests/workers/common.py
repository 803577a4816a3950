"""The set-up the worker scripts share: their arguments, the run config and tokenizer, and (on
one process) megalign's process groups."""

import argparse

from megalign import distributed
from megalign.config import load_config
from megalign.data.tokenizer import build_tokenizer
from megalign.data.vocabulary import Vocabulary

ONE_PROCESS = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]


def arguments(*options: str, **typed) -> argparse.Namespace:
    """``--config``, ``--out`` and config overrides, plus the required string ``options`` and
    the ``typed`` ones (name -> default; the default's type)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--out", required=True)
    for name in options:
        parser.add_argument(f"--{name}", required=True)
    for name, default in typed.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def config_and_tokenizer(args, one_process: bool = False, extra=(), tokenizer: bool = True):
    """The run config (with ``extra`` overrides) and its tokenizer (None unless ``tokenizer``)."""
    cfg = load_config(args.config, [*args.overrides, *(ONE_PROCESS if one_process else ()), *extra])
    return cfg, build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token) if tokenizer else None


def start_one_process(cfg, tokenizer) -> Vocabulary:
    """TP = PP = 1 process groups; the run's vocabulary."""
    distributed.initialize(distributed.launch_env(), 1, 1, cfg.seed)
    return Vocabulary.of(cfg, tokenizer)
