"""Collators: padding-free packing (sequences concatenated, position_ids restart) or classic padding."""

import torch
from transformers import DataCollatorWithFlattening

from pesc.data.masking import IGNORE_INDEX


class PaddingCollator:
    """Right-pads input_ids with the pad id and labels with -100; attention_mask is 1 on real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

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
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(tokenizer, *, sample_packing: bool):
    """sample_packing=True: `DataCollatorWithFlattening` -- one [1, total] row per batch, position_ids restarting
    at 0 for each sequence, labels -100 at each sequence's first token, and NO attention_mask: transformers then
    attends block-diagonally only while the model gets no attention_mask and no cache (use_cache=False).
    sample_packing=False: padding to the longest row of the batch, with attention_mask."""
    if sample_packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    pad = tokenizer.pad_token_id
    if pad is None:  # padded positions are masked and labelled -100: any id works
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PaddingCollator(pad)
