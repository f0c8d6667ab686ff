"""The one per-layer random stream every method draws its initial added tensors from."""

import torch


def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    """An RNG per layer, so that any layer's tensors can be drawn alone (the streaming converter does, in any
    order and any number of threads) and `pesc convert` and training from a dense base draw the same values."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
