"""A method's per-sample fields (integer columns, e.g. LoRAMoE's sample type) as the model takes them: one value per
sequence, whichever collator (padded, packed, encoder-decoder) built the batch."""

import torch


def sample_tensors(features: list[dict], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each per-sample field as a [sequences] long tensor, in the order of `features`."""
    return {name: torch.tensor([f[name] for f in features], dtype=torch.long) for name in names}
