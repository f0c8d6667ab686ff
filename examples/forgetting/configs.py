"""The eight configurations, their trainable parameters, and the training YAML of each (configuration, seed).

Two blocks, one per claim. LoRAMoE's (experts beside the FFN linears, as in the paper): plain LoRA, LoRAMoE
without the constraint, with the official constraint, with the constraint pointing the way the paper describes.
PESC's (the same data): dense QLoRA, PESC 8 experts top-2, MoELoRA, MoLoRA.

Plain LoRA and dense QLoRA are LoRAMoE with one expert: the softmax over one router logit is exactly 1, so each
site computes W0 x + B A dropout(x) alpha/r, which is what peft's LoRA computes, with the same init (A kaiming
uniform, B zero). Their one-row routers train nothing (a constant softmax has zero gradient) and are counted.

Within a block the trainable parameter counts are matched: the anchor's settings are fixed (the papers'), and
each other configuration's rank (MoLoRA: its number of experts, the paper's knob) is the one whose count comes
closest to the anchor's.
"""

from dataclasses import dataclass

FFN = ["gate_proj", "up_proj", "down_proj"]
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORAMOE = {"num_experts": 6, "expert_rank": 4, "expert_alpha": 32, "expert_dropout": 0.05, "sites": FFN,
           "lbc_delta": 0.1}
MATCH_TOLERANCE = 0.10  # the largest relative gap to the anchor's count the plan accepts without a warning


@dataclass(frozen=True)
class Configuration:
    name: str
    block: str  # "loramoe" or "pesc": the claim it is part of
    label: str
    method: str
    moe: dict
    lora_r: int = 0  # peft LoRA of this rank on every dense linear (PESC); 0: none
    knob: str | None = None  # the moe setting chosen to match the block's anchor (a rank, or MoLoRA's expert count)
    alpha: str | None = None  # the moe setting that follows a rank knob...
    alpha_per_rank: float = 0.0  # ...as alpha = alpha_per_rank * rank
    anchor: bool = False
    routes: bool = False  # LoRAMoE with expert groups: read the routing of knowledge vs task rows


CONFIGS = [
    Configuration("lora", "loramoe", "LoRA", "loramoe",
                  {"num_experts": 1, "expert_dropout": 0.05, "sites": FFN, "lbc_loss_coef": 0},
                  knob="expert_rank", alpha="expert_alpha", alpha_per_rank=8),  # alpha/r of the experts: 32/4
    Configuration("loramoe-nolbc", "loramoe", "LoRAMoE, no constraint", "loramoe", {**LORAMOE, "lbc_loss_coef": 0},
                  anchor=True, routes=True),
    Configuration("loramoe-official", "loramoe", "LoRAMoE, official", "loramoe",
                  {**LORAMOE, "lbc_loss_coef": 0.1, "lbc_direction": "official"}, routes=True),
    Configuration("loramoe-towards", "loramoe", "LoRAMoE, towards_own_group", "loramoe",
                  {**LORAMOE, "lbc_loss_coef": 0.1, "lbc_direction": "towards_own_group"}, routes=True),
    Configuration("dense", "pesc", "dense QLoRA", "loramoe",
                  {"num_experts": 1, "expert_dropout": 0.05, "sites": ALL_LINEARS, "lbc_loss_coef": 0},
                  knob="expert_rank", alpha="expert_alpha", alpha_per_rank=2),  # alpha/r of PESC's LoRA: 16/8
    Configuration("pesc", "pesc", "PESC 8x top-2", "pesc",
                  {"num_experts": 8, "top_k": 2, "adapter_dim": 16, "moe_scaling": 0.25, "router_aux_loss_coef": 0.01},
                  lora_r=8, anchor=True),
    Configuration("moelora", "pesc", "MoELoRA 8x top-2", "moelora",
                  {"num_experts": 8, "top_k": 2, "sites": "q_proj,v_proj", "lora_dropout": 0.05},
                  knob="lora_rank", alpha="lora_alpha", alpha_per_rank=2),
    Configuration("molora", "pesc", "MoLoRA, soft", "molora", {"expert_rank": 4, "expert_alpha": 16},
                  knob="num_experts"),  # the paper's r 4 and alpha 16; its MoLoRA-N knob is the expert count N
]
BY_NAME = {conf.name: conf for conf in CONFIGS}
# LoRAMoE's official grouping (docs/methods/loramoe.md): type 1, knowledge, gets the first half of the experts
EXPERT_GROUPS = ["knowledge=0-2", "task=3-5"]


