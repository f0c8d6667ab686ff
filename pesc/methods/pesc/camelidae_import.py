"""`pesc import camelidae`: published Camelidae and Qwen2idae checkpoints as pesc checkpoints.

Their tensors already carry pesc's names (pesc kept the Camelidae layout: `mlp.moe_adapter.router`,
`mlp.moe_adapter.experts.expert_J.adapter_{down,up}`); what stands in the way is their config.json
(`model_type` camelidae or qwen2idae, with model code that runs only on transformers 4.x) and, for
the Camelidae releases, pickle `.bin` shards. An import keeps every tensor as it is: safetensors
shards are copied (or hard-linked) byte for byte, `.bin` shards re-written as safetensors (read
with `weights_only=True`), and config.json becomes a PescConfig with pesc's model code beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pesc.atomic import IMPORT_MARKER, atomic_output_dir, check_output_dir
from pesc.checkpoint.headers import find_weight_files
from pesc.checkpoint.shard_writer import BaseShardWriter, Progress
from pesc.checkpoint.source import resolve_source
from pesc.convert import ConvertResult, ConvertSettings, Plan, check_weights, meta_model, write_rest
from pesc.errors import PescError

# model_type of a published release -> the dense family its layers are built from
PUBLISHED_FAMILIES = {"camelidae": "llama", "qwen2idae": "qwen2"}
# The MoE fields of their config.json; everything else is the dense family's own
_MOE_FIELDS = ("num_experts", "topk", "adapter_dim", "moe_scaling", "moe_dtype", "output_router_logits")


def _published_config(folder: Path, src: str) -> dict:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise PescError(f"{src} has no config.json: give the folder of a Camelidae or Qwen2idae checkpoint") from None
    except (OSError, ValueError) as error:
        raise PescError(f"{src}/config.json is not valid JSON ({error}): fix or re-download it") from None
    model_type = raw.get("model_type")
    if model_type not in PUBLISHED_FAMILIES:
        hint = " (it is already a pesc checkpoint)" if model_type == "pesc" else ""
        raise PescError(
            f"{src} is not a Camelidae or Qwen2idae checkpoint: its model_type is {model_type!r}{hint}; "
            f"`pesc import camelidae` reads model_type {' or '.join(PUBLISHED_FAMILIES)}"
        )
    missing = [name for name in ("num_experts", "topk", "adapter_dim") if name not in raw]
    if missing:
        raise PescError(f"{src}/config.json lacks {', '.join(missing)}: it is not a complete {model_type} config")
    topk, experts = raw["topk"], raw["num_experts"]
    if isinstance(topk, int) and isinstance(experts, int) and topk > experts:  # other bad values: ConvertSettings
        # the router's rows fix num_experts; topk is read from config.json alone (the import has no flag for it)
        raise PescError(f"{src}/config.json routes each token to topk {topk} of its num_experts {experts} experts: "
                        f"set topk there to at most {experts} (the published models use 2)")
    return raw


def plan_import(src: str, out: Path, link: bool, force: bool) -> tuple[Plan, str]:
    """Check the published checkpoint against a PESC model of its config, write nothing: (plan, its model_type)."""
    from transformers import AutoConfig

    folder, hub_id = resolve_source(src)
    check_output_dir(out, force, (folder,))
    raw = _published_config(folder, src)
    family = PUBLISHED_FAMILIES[raw["model_type"]]
    dense_fields = {k: v for k, v in raw.items() if k not in (*_MOE_FIELDS, "model_type", "architectures", "auto_map")}
    settings = ConvertSettings(
        num_experts=raw["num_experts"],
        top_k=raw["topk"],
        adapter_dim=raw["adapter_dim"],
        moe_scaling=raw.get("moe_scaling"),
        router_aux_loss_coef=raw.get("router_aux_loss_coef"),
    )
    method = settings.method
    try:
        config = method.config_from_dense(
            AutoConfig.for_model(family, **dense_fields), settings.values, moe_dtype=raw.get("moe_dtype")
        )
    except (ValueError, TypeError) as error:
        raise PescError(f"cannot import {src}: {error}") from None
    sources = find_weight_files(folder)
    check_weights(method, meta_model(method, config), config, sources, folder, with_experts=True)
    return Plan(folder, hub_id, out, settings, config, sources, [], link, force), raw["model_type"]


def _model_card(plan: Plan, model_type: str):
    from pesc.model_card import build_model_card

    name = plan.hub_id or plan.src.name
    base_text = f"[{plan.hub_id}](https://huggingface.co/{plan.hub_id})" if plan.hub_id else f"`{plan.src.name}`"
    description = (
        f"{base_text}, a published {model_type.capitalize()} checkpoint (Parameter-Efficient Sparsity Crafting, "
        "arXiv 2401.02731), imported by `pesc import camelidae`: the same tensors, now with pesc's model code, "
        "which runs on current transformers, trains further with `pesc train` and exports with `pesc export`."
    )
    return build_model_card(
        plan.config,
        title=f"{name.split('/')[-1]} (pesc)",
        base_model=name,
        base_model_id=plan.hub_id,
        description=description,
        extra_settings={"moe_dtype": plan.config.moe_dtype},
    )


def import_camelidae(
    src: str | Path, out: str | Path, link: bool = False, force: bool = False, echo: Callable[[str], None] = print
) -> ConvertResult:
    """Write the Camelidae or Qwen2idae checkpoint SRC (folder or Hub id) as a pesc checkpoint at OUT."""
    out = Path(out).expanduser()
    progress = Progress()
    with atomic_output_dir(out, force, sources=(Path(src).expanduser(),)) as folder:
        base = BaseShardWriter(folder, link, progress)
        try:
            plan, model_type = plan_import(str(src), out, link, force)
            settings = plan.settings
            echo(
                f"source    {plan.source_label}: {model_type} ({plan.config.base_model_type} layers), "
                f"{settings.num_experts} experts, top-{settings.top_k}, adapter_dim {settings.adapter_dim}, "
                f"moe_scaling {settings.moe_scaling}, {len(plan.sources)} weight file(s)"
            )
            progress.show(plan.source_bytes)
            base.start(plan.sources)
            result = write_rest(plan, folder, base, progress, card=_model_card(plan, model_type),
                                marker_file=IMPORT_MARKER, written_by="pesc import camelidae")
        except BaseException:
            base.abort()
            raise
        finally:
            progress.close()
    how = {"linked": "hard-linked", "copied": "copied", "rewritten": ".bin re-written as safetensors"}
    counts = ", ".join(f"{getattr(result, key)} shard(s) {text}" for key, text in how.items() if getattr(result, key))
    echo(f"wrote     {result.out}: {counts}")
    echo(f"load with AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    return result
