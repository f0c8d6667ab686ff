"""The shipped model code: the shared moe_*.py files, one concern each (the flat config, routing records and
losses, dropout masks, the routed dispatch, sibling sites, the causal LM), and each method's configuration_<m>.py /
modeling_<m>.py. A checkpoint ships its method's files and the shared ones they import (`Method.modeling_files`).

Importing this package registers the classes with the transformers Auto* factories, so
`AutoModelForCausalLM.from_pretrained` works on a checkpoint of a shipped method (PESC, LoRAMoE,
MoV, MoLoRA, MoELoRA) without remote code whenever pesc is installed, and `save_pretrained` copies the
model code into the folder.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_loramoe import LoramoeConfig
from .configuration_moelora import MoELoraConfig
from .configuration_molora import MoLoRAConfig
from .configuration_mov import MoVConfig
from .configuration_pesc import PescConfig
from .modeling_moelora import MoELoraForCausalLM, MoELoraModel
from .modeling_molora import MoLoRAForCausalLM, MoLoRAModel
from .modeling_mov import MoVForCausalLM, MoVModel
from .modeling_pesc import (
    PescAdapter,
    PescForCausalLM,
    PescMLP,
    PescModel,
    PescMoEAdapter,
    PescRouter,
    init_expert_weights,
)
from .modeling_loramoe import LoramoeForCausalLM, LoramoeModel
from .moe_routing import RoutingRecord, emit_routing_record, load_balancing_loss, record_routing
from .moe_sites import attach_sibling

for _config_class, _backbone_class, _model_class in (
    (PescConfig, PescModel, PescForCausalLM),
    (LoramoeConfig, LoramoeModel, LoramoeForCausalLM),
    (MoVConfig, MoVModel, MoVForCausalLM),
    (MoLoRAConfig, MoLoRAModel, MoLoRAForCausalLM),
    (MoELoraConfig, MoELoraModel, MoELoraForCausalLM),
):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _backbone_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)
    _config_class.register_for_auto_class()
    _backbone_class.register_for_auto_class("AutoModel")
    _model_class.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LoramoeConfig",
    "LoramoeForCausalLM",
    "LoramoeModel",
    "MoELoraConfig",
    "MoELoraForCausalLM",
    "MoELoraModel",
    "MoLoRAConfig",
    "MoLoRAForCausalLM",
    "MoLoRAModel",
    "MoVConfig",
    "MoVForCausalLM",
    "MoVModel",
    "PescAdapter",
    "PescConfig",
    "PescForCausalLM",
    "PescMLP",
    "PescModel",
    "PescMoEAdapter",
    "PescRouter",
    "init_expert_weights",
    "load_balancing_loss",
    "RoutingRecord",
    "attach_sibling",
    "emit_routing_record",
    "record_routing",
]
