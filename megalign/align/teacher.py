"""The frozen AR teacher: the student's architecture with causal attention, sharded like it.

Stage k of the teacher holds the same layers and TP shards as stage k of the student and is
loaded from the same AR weights. It is never wrapped in DDP nor given to the optimizer, runs in
eval mode under ``no_grad`` on the clean tokens, and skips the LM head: its decoder keeps the final
norm (an aligned state) but ``GPTModel``'s post-processing (output layer, logits) is switched off.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megalign.align.teacher_stream import TeacherStream
from megalign.config import Config
from megalign.diffusion.objective import DiffusionBatch
from megalign.model.gpt import build_gpt
from megalign.model.hidden_states import HiddenStateRecorder


def teacher_dtype(cfg: Config) -> torch.dtype:
    if cfg.align.teacher_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.align.teacher_dtype]


class Teacher:
    def __init__(self, cfg: Config, vocab_size: int, ar_state_dict: dict, aligned: set[int]):
        self.dtype = teacher_dtype(cfg)
        self.model = build_gpt(cfg, vocab_size, causal=True, params_dtype=self.dtype)
        self.model.load_state_dict(ar_state_dict, strict=True)
        self.model.post_process = False  # hidden states only: no output layer, no logits
        self.model.output_layer = None
        self.model.requires_grad_(False)
        self.model.eval()
        self.recorder = HiddenStateRecorder(self.model, aligned)
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.stream = TeacherStream() if parallel_state.get_pipeline_model_parallel_world_size() > 1 else None
        cfg_par = cfg.parallel
        self._sp_factor = cfg_par.tensor_model_parallel_size if cfg_par.sequence_parallel else 1
        self._hidden = cfg.model.hidden_size

    @torch.no_grad()
    def forward(self, batch: DiffusionBatch) -> dict[int, torch.Tensor]:
        """Run this stage's teacher layers on the clean tokens; returns the aligned states here."""
        if not self.first_stage:
            b, s = batch.clean_tokens.shape
            shape = (s // self._sp_factor, b, self._hidden)
            received = self.stream.recv(shape, self.dtype, batch.clean_tokens.device)
            self.model.set_input_tensor(received)
        output = self.model(batch.clean_tokens, batch.position_ids, batch.teacher_mask)
        if not self.last_stage:
            self.stream.send(output)
        return self.recorder.pop()

    def finish_step(self) -> None:
        if self.stream is not None:
            self.stream.wait()
