"""The shapes of a dense decoder layer's linears, read from its config alone (no model built): what every
method's sites are sized by."""


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
