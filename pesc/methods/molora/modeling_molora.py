"""MoLoRA: a soft-merged mixture of LoRA experts (Zadouri et al., arXiv 2309.05444), on a dense decoder.

Shipped inside every MoLoRA checkpoint: imports only torch, transformers and its sibling files.

Each site is a linear of the dense model (by default the official sites, T5's q, k, v, o, wi_0
and wo on a decoder: q, k, v, o, gate, down; `up_proj`, T5's wi_1, is a site of ours, as were all
seven projections, the default of pesc 0.1.0). It owns a router on the linear's input and E LoRA
experts of rank r:
    y = W0·x + (α/r) Σ_e p_e B_e A_e x,    p = softmax(router(x)) over all E experts, float32
A_e ~ N(0, 0.02) and B_e = 0, so a fresh model is exactly its base. Optionally (off by
default, as in every official config) the router keeps only the top-k probabilities and
jitters its input while training (see soft_merging.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_molora import MoLoRAConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_routing import emit_routing_record
from .moe_seq2seq_lm import T5_ATTENTION_LINEARS, MoEForConditionalGeneration, block_attentions, block_ffn, ffn_linear
from .moe_sites import LINEAR_PARENTS, attach_sibling, linear_on
from .soft_merging import SoftRouter

EXPERTS_A_INIT_STD = 0.02


class MoLoRAExperts(nn.Module):
    """A router and E rank-r LoRA experts on one linear, all computed at once.

    The experts are stacked: rows e*r .. e*r+r-1 of `experts_A` [E*r, in] are A_e, the same
    columns of `experts_B` [out, E*r] are B_e. Because the mixture is linear in p,
    Σ_e p_e B_e A_e x is one matmul with the stacked A, the rank-r slices scaled by p_e, and
    one matmul with the stacked B: no loop over experts.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float,
                 top_k: int = 0, renormalize: bool = False, jitter: float = 0.0, site: str = "", layer_idx: int = 0):
        super().__init__()
        self.site, self.layer_idx = site, layer_idx  # name its routing records
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.router = SoftRouter(in_features, num_experts, top_k, renormalize, jitter)
        self.experts_A = nn.Parameter(torch.empty(num_experts * rank, in_features))
        self.experts_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The official init: router and A ~ N(0, 0.02), B zero."""
        self.router.reset_parameters(generator)
        with torch.no_grad():
            self.experts_A.normal_(0.0, EXPERTS_A_INIT_STD, generator=generator)
            self.experts_B.zero_()

    def mixture(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(α/r) Σ_e p_e B_e A_e x [..., out] in the experts' dtype, the router logits, and the kept experts."""
        rows = inputs.reshape(-1, inputs.shape[-1])
        logits = self.router.logits(rows)
        probabilities, selected = self.router.probabilities(logits)
        hidden = F.linear(rows.to(self.experts_A.dtype), self.experts_A)  # [tokens, E*r]
        weights = (probabilities * self.scaling).to(hidden.dtype).unsqueeze(-1)  # [tokens, E, 1]
        hidden = (hidden.view(rows.shape[0], self.num_experts, self.rank) * weights).flatten(1)
        out = F.linear(hidden, self.experts_B)
        return out.view(*inputs.shape[:-1], out.shape[-1]), logits, selected

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out, logits, selected = self.mixture(inputs)
        emit_routing_record(self.site, self.layer_idx, logits, selected)
        return out

    def linear_output_hook(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The site: the linear's output plus the experts' mixture on its input."""
        return output + self(args[0]).to(output.dtype)


def experts_beside(linear: nn.Linear, config: MoLoRAConfig, site: str, layer_idx: int) -> MoLoRAExperts:
    """The config's MoLoRA experts sized for `linear` (records named `site`, in layer `layer_idx`)."""
    return MoLoRAExperts(
        linear.in_features, linear.out_features, config.num_experts, config.expert_rank, config.expert_alpha,
        config.num_experts_per_tok, config.router_topk_weights == "renormalized", config.router_jitter,
        site, layer_idx,
    )


class MoLoRAForCausalLM(MoEForCausalLM):
    """A dense family's causal LM with MoLoRA experts beside each linear of `sites` (`molora_<linear>`)."""

    config_class = MoLoRAConfig
    method_label = "MoLoRA"
    _no_split_modules = []

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config: MoLoRAConfig) -> None:
        for linear_name in config.sites:
            parent_name = LINEAR_PARENTS[linear_name]
            linear = linear_on(layer, parent_name, linear_name, config.base_model_type, self.method_label)
            site = experts_beside(linear, config, linear_name, layer_idx)
            attach_sibling(getattr(layer, parent_name), linear_name, f"molora_{linear_name}", site, "output")

    def init_method_module(self, module: nn.Module) -> bool:
        if isinstance(module, MoLoRAExperts):
            module.reset_parameters()
            return True
        return isinstance(module, SoftRouter)  # drawn with its site


class MoLoRAModel(MoEModel):
    """The MoLoRA backbone without the LM head (what `AutoModel` and vLLM's Transformers backend load)."""

    config_class = MoLoRAConfig
    causal_lm_class = MoLoRAForCausalLM


class MoLoRAForConditionalGeneration(MoEForConditionalGeneration):
    """T5 / mT5 with MoLoRA experts where the official code puts them (its MoLoRaAttention and MoLoRa modules), each
    site its own router on the linear's input. `sites` names decoder linears, found on a T5 block as
    moe_seq2seq_lm.T5_ATTENTION_LINEARS (q_proj ... o_proj: `q` ... `o` of the self-attention and, in the decoder,
    the cross-attention) and T5_FFN_LINEARS (gate_proj: `wi_0`, or `wi` in ReLU T5 v1.0; up_proj: `wi_1`;
    down_proj: `wo`); the official set is q, k, v, o, gate, down. Each site is `molora_<T5 linear>` beside it."""

    config_class = MoLoRAConfig
    method_label = "MoLoRA"
    init_method_module = MoLoRAForCausalLM.init_method_module

    @classmethod
    def add_method_modules(cls, block: nn.Module, stack_name: str, block_idx: int, config: MoLoRAConfig) -> None:
        ffn = block_ffn(block)
        places = []  # (parent, T5 linear name, record name)
        for site in config.sites:
            if site in T5_ATTENTION_LINEARS:
                linear_name = T5_ATTENTION_LINEARS[site]
                places += [(attention, linear_name, f"{stack_name}.{attention_name}.{linear_name}")
                           for attention_name, attention in block_attentions(block)]
            else:
                linear_name = ffn_linear(ffn, site, cls.method_label)
                places.append((ffn, linear_name, f"{stack_name}.ffn.{linear_name}"))
        for parent, linear_name, record_name in places:
            experts = experts_beside(parent._modules[linear_name], config, record_name, block_idx)
            attach_sibling(parent, linear_name, f"molora_{linear_name}", experts, "output")


__all__ = ["MoLoRAExperts", "MoLoRAForCausalLM", "MoLoRAForConditionalGeneration", "MoLoRAModel",
           "EXPERTS_A_INIT_STD", "experts_beside"]