def moe_settings(conf: Configuration, knob: int | None) -> dict:
    """The configuration's `moe:` settings with its matched knob (and the alpha that follows a rank) filled in."""
    moe = dict(conf.moe)
    if conf.knob is not None:
        moe[conf.knob] = knob
        if conf.alpha is not None:
            moe[conf.alpha] = conf.alpha_per_rank * knob
    return moe


def added_params(base: str, conf: Configuration, knob: int | None) -> int:
    """The parameters the method adds to `base` (routers and experts), as `pesc inspect --method` counts them."""
    from pesc.checkpoint.config import read_config, resolve_method_config
    from pesc.methods import method_of

    config = resolve_method_config(read_config(base), conf.method, moe_settings(conf, knob))
    return method_of(config).parameter_summary(config).trainable_params


def lora_params(base: str, rank: int) -> int:
    """What peft's LoRA of this rank on every dense linear of `base` trains: rank * (in + out) per linear."""
    import torch
    from transformers import AutoModelForCausalLM

    from pesc.checkpoint.config import read_config

    if not rank:
        return 0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_config(base))
    return sum(rank * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL_LINEARS)


def trainable_params(base: str, conf: Configuration, knob: int | None) -> int:
    return added_params(base, conf, knob) + lora_params(base, conf.lora_r)


def plan(base: str) -> dict[str, dict]:
    """{name: {knob, trainable, anchor_trainable}}: each configuration's matched knob and planned count."""
    anchors = {conf.block: trainable_params(base, conf, None) for conf in CONFIGS if conf.anchor}
    planned = {}
    for conf in CONFIGS:
        target = anchors[conf.block]
        if conf.knob is None:
            knob, count = None, trainable_params(base, conf, None)
        else:
            # the count is linear in a rank or an expert count, a + b * knob: read a and b off knobs 1 and 2
            one, two = trainable_params(base, conf, 1), trainable_params(base, conf, 2)
            knob = max(1, round((target - (2 * one - two)) / (two - one)))
            count = trainable_params(base, conf, knob)
        planned[conf.name] = {"knob": knob, "trainable": count, "anchor_trainable": target}
    return planned


def training_yaml(conf: Configuration, knob: int | None, seed: int, base: str, data: str, output_dir: str,
                  settings: dict) -> dict:
    """The `pesc train` config of one (configuration, seed) unit."""
    config = {
        "base_model": base,
        "method": conf.method,
        "moe": {**moe_settings(conf, knob), "seed": seed},
        "load_in_4bit": False,  # a float32 base: frozen alike in every configuration
        "torch_dtype": "float32",
        "lora_target_modules": ALL_LINEARS if conf.lora_r else [],
        "datasets": [{"path": data, "type": "messages"}],
        "sequence_len": settings["sequence_len"],
        "sample_packing": True,
        "val_set_size": 0,
        "micro_batch_size": settings["micro_batch_size"],
        "max_steps": settings["steps"],
        "learning_rate": settings["learning_rate"],
        "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.03,
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 0.3,
        "gradient_checkpointing": False,
        "bf16": False,
        "output_dir": output_dir,
        "seed": seed,
        "logging_steps": settings["logging_steps"],
        "save_steps": settings["save_steps"],
        "save_total_limit": 1,
        "report_to": "none",
    }
    if conf.lora_r:
        config.update(lora_r=conf.lora_r, lora_alpha=2 * conf.lora_r, lora_dropout=0.05)
    return config
