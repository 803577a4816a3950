"""megalign-train: convert an AR model into a masked diffusion LM, optionally with REPR-ALIGN.

    torchrun --nproc-per-node N -m megalign.cli.train --config FILE [key.sub=value ...]

The configuration is checked before any process group exists (bad input: one line, exit 2);
training is megalign/training/trainer.py. A failed run exits 1 with one line per rank naming the
error (and, when a rank died or stalled, which one); bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from functools import partial

from megalign.errors import USER_ERRORS, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalign-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", action="append",
                        help="YAML run configuration(s), merged in order (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.weight=10")
    return parser


def load_and_validate(args, world_size: int):
    """Config (read-only from here on) and tokenizer, fully checked once; nothing distributed
    has started yet."""
    from megalign.config import freeze, load_config, validate
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
    return freeze(cfg), tokenizer


def write_resolved_config(cfg) -> None:
    import yaml

    from megalign.config import to_dict

    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)


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

    faulthandler.enable()  # a SIGBUS/SIGSEGV still says where
    args = build_parser().parse_args(argv)
    launch = distributed.launch_env()
    try:
        cfg, tokenizer = load_and_validate(args, launch.world_size)
    except (ConfigError, OSError, ValueError) as err:
        print(f"megalign-train: error: {err}", file=sys.stderr)
        return 2
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
