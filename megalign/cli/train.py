"""megalign-train: convert an AR model into a masked diffusion LM, optionally with REPR-ALIGN.

    torchrun --nproc-per-node N -m megalign.cli.train --config FILE [key.sub=value ...]

The configuration is checked before any process group exists (bad input: one line, exit 2);
training is megalign/training/trainer.py. A failed run exits 1 with one line per rank naming the
error (and, when a rank died or stalled, which one); bugs keep their traceback.
"""

# Imports inside functions are deliberate here: a command checks its configuration before importing
# torch and Megatron-Core (fast --help, --check and usage errors).

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from functools import partial

from megalign.cli.common import ArgumentParser
from megalign.errors import USER_ERRORS, ConfigError, one_line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="megalign-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", action="append",
                        help="YAML run configuration(s), merged in order (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.weight=10")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration and tokenizer, print the resolved config "
                             "(YAML) and exit: 0 valid, 2 not; starts nothing")
    return parser


def load_and_validate(args, world_size: int):
    """Config (read-only from here on) and tokenizer, fully checked once; nothing distributed
    has started yet."""
    from megalign.config import load_config, validate
    from megalign.data.tokenizer import build_tokenizer
    from megalign.model.gpt import check_platform

    cfg = load_config(args.config, args.overrides)
    check_platform(cfg)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty; give a SentencePiece .model, a tokenizer.json "
                          "or a Hugging Face tokenizer directory")
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: {err}") from None
    validate(cfg, world_size, tokenizer.vocab_size, tokenizer.mask)
    return cfg, tokenizer


def check_data_files(cfg) -> None:
    """Every dataset the run reads exists and is whole, checked before anything starts (a run
    would otherwise find out on some rank while building its datasets)."""
    from megalign.config import parse_blend
    from megalign.data.indexed import check_indexed_dataset
    from megalign.errors import DataError

    for key, paths in (("data.paths", cfg.data.paths), ("evaluation.paths", cfg.evaluation.paths),
                       ("evaluation.ood_paths", cfg.evaluation.ood_paths)):
        for prefix in parse_blend(paths, key)[0]:
            try:
                check_indexed_dataset(prefix)
            except DataError as err:
                raise DataError(f"{key}: {err}") from None


def resolved_config_yaml(cfg) -> str:
    import yaml

    from megalign.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved_config(cfg) -> None:
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write(resolved_config_yaml(cfg))


def _attempt(cfg, tokenizer, store) -> None:
    """One attempt under in-process restart: errors a restart cannot fix end the wrapper."""
    from megalign.training.inprocess import Unrecoverable
    from megalign.training.trainer import run

    try:
        run(cfg, tokenizer, store)
    except USER_ERRORS as err:
        raise Unrecoverable(err) from err


def main(argv=None) -> int:
    from megalign import distributed
    from megalign.errors import first_line
    from megalign.training import inprocess, watchdog
    from megalign.training.trainer import run

    args = build_parser().parse_args(argv)
    launch = distributed.launch_env()
    try:
        cfg, tokenizer = load_and_validate(args, launch.world_size)
        check_data_files(cfg)  # a missing or damaged dataset is named before anything starts
    except (ConfigError, OSError, ValueError) as err:
        print(f"megalign-train: error: {one_line(err)}", file=sys.stderr)
        return 2
    if args.check:
        sys.stdout.write(resolved_config_yaml(cfg))
        return 0
    faulthandler.enable()  # a SIGBUS/SIGSEGV in training still says where
    if launch.rank == 0:
        write_resolved_config(cfg)
    try:
        if cfg.resilience.inprocess_restart:
            inprocess.restartable(cfg, partial(_attempt, cfg, tokenizer))()
        else:
            run(cfg, tokenizer)
    except (*USER_ERRORS, inprocess.Unrecoverable, inprocess.RestartsExhausted) as err:
        err = getattr(err, "error", err)
        print(f"megalign-train: error on rank {launch.rank}: {err}", file=sys.stderr, flush=True)
        watchdog.publish_failure(str(err))
        return 1
    except Exception as err:
        if not watchdog.is_communication_error(err):  # a bug: tell the others, keep the traceback
            watchdog.publish_failure(f"{type(err).__name__}: {err}")
            raise
        print(f"megalign-train: error on rank {launch.rank}: a distributed call failed "
              f"({first_line(err)}); when another rank died or stalled, the watchdog or its own "
              f"log names it (collective timeout: resilience.collective_timeout_minutes="
              f"{cfg.resilience.collective_timeout_minutes:g})", file=sys.stderr, flush=True)
        watchdog.await_verdict()  # names the failed rank and exits, within failure_timeout_s
        return 1
    finally:
        watchdog.stop()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
