"""LoRAMoE as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers (fused gate/up and q/k/v kept),
each site's router and LoRA experts stacked beside the fused linear it sits on (pesc.methods.vllm_sites; the FFN
linears by default, any of the seven as config `sites` says).

Registered by `pesc.serving.vllm_plugin` for the architecture `LoramoeForCausalLM`. Per token and site, with p the
float32 softmax of the router logits over all N experts (pesc/methods/loramoe/modeling_loramoe.py):
    y = W0 x + (alpha / r) sum_i p_i B_i A_i x
"""

import functools

import torch

from pesc.methods.vllm_sites import NativeSitesForCausalLM, StackedLoraExperts, add_lora_sites, renamer

SITE_PREFIX = "loramoe"
TENSORS = {"router.weight": "router", "experts_A.weight": "A", "experts_B.weight": "B"}  # in the stacked layouts


def read_tensor(rest: str, tensor):
    if rest not in TENSORS:
        raise ValueError(f"unexpected LoRAMoE tensor {rest!r}")
    return TENSORS[rest], tensor


def softmax_gates(logits: torch.Tensor) -> torch.Tensor:
    """Every expert, weighted by the softmax of its logits in float32 (float64 stays float64, as shipped)."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


class LoramoeForCausalLM(NativeSitesForCausalLM):
    label = "LoRAMoE"

    @staticmethod
    def add_sites(layer, config) -> None:
        experts = functools.partial(
            StackedLoraExperts, num_experts=config.num_experts, rank=config.expert_rank,
            scaling=config.expert_alpha / config.expert_rank, gates=softmax_gates, read=read_tensor,
            site_prefix=SITE_PREFIX)
        add_lora_sites(layer, config.sites, experts)

    @staticmethod
    def rename(config):
        return renamer(SITE_PREFIX, config.sites)
