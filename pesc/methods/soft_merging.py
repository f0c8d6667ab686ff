"""What the toolkit halves of MoV and MoLoRA share: the seeded draw of a layer's sites (pesc convert and
training from dense draw the same tensors), on a decoder layer or a T5 block. Imports torch only where a draw is
made (listing the methods must not load it)."""


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


def draw_block_sites(method, config, layer_idx: int, seed: int) -> dict:
    """`draw_sites` of one T5 block (`layer_idx`: its position in `method.layer_prefixes`, encoder blocks first),
    its sites made by the method's seq2seq class itself on a lone block on the meta device, so the draw and the
    model cannot disagree on a site; keyed by their names inside the block (`layer.0.SelfAttention.mov_k...`)."""
    import copy

    import torch
    from transformers.models.t5.modeling_t5 import T5Block

    decoder = layer_idx >= config.num_layers
    block_idx = layer_idx - config.num_layers if decoder else layer_idx
    block_config = copy.deepcopy(config)
    block_config.is_decoder = decoder
    with torch.device("meta"):
        block = T5Block(block_config, layer_idx=block_idx)
        method.seq2seq_model_class.add_method_modules(block, "decoder" if decoder else "encoder", block_idx, config)
    sites = {name: module.to_empty(device="cpu") for name, module in block.named_modules()
             if name.rpartition(".")[2].startswith(method.prefix)}
    return draw_sites(config, sites, layer_idx, seed)
