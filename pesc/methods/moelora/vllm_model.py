"""MoELoRA as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers (fused q/k/v and gate/up kept),
each site's router and LoRA experts stacked beside the fused linear it sits on (pesc.methods.vllm_sites).

Registered by `pesc.serving.vllm_plugin` for the architecture `MoELoraForCausalLM`. Per token and site, with w the
float32 softmax of the top-k router logits (pesc/methods/moelora/modeling_moelora.py):
    y = W0 x + sum_{i in topk(x)} w_i (alpha / r) B_i A_i x
"""

import functools

from pesc.methods.vllm_sites import (NativeSitesForCausalLM, StackedLoraExperts, add_lora_sites, renamer,
                                    top_k_softmax_gates)

SITE_PREFIX = "moelora"


def read_tensor(rest: str, tensor):
    """A site's checkpoint tensor -> (part, tensor): `down` [E, r, in] is the A's, `up` [E, out, r] the B's."""
    if rest == "router.weight":
        return "router", tensor
    if rest == "down":
        return "A", tensor.reshape(-1, tensor.shape[-1])
    if rest == "up":
        return "B", tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1)
    raise ValueError(f"unexpected MoELoRA tensor {rest!r}")


class MoELoraForCausalLM(NativeSitesForCausalLM):
    label = "MoELoRA"

    @staticmethod
    def add_sites(layer, config) -> None:
        experts = functools.partial(
            StackedLoraExperts, num_experts=config.num_experts, rank=config.lora_rank,
            scaling=config.lora_alpha / config.lora_rank,
            gates=functools.partial(top_k_softmax_gates, top_k=config.num_experts_per_tok), read=read_tensor,
            site_prefix=SITE_PREFIX)
        add_lora_sites(layer, config.sites, experts)

    @staticmethod
    def rename(config):
        return renamer(SITE_PREFIX, config.sites)
