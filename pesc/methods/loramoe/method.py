"""LoRAMoE (Dou et al., arXiv 2312.09979): a router and N LoRA experts beside each FFN linear, all experts
active, with the localized balancing constraint over task types (docs/methods/loramoe.md).

The shipped code is pesc/modeling/{configuration,modeling}_loramoe.py; official adapters import with
pesc/methods/loramoe/official_import.py.
"""

import json
from dataclasses import dataclass

from pesc.errors import PescError
from pesc.methods.base import Method, SampleField, Setting
from pesc.methods.shapes import linear_shape

# The official code's task types: 1 = world knowledge (closed-book QA), 0 = every other task.
TASK_TYPE_NAMES = {"task": 0, "knowledge": 1}


@dataclass(frozen=True)
class TaskTypeField(SampleField):
    """`task_type`: a name (`task` = 0, `knowledge` = 1, the official types) or an integer >= 0 (an index into
    `lbc_groups`, for more than two types)."""

    def encode(self, value, where: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if value in self.values:
            return self.values[value]
        raise PescError(
            f"{where}: {self.name} {value!r} is not {', '.join(self.values)} or an integer >= 0 (an index into lbc_groups)"
        )


def _truthy(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if str(value).strip().lower() not in words:
        raise PescError(f"{where} must be true or false, got {value!r}")
    return words[str(value).strip().lower()]


class Loramoe(Method):
    name = "loramoe"
    label = "LoRAMoE"
    description = (
        "LoRAMoE (arXiv 2312.09979): a router and N LoRA experts beside each FFN linear, dense softmax over "
        "all experts; aux loss: localized balancing constraint over task types (lbc_loss)"
    )
    settings = (  # defaults and ranges: configuration_loramoe.LoramoeConfig
        Setting("num_experts", (int,), "LoRA experts per site", structural=True),
        Setting("expert_rank", (int,), "rank r of every LoRA expert", structural=True),
        Setting("expert_alpha", (int, float), "LoRA alpha of the experts (output scaled by alpha / r)",
                structural=True),
        Setting("expert_dropout", (int, float), "dropout on the experts' input"),
        Setting("sites", (list, str), "linears that get experts (a list, or comma-separated on the command line)",
                structural=True),
        Setting("lbc_delta", (int, float), "delta of the localized balancing constraint"),
        Setting("lbc_loss_coef", (int, float), "beta: weight of lbc_loss in the training loss"),
        Setting("lbc_groups", (list, str), "experts of each task type's group, a list of lists (JSON on the command "
                "line); None: the official halves"),
        Setting("lbc_reduction", (str,), "reduction of the constraint over sites and layers (sum or mean)"),
        Setting("lbc_include_padding", (bool, str), "sum router weights over padding tokens too (official)"),
        Setting("lbc_direction", (str,), "official: a sample's own group weighs 1 + delta (pulls its routing off the "
                "group); towards_own_group: 1 - delta (pulls it onto the group)"),
    )
    import_commands = {"loramoe": "pesc.methods.loramoe.import_command:import_loramoe"}
    vllm_model = "pesc.methods.loramoe.vllm_model:LoramoeForCausalLM"
    prefix = "loramoe_"
    sample_fields = (
        TaskTypeField("task_type", values=TASK_TYPE_NAMES, required=True,
                      help="task, knowledge, or an integer index into lbc_groups"),
    )  # fmt: skip
    card_tags = ("loramoe", "lora-experts")

    config_class_path = "configuration_loramoe.LoramoeConfig"
    model_class_path = "modeling_loramoe.LoramoeForCausalLM"
    auto_model_class_path = "modeling_loramoe.LoramoeModel"
    zero3_leaf_module_paths = ("modeling_loramoe.LoramoeExperts",)

    def check_settings(self, values: dict, where: str = "moe.") -> dict:
        """Command-line strings to their values, then what the config refuses (one line, naming the setting)."""
        if isinstance(values["lbc_groups"], str):
            try:
                values["lbc_groups"] = json.loads(values["lbc_groups"])
            except ValueError:
                given = values["lbc_groups"]
                raise PescError(f"{where}lbc_groups must be a JSON list of lists, got {given!r}") from None
        values["lbc_include_padding"] = _truthy(values["lbc_include_padding"], f"{where}lbc_include_padding")
        return super().check_settings(values, where)

    def default_lora_targets(self, config) -> list[str]:
        """None: LoRAMoE trains only its routers and experts, as the official code does."""
        return []

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        """Each site's router and A drawn kaiming-uniform (a=sqrt 5) from the layer's seeded generator, B zero."""
        import torch

        from pesc.modeling.moe_sites import LINEAR_PARENTS
        from pesc.methods.loramoe.modeling_loramoe import LoramoeExperts, init_loramoe_weights
        from pesc.methods.seeding import layer_generator

        generator = layer_generator(seed, layer_idx)
        dtype = getattr(torch, config.moe_dtype) if config.moe_dtype else torch.float32
        shapes = site_shapes(config)
        state = {}
        for site in config.sites:
            in_features, out_features = shapes[site]
            module = LoramoeExperts(in_features, out_features, config.num_experts, config.expert_rank,
                                    config.expert_alpha, 0.0)  # fmt: skip
            init_loramoe_weights(module, generator)
            prefix = f"{LINEAR_PARENTS[site]}.loramoe_{site}"
            for name, tensor in module.state_dict().items():
                state[f"{prefix}.{name}"] = tensor.to(dtype)
        return state

    def card_text(self, config, base_model: str, converted: bool = False) -> str:
        state = (
            " The experts' B matrices start at zero, so this checkpoint computes exactly what the base model "
            "computes until it is trained (`pesc train`)." if converted else ""
        )
        return (
            f"A LoRAMoE model (arXiv 2312.09979) made from the dense {base_model} with pesc: each of "
            f"{', '.join(f'`{s}`' for s in config.sites)} in every layer has a router and {config.num_experts} LoRA "
            f"experts of rank {config.expert_rank} beside it, all active for every token (dense softmax), trained "
            "with the localized balancing constraint over task types. The base tensors keep their names; each site "
            "adds `loramoe_<linear>.router.weight`, `.experts_A.weight` (the experts' A stacked) and "
            f"`.experts_B.weight` (their B side by side).{state}"
        )


def site_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each site's linear in a model of `config`."""
    return {site: linear_shape(config, site) for site in config.sites}


LORAMOE = Loramoe()
