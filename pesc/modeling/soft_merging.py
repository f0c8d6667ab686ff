"""What the soft-merging methods (MoV, MoLoRA; Zadouri et al., arXiv 2309.05444) share: their router,
and finding the dense linears their sites sit beside.

Shipped inside checkpoints of those methods: imports only torch.

Every expert is active: the router gives each token a float32 softmax over all E experts
(the official `routing.Router`: inputs and kernel in float32, no bias, kernel ~ N(0, 0.02)).
Optional, as in the official code and off by default: multiplicative jitter on the router
input while training, and a top-k mask on the probabilities, either as the official code has
it (the k probabilities kept, not renormalised) or renormalised to sum to one.
"""

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_INIT_STD = 0.02


class SoftRouter(nn.Module):
    """Linear router, no bias: router logits and the mixing probabilities of every expert."""

    def __init__(self, in_features: int, num_experts: int, top_k: int = 0, renormalize: bool = False,
                 jitter: float = 0.0):
        super().__init__()
        self.top_k = top_k  # 0: all experts (soft merging)
        self.renormalize = renormalize
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Router logits [..., E] in float32 (with jitter only while training)."""
        inputs = inputs.float()
        if self.training and self.jitter > 0:
            inputs = inputs * torch.empty_like(inputs).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(inputs, self.weight.float())

    def probabilities(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 mixing weights [..., E] and the kept experts [..., k] (None when all are kept)."""
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if not self.top_k or self.top_k >= probabilities.shape[-1]:
            return probabilities, None
        kept, selected = torch.topk(probabilities, self.top_k, dim=-1)
        if self.renormalize:
            kept = kept / kept.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probabilities).scatter(-1, selected, kept), selected


__all__ = ["SoftRouter", "ROUTER_INIT_STD"]
