"""Training samples: Megatron-Core ``GPTDataset`` blends over indexed files, read in a
deterministic order that resumes from the consumed-samples count.

Each micro-batch carries the *global sample index* of its samples: the diffusion noise is a pure
function of it (``megalign.diffusion.masking``). Document boundaries are the EOD tokens inside a
sample (``megalign.model.attention.document_ids``).
"""

from __future__ import annotations

import os

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megalign.config import parse_blend
from megalign.errors import ConfigError
from megalign.data.indexed import check_indexed_dataset, read_index
from megalign.data.sft import loss_mask_prefix


def check_split(prefix: str, documents: int, split: str) -> None:
    """Megatron gives each split a document range (rounded); an empty range with a non-zero
    weight makes GPTDataset loop forever counting epochs, so refuse it here."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "validation", "test"), matrix):
        if bounds is not None and round(bounds[0] * documents) == round(bounds[1] * documents):
            raise ConfigError(
                f"split '{split}': the {name} split of {prefix} ({documents} documents) holds no "
                "document; give it weight 0 (e.g. data.split='100,0,0') or use more documents"
            )


def build_datasets(
    paths: list,
    tokenizer,
    seq_length: int,
    split: str,
    seed: int,
    num_samples: list[int],
    cache_dir: str,
    reset_position_ids: bool,
    loss_mask: bool = False,
):
    """(train, valid, test) datasets; index caches are built once by rank 0 while others wait.
    ``loss_mask``: each prefix has an SFT loss-mask stream (``megalign.data.sft``); its samples
    are read with the same Megatron indices, so each item also carries its ``response`` mask."""
    prefixes, weights = parse_blend(paths)
    for prefix in prefixes:
        check_split(prefix, check_indexed_dataset(prefix), split)
        if loss_mask:
            check_loss_mask(prefix)

    def build(blend_prefixes):
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(blend_prefixes, weights),
            split=split,
            path_to_cache=cache_dir,
            tokenizer=tokenizer,
            reset_position_ids=reset_position_ids,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()

    os.makedirs(cache_dir, exist_ok=True)
    datasets = build(prefixes)
    if not loss_mask:
        return datasets
    masks = build([loss_mask_prefix(prefix) for prefix in prefixes])
    return tuple(None if d is None else WithLossMask(d, m) for d, m in zip(datasets, masks))


def check_loss_mask(prefix: str) -> None:
    """The loss-mask stream of ``prefix`` exists and has its documents' lengths."""
    mask = loss_mask_prefix(prefix)
    if not os.path.isfile(f"{mask}.idx"):
        raise ConfigError(f"data.sft=true but '{mask}.idx' does not exist; build '{prefix}' with "
                          "megalign-preprocess --sft, or set data.sft=false")
    tokens, masks = read_index(prefix).lengths, read_index(mask).lengths
    if len(tokens) != len(masks) or (tokens != masks).any():
        raise ConfigError(f"'{mask}' does not match the documents of '{prefix}'; rebuild both "
                          "with megalign-preprocess --sft")


class WithLossMask(torch.utils.data.Dataset):
    """A token dataset and its loss-mask stream, sample for sample."""

    def __init__(self, tokens, masks):
        self.tokens, self.masks = tokens, masks

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        item, mask = self.tokens[index], self.masks[index]
        return {**item, "response": torch.cat([mask["tokens"], mask["labels"][-1:]]).bool()}


class _Indexed(torch.utils.data.Dataset):
    """Adds the global sample index and the full s+1 token sample to each item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        tokens = torch.cat([item["tokens"], item["labels"][-1:]])
        return {
            "tokens": tokens,
            "position_ids": item["position_ids"],
            "sample_index": torch.tensor(index),
            **({"response": item["response"]} if "response" in item else {}),
        }


class PretrainingSampler:
    """Micro-batches of consecutive sample indices; DP rank r takes the r-th of every dp chunk."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return (self.total - self.consumed) // (self.micro_batch_size * self.dp_size)

    def __iter__(self):
        step = self.micro_batch_size * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def micro_batches(
    dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int
):
    """Iterator of collated micro-batches for this DP rank, starting after ``consumed`` samples."""
    sampler = PretrainingSampler(len(dataset), consumed, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_sampler=sampler, num_workers=0)
    return iter(loader)
