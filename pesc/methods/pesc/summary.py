"""PESC's parameter summary: experts, top-k and adapter size beside the counts (`pesc inspect`, convert's report)."""

from dataclasses import dataclass

import torch

from pesc.methods.pesc.configuration_pesc import PescConfig
from pesc.methods.pesc.modeling_pesc import PescForCausalLM
from pesc.summary import Counts


@dataclass(frozen=True)
class ParameterSummary(Counts):
    base_model_type: str
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    adapter_dim: int
    moe_scaling: float
    dense_params: int
    expert_params_per_layer: int
    router_params_per_layer: int
    total_params: int
    active_params: int
    trainable_params: int

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        return [
            f"architecture      PESC over {self.base_model_type}: {self.num_layers} layers, hidden {self.hidden_size}",
            f"experts           {self.num_experts} per layer, top-{self.top_k}, adapter_dim {self.adapter_dim}, "
            f"moe_scaling {self.moe_scaling}",
            *self.count_lines("trainable (MoE)", ": adapters + routers"),
        ]



def summarize(config: PescConfig) -> ParameterSummary:
    """Count parameters by building the model on the meta device: no memory, no weights read."""
    with torch.device("meta"):
        model = PescForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    first_block = model.model.layers[0].mlp.moe_adapter
    router = first_block.router.weight.numel()
    per_expert = sum(p.numel() for p in next(iter(first_block.experts.values())).parameters())
    layers = len(model.model.layers)
    experts_total = layers * (router + config.num_experts * per_expert)
    return ParameterSummary(
        base_model_type=config.base_model_type,
        num_layers=layers,
        hidden_size=config.hidden_size,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        adapter_dim=config.adapter_dim,
        moe_scaling=config.moe_scaling,
        dense_params=total - experts_total,
        expert_params_per_layer=config.num_experts * per_expert,
        router_params_per_layer=router,
        total_params=total,
        active_params=total - layers * (config.num_experts - config.num_experts_per_tok) * per_expert,
        trainable_params=experts_total,
    )
