"""What the toolkit halves of MoV and MoLoRA share: the shapes of the dense linears their sites sit beside,
and the seeded draw of a layer's sites (pesc convert and training from dense draw the same tensors).
Imports torch only where a draw is made (listing the methods must not load it)."""


def attention_dims(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a dense family's config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def linear_shape(config, linear: str) -> tuple[int, int]:
    """(in_features, out_features) of one of the seven projections of a decoder layer, from the config."""
    heads, kv_heads, head_dim = attention_dims(config)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }[linear]


def draw_sites(config, sites: dict, layer_idx: int, seed: int) -> dict:
    """Each site's `reset_parameters` from the layer's seeded generator, in the order given, as tensors keyed
    `<site name in the layer>.<parameter>` in the config's moe_dtype (drawn in float32 on the CPU)."""
    import torch

    from pesc.methods.seeding import layer_generator

    generator = layer_generator(seed, layer_idx)
    dtype = getattr(torch, config.moe_dtype) if config.moe_dtype else torch.float32
    state = {}
    for site_name, site in sites.items():
        site.reset_parameters(generator)
        state.update({f"{site_name}.{name}": tensor.detach().to(dtype) for name, tensor in site.state_dict().items()})
    return state
