"""Adapters saved by the official LoRAMoE code, read as pesc LoRAMoE tensors (`pesc import loramoe`).

The official code (Ablustrund/LoRAMoE, a patched copy of peft) saves only an adapter:
adapter_config.json (`r`, `lora_alpha`, `lora_nums`, `blc_alpha`, `blc_weight`, `target_modules`,
`lora_dropout`) and adapter_model.bin with, per layer and FFN linear, the router
`base_model.model.model.layers.N.mlp.gate_proj.lora_route.weight` [N, in] and each expert's
`...lora_A{i}.weight` [r, in] and `...lora_B{i}.weight` [out, r]. Here the pickle is read with
`weights_only=True` (or the safetensors file, where one was saved), every tensor is checked against
the base model the adapter must have been trained on, and each site's experts are stacked into
pesc's layout (`...mlp.loramoe_gate_proj.{router,experts_A,experts_B}.weight`, see
pesc/modeling/modeling_loramoe.py), which computes what the official code computes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pesc.convert import _load_bin, read_safetensors_header
from pesc.errors import PescError
from pesc.modeling.modeling_loramoe import SITE_PARENTS

_OFFICIAL_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<site>\w+)\."
    r"(?P<part>lora_route|lora_A(?P<a>\d+)|lora_B(?P<b>\d+))\.weight$"
)


@dataclass
class OfficialAdapter:
    """An official adapter in pesc's terms: LoRAMoE settings, and the stacked tensors under pesc's names."""

    settings: dict
    tensors: dict  # pesc tensor name -> torch.Tensor, layer by layer, site by site
    weights_file: Path


def expert_tensor_name(layer_idx: int, site: str, part: str) -> str:
    """The name pesc's LoRAMoE checkpoint gives a site's `router`, `experts_A` or `experts_B` weight."""
    return f"model.layers.{layer_idx}.{SITE_PARENTS[site]}.loramoe_{site}.{part}.weight"


def _official_name(layer_idx: int, site: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer_idx}.{SITE_PARENTS[site]}.{site}.{part}.weight"


def _positive_int(raw: dict, name: str, src: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PescError(f"{src}/adapter_config.json: {name} must be a positive integer, got {value!r}")
    return value


def _number(raw: dict, name: str, src: str, default: float) -> float:
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise PescError(f"{src}/adapter_config.json: {name} must be a number >= 0, got {value!r}")
    return value


def read_adapter_config(folder: Path, src: str) -> dict:
    """adapter_config.json of an official LoRAMoE adapter, or a one-line error saying what the folder is instead."""
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise PescError(
            f"{src} has no adapter_config.json: give the folder the official LoRAMoE code saved "
            "(adapter_config.json and adapter_model.bin)"
        ) from None
    except (OSError, ValueError) as error:
        raise PescError(f"{src}/adapter_config.json is not valid JSON ({error}): fix or save it again") from None
    if not isinstance(raw, dict):
        raise PescError(f"{src}/adapter_config.json is not a JSON object: fix or save it again")
    if "lora_nums" not in raw:
        raise PescError(
            f"{src} is a plain LoRA adapter (its adapter_config.json has no lora_nums): `pesc import loramoe` "
            "reads adapters saved by the official LoRAMoE code; load a plain LoRA adapter with peft"
        )
    _positive_int(raw, "r", src)
    _positive_int(raw, "lora_nums", src)
    alpha = raw.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise PescError(f"{src}/adapter_config.json: lora_alpha must be a positive number, got {alpha!r}")
    return raw


def official_settings(raw: dict, src: str, defaults: dict) -> dict:
    """pesc's LoRAMoE settings for an official adapter_config.json (constraint settings: `defaults` where absent)."""
    num_experts = raw["lora_nums"]
    settings = {
        "num_experts": num_experts,
        "expert_rank": raw["r"],
        "expert_alpha": raw["lora_alpha"],
        "expert_dropout": _number(raw, "lora_dropout", src, defaults["expert_dropout"]),
        "lbc_delta": _number(raw, "blc_alpha", src, defaults["lbc_delta"]),
        "lbc_loss_coef": _number(raw, "blc_weight", src, defaults["lbc_loss_coef"]),
    }
    if settings["expert_dropout"] >= 1 or settings["lbc_delta"] >= 1:
        raise PescError(f"{src}/adapter_config.json: lora_dropout and blc_alpha must be below 1")
    if num_experts % 2 and settings["lbc_loss_coef"] > 0:
        raise PescError(
            f"{src}/adapter_config.json has an odd lora_nums ({num_experts}) with the balancing constraint on "
            f"(blc_weight {settings['lbc_loss_coef']}): the official constraint splits the experts into two halves, "
            "so the official code cannot have trained it; set blc_weight to 0 there to import the experts alone"
        )
    return settings


