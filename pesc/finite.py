"""Refuse NaN and inf where pesc writes or merges tensors: a model with one non-finite weight computes NaN
everywhere downstream of it, and nothing says so until a user sees empty replies."""

from collections.abc import Iterable

from pesc.errors import PescError


def refuse_non_finite(tensors: Iterable[tuple[str, object]], where: str) -> None:
    """A one-line error naming the first floating-point tensor that holds NaN or inf."""
    import torch

    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise PescError(f"{name} {where} holds {bad} NaN or inf value(s) of {tensor.numel()}: refusing to write "
                            "a model that computes NaN; fix or retrain the source of that tensor")
