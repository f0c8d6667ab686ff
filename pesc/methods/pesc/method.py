"""PESC (Camelidae, arXiv 2401.02731): the first method, and the layout every Camelidae checkpoint has.

Every expert shares the dense FFN; each expert owns a bottleneck adapter on the FFN output
(`mlp.moe_adapter.experts.expert_J.adapter_{down,up}`), and a top-k router on the FFN input
(`mlp.moe_adapter.router`) picks the experts of each token. One aux loss: the Switch balance loss.
"""


from pesc.methods.base import Method, Setting


class Pesc(Method):
    name = "pesc"
    label = "PESC"
    description = (
        "PESC / Camelidae (arXiv 2401.02731): adapter experts on the shared FFN's output, "
        "top-k router on the FFN input; aux loss: Switch balance (aux_loss)"
    )
    settings = (  # defaults and ranges: configuration_pesc.PescConfig
        Setting("num_experts", (int,), "experts per layer", structural=True),
        Setting("top_k", (int,), "experts routed per token", config_field="num_experts_per_tok", structural=True),
        Setting("adapter_dim", (int,), "bottleneck width of each expert adapter", structural=True),
        Setting("moe_scaling", (int, float), "scale of every adapter's output", structural=True),
        Setting("router_aux_loss_coef", (int, float), "weight of the load-balancing loss"),
        Setting("adapter_dropout", (int, float), "dropout on each adapter's input"),
    )
    vllm_model = "pesc.methods.pesc.vllm_model:PescForCausalLM"
    import_commands = {"camelidae": "pesc.methods.pesc.import_command:import_camelidae"}
    prefix = "moe_adapter"
    card_tags = ("pesc", "adapter-experts")

    config_class_path = "configuration_pesc.PescConfig"
    model_class_path = "modeling_pesc.PescForCausalLM"
    auto_model_class_path = "modeling_pesc.PescModel"
    zero3_leaf_module_paths = ("modeling_pesc.PescMoEAdapter",)

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        return {f"mlp.moe_adapter.{name}": t for name, t in initial_expert_state(config, layer_idx, seed).items()}

    def parameter_summary(self, config):
        from pesc.methods.pesc.summary import summarize

        return summarize(config)

    def card_title(self, config) -> str:
        return f"PESC ({config.num_experts} experts, top-{config.num_experts_per_tok})"

    def card_text(self, config, base_model: str, converted: bool = False) -> str:
        if converted:
            return (
                f"A sparse Mixture-of-Experts model upcycled from {base_model} with `pesc convert`, the "
                "Parameter-Efficient Sparsity Crafting (PESC) way (arXiv 2401.02731): every expert shares the dense "
                "FFN, each expert owns a bottleneck adapter on the FFN output, and a top-"
                f"{config.num_experts_per_tok} router picks the experts of each token. The adapters' up-projections "
                "start at zero, so this checkpoint computes exactly what the base model computes until it is trained "
                "(`pesc train`).\n\n"
                "The base tensors keep their dense names; each layer adds `model.layers.N.mlp.moe_adapter.router.weight` "
                "and `model.layers.N.mlp.moe_adapter.experts.expert_J.adapter_{down,up}.weight`."
            )
        return (
            f"A sparse Mixture-of-Experts model made with PESC (parameter-efficient sparsity crafting, "
            f"arXiv 2401.02731) from the dense `{base_model}`: every layer keeps the dense FFN, shared by "
            f"{config.num_experts} adapter experts of which a router picks {config.num_experts_per_tok} per token."
        )

    def card_rows(self, config, converted: bool = False) -> list:
        rows = [
            ("experts per layer", config.num_experts),
            ("experts per token (top-k)", config.num_experts_per_tok),
            ("adapter dim", config.adapter_dim),
            ("moe_scaling", config.moe_scaling),
            ("router aux loss coef", config.router_aux_loss_coef),
        ]
        return rows + [("adapter dropout", config.adapter_dropout)] if converted else rows


PESC = Pesc()


def initial_expert_state(config, layer_idx: int, seed: int) -> dict:
    """Initial router and adapter tensors of one layer, keyed by their name inside `mlp.moe_adapter`.

    Each tensor is drawn in float32 on the CPU and cast at once, in module order, so the
    values do not depend on device or dtype and only one float32 tensor exists at a time.
    """
    import torch

    from pesc.methods.seeding import layer_generator
    from pesc.methods.pesc.modeling_pesc import (
        AdapterDownProjection,
        AdapterUpProjection,
        PescMoEAdapter,
        PescRouter,
        init_expert_weights,
    )

    initialised = (PescRouter, AdapterDownProjection, AdapterUpProjection)  # drawn by init_expert_weights, each alone
    with torch.device("meta"):
        block = PescMoEAdapter(config)
    generator = layer_generator(seed, layer_idx)
    dtype = getattr(torch, config.moe_dtype) if config.moe_dtype else torch.float32
    state = {}
    for name, module in block.named_modules():
        if isinstance(module, initialised):
            module.to_empty(device="cpu")
            init_expert_weights(module, generator)
            state[f"{name}.weight"] = module.weight.detach().to(dtype)
            module.to_empty(device="meta")  # drop the float32 draw before the next one
    return state