def _weights(folder: Path, src: str) -> tuple[dict, Path]:
    """The adapter's tensors (safetensors preferred; the pickle read with weights_only=True)."""
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        read_safetensors_header(safetensors_file)  # a damaged file: a one-line error, not a traceback
        return load_file(safetensors_file), safetensors_file
    if bin_file.is_file():
        return _load_bin(bin_file), bin_file
    raise PescError(f"{src} has an adapter_config.json but no adapter_model.bin or adapter_model.safetensors")


def _site_shapes(base_config, sites) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each site's linear in the base model (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    layer = model.model.layers[0]
    shapes = {}
    for site in sites:
        linear = getattr(getattr(layer, SITE_PARENTS[site], None), site, None)
        if linear is None or not hasattr(linear, "in_features"):
            raise PescError(f"a {base_config.model_type} model has no linear {SITE_PARENTS[site]}.{site} for LoRAMoE")
        shapes[site] = (linear.in_features, linear.out_features)
    return shapes


def _group_by_site(state: dict, src: str, num_experts: int) -> dict:
    """{(layer, site): {official part name: tensor}}, refusing tensors that are not a LoRAMoE site's."""
    found: dict = {}
    for name, tensor in state.items():
        match = _OFFICIAL_NAME.match(name)
        site = match and match["site"]
        if not match or SITE_PARENTS.get(site) != match["parent"]:
            raise PescError(
                f"{src} holds {name}, which is not a LoRAMoE router or expert of a model layer's linear: "
                "give an adapter saved by the official LoRAMoE code"
            )
        index = match["a"] or match["b"]
        if index is not None and int(index) >= num_experts:
            raise PescError(f"{src} holds {name}, but its adapter_config.json says lora_nums {num_experts}")
        found.setdefault((int(match["layer"]), site), {})[match["part"]] = tensor
    return found


def read_official_adapter(adapter_dir: str | Path, base_config, base_label: str, defaults: dict) -> OfficialAdapter:
    """Read and check an official LoRAMoE adapter against the base model's config; stack it into pesc's names.

    `defaults`: pesc's LoRAMoE defaults, for the constraint settings an adapter_config.json leaves out.
    """
    import torch

    folder, src = Path(adapter_dir), str(adapter_dir)
    raw = read_adapter_config(folder, src)
    settings = official_settings(raw, src, defaults)
    num_experts, rank = settings["num_experts"], settings["expert_rank"]
    state, weights_file = _weights(folder, src)
    found = _group_by_site(state, src, num_experts)
    sites = tuple(s for s in SITE_PARENTS if any(site == s for _, site in found))
    if not sites:
        raise PescError(f"{src}: {weights_file.name} holds no LoRAMoE tensors: give an adapter the official code saved")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and set(sites) != set(targets) & set(SITE_PARENTS):
        raise PescError(
            f"{src}: adapter_config.json targets {', '.join(map(str, targets))}, but {weights_file.name} holds "
            f"experts on {', '.join(sites)}: the adapter is incomplete; save it again"
        )
    settings["sites"] = list(sites)
    trained_on = raw.get("base_model_name_or_path")
    other_base = f"it was trained on another base model{f' ({trained_on})' if trained_on else ''}; give that one as --base"
    layers = base_config.num_hidden_layers
    beyond = sorted(layer for layer, _ in found if layer >= layers)
    if beyond:
        raise PescError(f"{src} has experts for layer {beyond[-1]}, but {base_label} has {layers} layers: {other_base}")
    shapes = _site_shapes(base_config, sites)
    tensors = {}
    for layer_idx in range(layers):
        for site in sites:
            parts = found.get((layer_idx, site), {})
            wanted = ["lora_route", *(f"lora_A{i}" for i in range(num_experts)), *(f"lora_B{i}" for i in range(num_experts))]
            missing = [p for p in wanted if p not in parts]
            if missing:
                what = "has no experts for that layer" if len(missing) == len(wanted) else "is incomplete; save it again"
                raise PescError(
                    f"{src} lacks {_official_name(layer_idx, site, missing[0])}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the adapter {what}"
                    + (f" ({other_base})" if len(missing) == len(wanted) else "")
                )
            in_features, out_features = shapes[site]
            expected = {"lora_route": (num_experts, in_features)}
            expected |= {f"lora_A{i}": (rank, in_features) for i in range(num_experts)}
            expected |= {f"lora_B{i}": (out_features, rank) for i in range(num_experts)}
            for part, shape in expected.items():
                if tuple(parts[part].shape) != shape:
                    raise PescError(
                        f"{src}: {_official_name(layer_idx, site, part)} has shape {list(parts[part].shape)}, but "
                        f"{base_label} with r {rank} and lora_nums {num_experts} needs {list(shape)}: {other_base}"
                    )
            tensors[expert_tensor_name(layer_idx, site, "router")] = parts["lora_route"]
            tensors[expert_tensor_name(layer_idx, site, "experts_A")] = torch.cat(
                [parts[f"lora_A{i}"] for i in range(num_experts)], dim=0
            )
            tensors[expert_tensor_name(layer_idx, site, "experts_B")] = torch.cat(
                [parts[f"lora_B{i}"] for i in range(num_experts)], dim=1
            )
    return OfficialAdapter(settings, tensors, weights_file)
