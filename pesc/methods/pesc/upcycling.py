"""In-memory upcycling: a loaded dense causal LM becomes a PESC model sharing its tensors."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from pesc.methods.pesc import initial_expert_state
from pesc.methods.pesc.configuration_pesc import PescConfig
from pesc.methods.pesc.modeling_pesc import PescForCausalLM
from pesc.methods.pesc.modeling_pesc import check_dense_equivalence


def pesc_config_from_dense(
    dense_config: PreTrainedConfig,
    num_experts: int | None = None,
    top_k: int | None = None,
    adapter_dim: int | None = None,
    moe_scaling: float | None = None,
    adapter_dropout: float | None = None,
    router_aux_loss_coef: float | None = None,
    moe_dtype: str | None = None,
) -> PescConfig:
    """The PESC config for a dense config plus MoE settings (None: PescConfig's default; refuses an already-PESC
    config)."""
    from pesc.methods import PESC

    if hasattr(dense_config, "num_experts") and hasattr(dense_config, "adapter_dim"):
        raise ValueError("the model is already a PESC model: convert a dense checkpoint instead")
    settings = dict(num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim, moe_scaling=moe_scaling,
                    adapter_dropout=adapter_dropout, router_aux_loss_coef=router_aux_loss_coef)
    return PESC.config_from_dense(dense_config, {k: v for k, v in settings.items() if v is not None}, moe_dtype)


def upcycle(
    model_or_path: PreTrainedModel | str | Path,
    num_experts: int | None = None,
    top_k: int | None = None,
    adapter_dim: int | None = None,
    moe_scaling: float | None = None,
    router_aux_loss_coef: float | None = None,
    adapter_dropout: float | None = None,
    moe_dtype: str | None = None,
    seed: int = 0,
) -> PescForCausalLM:
    """Turn a dense causal LM into a PESC model; its tensors are shared, not copied. A setting left None takes
    PescConfig's default (`pesc methods pesc` lists them).

    At return the PESC model computes exactly what the dense model computes (the adapters'
    up-projections are zero); the same seed always draws the same routers and adapters.
    """
    dense = model_or_path
    if not isinstance(dense, PreTrainedModel):
        dense = AutoModelForCausalLM.from_pretrained(model_or_path)
    config = pesc_config_from_dense(
        dense.config,
        num_experts=num_experts,
        top_k=top_k,
        adapter_dim=adapter_dim,
        moe_scaling=moe_scaling,
        adapter_dropout=adapter_dropout,
        router_aux_loss_coef=router_aux_loss_coef,
        moe_dtype=moe_dtype or str(dense.dtype).removeprefix("torch."),
    )
    config._attn_implementation = dense.config._attn_implementation
    with torch.device("meta"):
        model = PescForCausalLM(config)

    dense_state = dense.state_dict(keep_vars=True)
    result = model.load_state_dict(dense_state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"the dense model has tensors PESC does not place: {', '.join(result.unexpected_keys[:5])}")
    for name, buffer in dense.named_buffers():
        owner, _, key = name.rpartition(".")
        model.get_submodule(owner)._buffers[key] = buffer

    device = next(dense.parameters()).device
    for layer_idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.moe_adapter
        experts.load_state_dict(
            {k: v.to(device) for k, v in initial_expert_state(config, layer_idx, seed).items()}, assign=True
        )
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"PESC model tensors left without values: {', '.join(missing[:5])}")
    check_dense_equivalence(dense.model.layers[0].mlp, model.model.layers[0].mlp, config.base_model_type)
    model.train(dense.training)
    return model
