"""What the toolkit halves of MoV and MoLoRA share: the seeded draw of a layer's sites (pesc convert and
training from dense draw the same tensors). Imports torch only where a draw is made (listing the methods must
not load it)."""


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
