"""Adapters saved by the official LoRAMoE code, read as pesc LoRAMoE tensors (`pesc import loramoe`).

The official code (Ablustrund/LoRAMoE, a patched copy of peft) saves only an adapter:
adapter_config.json (`r`, `lora_alpha`, `lora_nums`, `blc_alpha`, `blc_weight`, `target_modules`,
`lora_dropout`) and adapter_model.bin with, per layer and FFN linear, the router
`base_model.model.model.layers.N.mlp.gate_proj.lora_route.weight` [N, in] and each expert's
`...lora_A{i}.weight` [r, in] and `...lora_B{i}.weight` [out, r]. Here the pickle is read with
`weights_only=True` (or the safetensors file, where one was saved), every tensor is checked against
the base model the adapter must have been trained on, and each site's experts are stacked into
pesc's layout (`...mlp.loramoe_gate_proj.{router,experts_A,experts_B}.weight`, see
pesc/methods/loramoe/modeling_loramoe.py), which computes what the official code computes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pesc.checkpoint.headers import _load_bin, read_safetensors_header
from pesc.errors import PescError
from pesc.finite import refuse_non_finite
from pesc.modeling.moe_sites import LINEAR_PARENTS

_OFFICIAL_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<site>\w+)\."
    r"(?P<part>lora_route|lora_A(?P<a>\d+)|lora_B(?P<b>\d+))\.weight$"
)


@dataclass
class OfficialAdapter:
    """An official adapter in pesc's terms: LoRAMoE settings, its config for the base, and the stacked tensors."""

    settings: dict
    config: object  # the LoramoeConfig of the base with the adapter's settings
    layers: list  # per decoder layer: {name inside the layer (`mlp.loramoe_gate_proj.router.weight`): tensor}
    weights_file: Path

    @property
    def tensors(self) -> dict:
        """Every tensor under its checkpoint name (`model.layers.N.mlp.loramoe_gate_proj.router.weight`)."""
        return {f"model.layers.{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.items()}


def layer_tensor_name(site: str, part: str) -> str:
    """The name, inside a decoder layer, of a site's `router`, `experts_A` or `experts_B` weight."""
    return f"{LINEAR_PARENTS[site]}.loramoe_{site}.{part}.weight"


def expert_tensor_name(layer_idx: int, site: str, part: str) -> str:
    """The name pesc's LoRAMoE checkpoint gives a site's `router`, `experts_A` or `experts_B` weight."""
    return f"model.layers.{layer_idx}.{layer_tensor_name(site, part)}"


def _official_name(layer_idx: int, site: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer_idx}.{LINEAR_PARENTS[site]}.{site}.{part}.weight"


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


def _group_by_site(state: dict, src: str, num_experts: int) -> dict:
    """{(layer, site): {official part name: tensor}}, refusing tensors that are not a LoRAMoE site's."""
    found: dict = {}
    for name, tensor in state.items():
        match = _OFFICIAL_NAME.match(name)
        site = match and match["site"]
        if not match or LINEAR_PARENTS.get(site) != match["parent"]:
            raise PescError(
                f"{src} holds {name}, which is not a LoRAMoE router or expert of a model layer's linear: "
                "give an adapter saved by the official LoRAMoE code"
            )
        index = match["a"] or match["b"]
        if index is not None and int(index) >= num_experts:
            raise PescError(f"{src} holds {name}, but its adapter_config.json says lora_nums {num_experts}")
        found.setdefault((int(match["layer"]), site), {})[match["part"]] = tensor
    return found


def read_official_adapter(adapter_dir: str | Path, base_config, base_label: str) -> OfficialAdapter:
    """Read and check an official LoRAMoE adapter against the (dense) base model's config; stack it into pesc's
    layout. Constraint settings the adapter_config.json leaves out get pesc's LoRAMoE defaults."""
    import torch

    from pesc.methods.loramoe import LORAMOE, site_shapes

    folder, src = Path(adapter_dir), str(adapter_dir)
    raw = read_adapter_config(folder, src)
    defaults = {setting.name: setting.default for setting in LORAMOE.settings}
    settings = official_settings(raw, src, defaults)
    num_experts, rank = settings["num_experts"], settings["expert_rank"]
    state, weights_file = _weights(folder, src)
    found = _group_by_site(state, src, num_experts)
    sites = tuple(s for s in LINEAR_PARENTS if any(site == s for _, site in found))
    if not sites:
        raise PescError(f"{src}: {weights_file.name} holds no LoRAMoE tensors: give an adapter the official code saved")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and set(sites) != set(targets) & set(LINEAR_PARENTS):
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
    try:
        config = LORAMOE.config_from_dense(base_config, LORAMOE.resolve_settings(settings))
    except ValueError as error:
        raise PescError(f"cannot import {src} onto {base_label}: {error}") from None
    shapes = site_shapes(config)
    per_layer = []
    for layer_idx in range(layers):
        tensors = {}
        for site in sites:
            parts = found.get((layer_idx, site), {})
            wanted = ["lora_route", *(f"lora_A{i}" for i in range(num_experts)), *(f"lora_B{i}" for i in range(num_experts))]
            missing = [p for p in wanted if p not in parts]
            held = next(i for i in range(num_experts + 1) if f"lora_A{i}" not in parts)
            if missing and 0 < held < num_experts and not any(f"lora_A{i}" in parts for i in range(held, num_experts)):
                raise PescError(f"{src}: adapter_config.json says lora_nums {num_experts}, but its weights hold {held} "
                                "experts per site: correct lora_nums there")
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
            refuse_non_finite(((_official_name(layer_idx, site, part), parts[part]) for part in expected), f"in {src}")
            tensors[layer_tensor_name(site, "router")] = parts["lora_route"]
            tensors[layer_tensor_name(site, "experts_A")] = torch.cat([parts[f"lora_A{i}"] for i in range(num_experts)])
            tensors[layer_tensor_name(site, "experts_B")] = torch.cat(
                [parts[f"lora_B{i}"] for i in range(num_experts)], dim=1
            )
        per_layer.append(tensors)
    return OfficialAdapter(settings, config, per_layer, weights_file)


def _model_card(plan, adapter_src: str, base_text: str):
    from pesc.model_card import build_model_card

    method, config = plan.settings.method, plan.config
    description = (
        f"The LoRAMoE adapter `{Path(adapter_src).name}` (saved by the official LoRAMoE code, arXiv 2312.09979) on "
        f"{base_text}, imported by `pesc import loramoe`: the same experts, stacked per site, with pesc's model "
        "code, which computes what the official code computes on current transformers, trains further with "
        f"`pesc train` and exports with `pesc export`.\n\n{method.card_text(config, base_text)}"
    )
    base = plan.hub_id or plan.src.name
    return build_model_card(
        config,
        title=f"{base.split('/')[-1]} {method.card_title(config)} (imported)",
        base_model=base,
        base_model_id=plan.hub_id,
        description=description,
        extra_settings={"moe_dtype": config.moe_dtype},
    )


def import_loramoe(
    adapter_dir: str | Path,
    out: str | Path,
    base: str,
    link: bool = False,
    force: bool = False,
    echo=print,
):
    """Write the official LoRAMoE adapter ADAPTER_DIR on the dense model BASE as a pesc LoRAMoE checkpoint at OUT.

    The base shards are copied (or hard-linked) as `pesc convert` copies them, the experts written from the
    adapter; every check runs before anything is written, and an error leaves no OUT (pesc.atomic)."""
    import torch

    from pesc.atomic import IMPORT_MARKER, atomic_output_dir
    from pesc.checkpoint.config import read_config
    from pesc.checkpoint.shard_writer import BaseShardWriter, Progress
    from pesc.checkpoint.source import early_sources
    from pesc.convert import ConvertSettings, plan_conversion, write_rest

    out = Path(out).expanduser()
    progress = Progress()
    with atomic_output_dir(out, force, sources=(Path(base).expanduser(), Path(adapter_dir))) as folder:
        writer = BaseShardWriter(folder, link, progress)
        try:
            early = early_sources(str(base), out, force)
            adapter = read_official_adapter(adapter_dir, read_config(early.folder), str(base))
            settings = ConvertSettings(method="loramoe", **adapter.settings)
            plan = plan_conversion(str(base), early, out, settings, link, force)
            dtype = getattr(torch, plan.config.moe_dtype)  # the experts are stored in the base's dtype
            layers = [{name: t.to(dtype) for name, t in layer.items()} for layer in adapter.layers]
            s = adapter.settings
            echo(
                f"adapter   {adapter.weights_file}: {s['num_experts']} experts of rank {s['expert_rank']} "
                f"(alpha {s['expert_alpha']}) on {', '.join(s['sites'])}, {len(layers)} layers; "
                f"lbc_delta {s['lbc_delta']}, lbc_loss_coef {s['lbc_loss_coef']}"
            )
            progress.show((0 if link else plan.source_bytes) + plan.expert_bytes)
            writer.start(plan.sources)
            base_text = f"[{plan.hub_id}](https://huggingface.co/{plan.hub_id})" if plan.hub_id else f"`{plan.src.name}`"
            result = write_rest(plan, folder, writer, progress, card=_model_card(plan, str(adapter_dir), base_text),
                                marker_file=IMPORT_MARKER, written_by="pesc import loramoe",
                                layer_state=lambda layer_idx: dict(layers[layer_idx]))  # fmt: skip
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.close()
    echo(f"wrote     {result.out}: experts in safetensors, base shards {'linked' if link else 'copied'}")
    echo(f"load with AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    return result
