"""Single-process model checks (run under torchrun, world size 1): attention direction, document
masking, and the step-0 alignment of the embedding states. Writes a JSON report to --out."""

import json
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

from megalign import distributed
from megalign.align.teacher import Teacher, teacher_build
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.objective import DiffusionBatch, MaskedDiffusion, make_batch
from megalign.model.attention import attention_mask, document_ids
from megalign.model.gpt import ModelBuild, build_gpt, cast_chunk
from megalign.model.hidden_states import HiddenStateRecorder
from megalign.training.optimizer import freeze_parameters

from common import arguments, config_and_tokenizer, start_one_process


def logits_of(model, tokens, mask):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, mask)  # [b, s, v] (no labels)


def main():
    args = arguments()
    cfg, tok = config_and_tokenizer(args, one_process=True)
    vocab = start_one_process(cfg, tok).padded
    report = {}

    torch.manual_seed(0)
    tokens = torch.randint(4, tok.vocab_size, (1, 32))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % tok.vocab_size
    cfg = replace(cfg, model=replace(cfg.model, document_attention=False))
    for name, causal in (("bidirectional", False), ("causal", True)):
        build = ModelBuild.of(cfg, causal=causal, params_dtype=torch.float32)
        model = build_gpt(build, vocab).eval()
        delta = (logits_of(model, tokens, None) - logits_of(model, changed, None)).abs()
        report[f"{name}_first_position_change"] = float(delta[0, 0].max())

    # two packed documents: [0, 16) and [16, 32); change a token of the second one
    cfg = replace(cfg, model=replace(cfg.model, document_attention=True))
    docs_tokens = tokens.clone()
    docs_tokens[0, 15] = tok.eod
    changed = docs_tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % tok.vocab_size
    docs = document_ids(docs_tokens, tok.eod)
    for name, causal in (("bidirectional", False), ("causal", True)):
        build = ModelBuild.of(cfg, causal=causal, params_dtype=torch.float32)
        model = build_gpt(build, vocab).eval()
        mask = attention_mask(docs, causal=causal)
        delta = (logits_of(model, docs_tokens, mask) - logits_of(model, changed, mask)).abs()
        report[f"{name}_doc_other_document_change"] = float(delta[0, :16].max())
        report[f"{name}_doc_same_document_change"] = float(delta[0, 16:20].max() if not causal
                                                           else delta[0, 20:].max())

    # step 0: student initialised from the teacher's weights
    cfg = replace(cfg, align=replace(cfg.align, weight=10.0))
    student = build_gpt(ModelBuild.of(cfg, causal=False, params_dtype=torch.float32), vocab)
    teacher = Teacher(teacher_build(cfg), vocab, [student.state_dict()], {0, cfg.model.num_layers})
    recorder = HiddenStateRecorder(student, {0})
    vocabulary = Vocabulary.of(cfg, tok)
    sample = torch.randint(4, tok.vocab_size, (2, cfg.model.seq_length + 1))
    positions = torch.arange(cfg.model.seq_length).unsqueeze(0).expand(2, -1)
    batch = make_batch(sample, positions, torch.tensor([0, 1]), MaskedDiffusion.of(cfg), vocabulary,
                       with_teacher=True)
    teacher_states = teacher.forward([batch])[0].states
    # align.teacher_microbatches: one forward over two micro-batches gives each its own states
    halves = [DiffusionBatch(**{f.name: getattr(batch, f.name)[i:i + 1]
                                if isinstance(getattr(batch, f.name), torch.Tensor)
                                else getattr(batch, f.name) for f in fields(batch)})
              for i in range(2)]
    grouped, alone = teacher.forward(halves), [teacher.forward([half])[0] for half in halves]
    report["teacher_group_max_diff"] = max(
        float((grouped[i].states[k] - alone[i].states[k]).abs().max())
        for i in range(2) for k in teacher_states)
    report["teacher_group_shapes"] = [list(grouped[i].states[k].shape) for i in range(2)
                                      for k in sorted(teacher_states)]
    with torch.no_grad(), recorder.recording_scope() as student_states:
        student(batch.input_tokens, batch.position_ids, batch.student_mask)
    cos = F.cosine_similarity(student_states[0], teacher_states[0], dim=-1).T  # [b, s]
    visible = batch.supervised & (batch.input_tokens != vocabulary.mask)
    hidden = batch.supervised & (batch.input_tokens == vocabulary.mask)
    report["embedding_cos_visible_min"] = float(cos[visible].min())
    report["embedding_cos_visible_max"] = float(cos[visible].max())
    report["embedding_cos_visible_count"] = int(visible.sum())
    report["embedding_cos_masked_max"] = float(cos[hidden].max())

    # tied embeddings: one logical tensor, frozen by a pattern naming either of its names
    for pattern in ("output_layer", "word_embeddings"):
        model = build_gpt(ModelBuild.of(cfg, causal=False, params_dtype=torch.float32), vocab)
        freeze_parameters([model], [pattern])
        report[f"frozen_by_{pattern}"] = sorted(
            name for name, param in model.named_parameters() if not param.requires_grad)

    # a chunk cast to bfloat16 for inference computes as one built in bfloat16 (whose attention
    # softmax Megatron-Core runs in float32), for one sequence and a batch, several lengths
    cast = build_gpt(ModelBuild.of(cfg, causal=False, params_dtype=torch.float32), vocab).eval()
    built = build_gpt(ModelBuild.of(cfg, causal=False, params_dtype=torch.bfloat16), vocab).eval()
    built.load_state_dict(cast.state_dict())
    cast_chunk(cast, torch.bfloat16)
    report["bf16_cast_vs_built"] = []
    for batch, length in ((1, 37), (1, 70), (1, 128), (2, 48)):
        sample = torch.randint(4, tok.vocab_size, (batch, length))
        report["bf16_cast_vs_built"].append(float(
            (logits_of(cast, sample, None).float() - logits_of(built, sample, None).float())
            .abs().max()))
    # their attention softmax alone, on scores long enough for bf16 and float32 to round apart
    softmax = [next(m for m in model.modules() if isinstance(m, FusedScaleMaskSoftmax))
               for model in (cast, built)]
    scores = (3 * torch.randn(2, 4, 300, 300)).bfloat16()
    report["bf16_softmax_cast_vs_built"] = float(
        (softmax[0](scores, None).float() - softmax[1](scores, None).float()).abs().max())
    with open(args.out, "w") as handle:
        json.dump(report, handle)
    distributed.shutdown()


if __name__ == "__main__":
    main()
