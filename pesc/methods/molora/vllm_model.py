"""MoLoRA as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers (fused q/k/v and gate/up kept),
each site's router and LoRA experts stacked beside the fused linear it sits on (pesc.methods.vllm_sites); any
subset of the seven linears, as config `sites` says.

Registered by `pesc.serving.vllm_plugin` for the architecture `MoLoRAForCausalLM`. Per token and site, with p the
float32 softmax of the router's float32 logits over all E experts, optionally kept to the top-k (masked or
renormalised) (pesc/methods/molora/modeling_molora.py, pesc/modeling/soft_merging.py):
    y = W0 x + (alpha / r) sum_e p_e B_e A_e x
"""

import functools

import torch

from pesc.methods.vllm_sites import NativeSitesForCausalLM, StackedLoraExperts, add_lora_sites, renamer

SITE_PREFIX = "molora"
TENSORS = {"router.weight": "router", "experts_A": "A", "experts_B": "B"}  # already in the stacked layouts


def read_tensor(rest: str, tensor):
    if rest not in TENSORS:
        raise ValueError(f"unexpected MoLoRA tensor {rest!r}")
    return TENSORS[rest], tensor


def soft_gates(logits: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """The soft-merging router's float32 probabilities (soft_merging.SoftRouter.probabilities): all experts, or the
    top-k kept (renormalised or not) and zero elsewhere."""
    probabilities = torch.softmax(logits.float(), dim=-1, dtype=torch.float32)
    if not top_k or top_k >= probabilities.shape[-1]:
        return probabilities
    kept, selected = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probabilities).scatter(-1, selected, kept)


class MoLoRAForCausalLM(NativeSitesForCausalLM):
    label = "MoLoRA"

    @staticmethod
    def add_sites(layer, config) -> None:
        gates = functools.partial(soft_gates, top_k=config.num_experts_per_tok,
                                  renormalize=config.router_topk_weights == "renormalized")
        experts = functools.partial(
            StackedLoraExperts, num_experts=config.num_experts, rank=config.expert_rank,
            scaling=config.expert_alpha / config.expert_rank, gates=gates, read=read_tensor, site_prefix=SITE_PREFIX,
            float32_router=True)
        add_lora_sites(layer, config.sites, experts)

    @staticmethod
    def rename(config):
        return renamer(SITE_PREFIX, config.sites)
