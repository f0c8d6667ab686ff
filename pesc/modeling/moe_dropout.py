"""Dropout drawn cheaply: which elements to drop (`dropout_mask`: drop positions or packed random bits
rather than `F.dropout`'s float noise) and zeroing them (`zero_dropped`), for the methods' input dropouts
and the routed dispatch's.

Shipped in the checkpoints of the methods that use it: imports only torch.
"""

import math

import torch


# Up to this p, a CPU mask is drawn as the positions of its drops (the gaps between them: ~p draws an
# element) rather than as a random word an element (mt19937 costs ~1.7 ns a word): 2M elements at p 0.05 take
# 1.6 ms to draw and zero, against 5.6 ms for the word-per-element mask. Up to 0.125 the positions (int64) also
# take no more memory than the bool mask they replace.
_DROP_POSITIONS_MAX_P = 0.125


def dropout_mask(shape: tuple, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(drop, keep scale): which elements of a tensor of `shape` to zero, each with probability p independently,
    and 1 / (1 - p) (see `zero_dropped`).

    On the CPU with p <= 0.125, `drop` holds the flat indices of the dropped elements, sorted: the gaps between
    drops are independent geometric draws (P(gap = j) = p (1 - p)^(j-1), exactly the gaps of independent
    Bernoulli trials), so only ~p of the elements cost a draw. Otherwise `drop` is a boolean mask of `shape`, from
    32 random bits an element compared with round(p * 2**32): the probability is p to within 2**-33 (as float32
    uniforms give it), at a fraction of the cost of `bernoulli_` on the CPU, stored as bytes, not as the float
    noise `F.dropout` keeps.
    """
    numel = math.prod(shape)
    if device.type == "cpu" and 0 < p <= _DROP_POSITIONS_MAX_P:
        return _drop_positions(numel, p), 1 / (1 - p)
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = round(p * 2**32)
    drop = bits.view(torch.int32)[:numel].view(shape) < threshold - 2**31
    return drop, 2**32 / (2**32 - threshold)


def _drop_positions(numel: int, p: float) -> torch.Tensor:
    """The sorted flat indices below `numel` that independent Bernoulli(p) trials drop (int64, CPU)."""
    expected = numel * p
    chunks, last = [], -1  # `last`: the index of the last drop drawn so far
    while last < numel:  # a first draw of ~6 sigma over the expected count almost always ends it
        gaps = torch.empty(int(expected + 6 * math.sqrt(expected) + 16), dtype=torch.int64).geometric_(p)
        # gaps are >= 1; a uniform draw of exactly 0 (odds 2**-53) would give +inf, cast to a negative integer
        positions = gaps.clamp_(min=1).cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def zero_dropped(tensor: torch.Tensor, drop: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`tensor` with the elements that `dropout_mask`'s `drop` names set to zero (autograd-safe out of place)."""
    if drop.dtype == torch.bool:
        return tensor.masked_fill_(drop, 0) if in_place else tensor.masked_fill(drop, 0)
    if in_place:
        tensor.view(-1).index_fill_(0, drop, 0)
        return tensor
    return tensor.reshape(-1).index_fill(0, drop, 0).view(tensor.shape)
