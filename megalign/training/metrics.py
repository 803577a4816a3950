"""Rank-0 logging: a Megatron-style console line, TensorBoard scalars and ``metrics.jsonl``.

``metrics.jsonl`` gets one JSON object per logged iteration, written with a single ``write`` of a
complete line and flushed, so the file stays valid JSON lines when the run is killed. Held-out
evaluations (``evaluation.interval``) go to ``validation.jsonl`` the same way, so every line of
``metrics.jsonl`` keeps one schema.
"""

# Imports inside functions are deliberate here: TensorBoard is imported only when
# logging.tensorboard is on (a slow import).

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from megalign.config import LoggingConfig

# the held-out metric of each objective (megalign/training/validator.py) and its console name
VALIDATION_MAIN = {"val_nelbo": "diffusion NELBO per token", "val_nll": "next-token NLL"}
# optional held-out metrics and their console names
VALIDATION_EXTRAS = {
    "val_ood_nelbo": "NELBO on the unseen corpus",
    "val_ood_nll": "NLL on the unseen corpus",
    "infill_exact_match": "infill exact match",
    "gen_ppl": "generative PPL",
    "gen_distinct": "distinct tokens",
    "gen_punctuation": "punctuation",
}


class MetricsLogger:
    """What a run reports, and when: every ``logging.log_interval`` iterations and the last one
    (the loop hands it every iteration's record). Only the rank given ``enabled`` writes."""

    def __init__(self, config: LoggingConfig, train_iters: int, enabled: bool):
        self.enabled = enabled
        self.interval, self.train_iters = config.log_interval, train_iters
        self._writer = None
        self._jsonl = None
        self._validation_path = os.path.join(config.run_dir, "validation.jsonl")
        if not enabled:
            return
        os.makedirs(config.run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(config.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(config.run_dir, "tensorboard"))

    def should_log(self, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == self.train_iters

    def log(self, record: dict) -> None:
        """A training iteration's record, if this iteration is one to report."""
        if not self.enabled or not self.should_log(record["iteration"]):
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key == "iteration":
                    continue
                if isinstance(value, list):
                    for index, item in enumerate(value):
                        self._writer.add_scalar(f"{key}/layer_{index:02d}", item, step)
                else:
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        print(console_line(record, self.train_iters), flush=True)

    def log_validation(self, record: dict) -> None:
        """One held-out evaluation: a line in ``validation.jsonl``, TensorBoard, the console."""
        if not self.enabled:
            return
        with open(self._validation_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        main = next(key for key in VALIDATION_MAIN if key in record)
        extra = {key: record[key] for key in VALIDATION_EXTRAS if record.get(key) is not None}
        if self._writer is not None:
            self._writer.add_scalar(f"validation/{main.removeprefix('val_')}", record[main],
                                    record["iteration"])
            for key, value in extra.items():
                self._writer.add_scalar(f"validation/{key}", value, record["iteration"])
            self._writer.flush()
        print(f" validation at iteration {record['iteration']:8d} | {VALIDATION_MAIN[main]}: "
              f"{record[main]:.6E} (s.e. {_fmt(record.get(main + '_se'), '.2E')}) | PPL upper "
              f"bound: {record['val_ppl_upper_bound']:.3E} |"
              + "".join(f" {VALIDATION_EXTRAS[key]}: {value:.4g} |" for key, value in extra.items())
              + f" eval time (s): {record['eval_time_s']:.1f} |", flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


def console_line(record: dict, train_iters: int) -> str:
    parts = [
        f" iteration {record['iteration']:8d}/{train_iters:8d}",
        f"elapsed time per iteration (ms): {record['step_time_s'] * 1000:.1f}",
        f"tokens/s: {record['tokens_per_s']:.0f}",
        f"learning rate: {record['lr']:.6E}",
        f"loss: {record['loss']:.6E}",
        f"diffusion loss: {record['diffusion_loss']:.6E}",
        *([f"dlm term: {record['dlm_loss']:.6E}", f"ar term: {record['ar_loss']:.6E}"]
          if "ar_loss" in record else []),
        *([f"kd term: {record['kd_loss']:.6E}"] if "kd_loss" in record else []),
        f"align loss: {record['align_loss']:.6E}",
        *([f"teacher loss: {record['teacher_loss']:.6E}"] if "teacher_loss" in record else []),
        *([f"attention open: {record['attention_open']:.3f}"]
          if "attention_open" in record else []),
        f"grad norm: {_fmt(record['grad_norm'])}",
    ]
    if "moe_aux_loss" in record:
        parts.insert(-1, f"load-balancing loss: {record['moe_aux_loss']:.6E}")
    cos = record.get("align_cos")
    if cos:
        parts.append("align cos: [" + " ".join(f"{c:.3f}" for c in cos) + "]")
    if record.get("expert_load"):  # per layer: the busiest expert's tokens over the mean
        parts.append("expert load: [" + " ".join(f"{x:.2f}" for x in record["expert_load"]) + "]")
    return " | ".join(parts) + " |"


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else f"{value:{spec}}"
