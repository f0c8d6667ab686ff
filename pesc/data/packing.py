"""Collators: padding-free packing (sequences concatenated, position_ids restart) or classic padding.

Either way a method's per-sample fields (integer columns) go to the model as one value per sequence:
a [batch] tensor (padded: one per row; packed: one per packed sequence, in order).
"""

import torch
from transformers import DataCollatorWithFlattening

from pesc.data.masking import IGNORE_INDEX
from pesc.data.sample_fields import sample_tensors
from pesc.data.seq2seq import Seq2SeqCollator


class PaddingCollator:
    """Right-pads input_ids with the pad id and labels with -100; attention_mask is 1 on real tokens."""

    def __init__(self, pad_token_id: int, sample_fields: tuple[str, ...] = ()):
        self.pad_token_id = pad_token_id
        self.sample_fields = sample_fields

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                **sample_tensors(features, self.sample_fields)}


class PackingCollator:
    """transformers' `DataCollatorWithFlattening`, plus the per-sample fields (one value per packed sequence)."""

    def __init__(self, sample_fields: tuple[str, ...] = ()):
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.sample_fields = sample_fields

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        tokens = [{k: f[k] for k in ("input_ids", "labels") if k in f} for f in features]
        return {**self.flatten(tokens), **sample_tensors(features, self.sample_fields)}


def make_collator(tokenizer, *, sample_packing: bool, sample_fields: tuple[str, ...] = (),
                  encoder_decoder: bool = False):
    """sample_packing=True: `DataCollatorWithFlattening` -- one [1, total] row per batch, position_ids restarting
    at 0 for each sequence, labels -100 at each sequence's first token, and NO attention_mask: transformers then
    attends block-diagonally only while the model gets no attention_mask and no cache (use_cache=False).
    sample_packing=False: padding to the longest row of the batch, with attention_mask.
    encoder_decoder=True (never packed): sources and targets padded apart (pesc.data.seq2seq)."""
    if sample_packing:
        return PackingCollator(sample_fields)
    pad = tokenizer.pad_token_id
    if pad is None:  # padded positions are masked and labelled -100: any id works
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if encoder_decoder:
        return Seq2SeqCollator(pad, sample_fields)
    return PaddingCollator(pad, sample_fields)
