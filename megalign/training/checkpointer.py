"""The checkpointing policy of a run: where it resumes from, when it saves, what a failed save
does, and which AR weights are its teacher.

Why one component: the choices interact (a restarted job must resume its own ``latest`` before
the ``checkpoint.load`` it started from; the teacher of a resumed run is the AR model its
checkpoint records; a failed save may or may not stop the run) and the training loop only asks
``should_save`` and ``save``. The config is read, never written: what is decided at run time
(the checkpoint resumed, the AR weights) is kept here.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from megalign.checkpoint import (
    LATEST,
    async_save_queue,
    describe,
    fingerprint,
    load_checkpoint,
    read_meta,
    resolve,
    save_checkpoint,
    save_weights,
)
from megalign.config import Config, to_dict
from megalign.errors import CheckpointError, TrainingError


class Checkpointer:
    def __init__(self, cfg: Config, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self._queue = async_save_queue() if cfg.checkpoint.async_save else None
        self._writing: Optional[str] = None  # the checkpoint a background save is writing
        self.resume_from = self._resume_choice()
        self.ar_checkpoint = cfg.model.init_checkpoint
        if self.resume_from and not self.ar_checkpoint:
            # the teacher is the AR model the run started from, whatever layout resumes it
            self.ar_checkpoint = read_meta(resolve(self.resume_from)).get("ar_checkpoint")

    def _resume_choice(self) -> Optional[str]:
        """``checkpoint.save`` when it already holds a complete checkpoint and
        ``checkpoint.auto_resume`` is on (a restarted or requeued job continues by itself, even
        if ``checkpoint.load`` names where it started), else ``checkpoint.load``."""
        ckpt = self.cfg.checkpoint
        if ckpt.auto_resume and ckpt.save and os.path.isfile(os.path.join(ckpt.save, LATEST)):
            return ckpt.save
        return ckpt.load or None

    def keep_initial_weights(self, students: list) -> None:
        """A randomly initialised "AR model" with a teacher: keep it, so a resumed run gets the
        same teacher."""
        if self.ar_checkpoint or not self.cfg.checkpoint.save:
            return
        self.ar_checkpoint = save_weights(os.path.join(self.cfg.checkpoint.save, "ar_init"),
                                          students)
        self.log(f"> saved the initial AR weights (the teacher) to {self.ar_checkpoint}")

    def resume(self, students: list, optimizer, scheduler) -> int:
        """Weights, optimizer, schedule and RNG from ``resume_from``; returns its iteration."""
        meta = load_checkpoint(self.resume_from, students, optimizer, scheduler)
        expected = meta.get("ar_checkpoint_fingerprint")
        if expected and expected != fingerprint(self.ar_checkpoint):
            raise TrainingError(
                f"checkpoint {self.resume_from} was trained against the AR checkpoint "
                f"{meta.get('ar_checkpoint')} (fingerprint {expected}); model.init_checkpoint="
                f"{self.ar_checkpoint} differs, so the teacher would differ"
            )
        self.log(f"> resumed from {self.resume_from}: {describe(meta)}")
        return int(meta["iteration"])

    def save(self, iteration: int, students: list, optimizer, scheduler,
             last: bool = False) -> None:
        """Called after every iteration (``last``: the run stops after it, on a signal or at
        ``schedule.train_iters``): writes ``iter_NNNNNNN`` every ``checkpoint.save_interval``
        iterations and at the last one, and finalizes a background save that has finished.

        With ``checkpoint.async_save`` an interval's save goes on in the background while training
        continues (one at a time: the next waits for it); the last save is written before the run
        ends. A failure stops the run unless ``checkpoint.on_save_failure`` is ``continue`` and
        the failed save is not the last."""
        ckpt = self.cfg.checkpoint
        last = last or iteration == self.cfg.schedule.train_iters
        due = bool(ckpt.save) and (last or (ckpt.save_interval > 0
                                            and iteration % ckpt.save_interval == 0))
        self._finalize(blocking=due)
        if not due:
            return
        background = self._queue is not None and not last
        meta = {
            "iteration": iteration,
            "consumed_samples": iteration * self.cfg.data.global_batch_size,
            "config": to_dict(self.cfg),
            "ar_checkpoint": self.ar_checkpoint,
            "ar_checkpoint_fingerprint": fingerprint(self.ar_checkpoint),
        }
        try:
            path = save_checkpoint(ckpt.save, iteration, students, optimizer, scheduler, meta,
                                   ckpt.keep_last_n, self._queue if background else None)
        except CheckpointError as err:
            self._failed(err, last)
            return
        if background:
            self._writing = path
            self.log(f"> saving checkpoint {path} in the background")
        else:
            self.log(f"> saved checkpoint {path}")

    def _finalize(self, blocking: bool) -> None:
        if self._queue is None or self._writing is None:
            return
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError as err:
            self._writing = None
            self._failed(err, last=False)
            return
        if done:
            self.log(f"> saved checkpoint {self._writing}")
            self._writing = None

    def _failed(self, err: CheckpointError, last: bool) -> None:
        if self.cfg.checkpoint.on_save_failure == "stop" or last:
            raise err
        self.log(f"> WARNING: {err}; training continues (checkpoint.on_save_failure=continue)")
