"""Merging a trained LoRA into the dense weights it sits on, for export: the only place pesc merges."""

import torch

from pesc.errors import PescError


def merge_lora(peft_model):
    """Merge every LoRA layer into its base weight, the addition done in float32, then drop peft's wrappers
    (a model without LoRA is returned as it is)."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(peft_model, "peft_config"):
        return peft_model
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            base_layer = module.get_base_layer()
            weight = base_layer.weight
            if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) or hasattr(weight, "quant_state"):
                raise PescError(
                    "refusing to merge the LoRA into a quantized base (re-quantizing adds rounding error): "
                    "export loads the base unquantized"
                )
            original = weight.dtype
            weight.data = weight.data.float()
            module.merge()
            weight.data = weight.data.to(original)
    return peft_model.unload()
