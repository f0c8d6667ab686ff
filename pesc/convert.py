"""Streaming conversion of a dense checkpoint into a method's sparse checkpoint (PESC by default; the format: docs/model.md).

Every method leaves every base tensor unchanged (its modules are added under their own names),
so the converter never loads the model:

1. it reads the source's config and only the *headers* of its safetensors shards, and
   checks every tensor's name and shape against the method's model built on the meta device;
2. it copies (or hard-links) the source safetensors shards byte for byte, renamed to
   `model-0000N-of-0000M.safetensors` (pickle `.bin` shards are re-written as safetensors
   one file and one tensor at a time, memory-mapped); the copy of safetensors shards
   starts before step 1's checks, which import torch and transformers, and overlaps them;
3. it draws the added tensors layer by layer, a few layers ahead in worker threads
   (the method's `initial_state`, so the same seed gives exactly what training from dense draws), and
   streams them into new shards no larger than `max_shard_size`, all-zero tensors as holes;
4. it writes the merged index, config.json (the method's config + auto_map), the shipped model
   code, the tokenizer / chat template / generation config files, and a model card.

Everything is written into a temporary folder beside OUT that is renamed at the end, so
an error, a full disk or Ctrl-C never leaves a partial OUT. Peak memory is a few layers'
new tensors (or the largest tensor of a `.bin`), whatever the model's depth.

This module plans and orchestrates; reading the headers, resolving the source and writing the
shards are pesc.checkpoint's (headers, source, shard_writer).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pesc.atomic import atomic_output_dir, check_output_dir, nearest_existing, write_marker
from pesc.checkpoint.headers import (
    _IGNORED_SOURCE_TENSORS,
    _TORCH_DTYPE_NAMES,
    SAFETENSORS_INDEX,
    SourceFile,
    TensorInfo,
    _is_int,
    _safetensors_dtype,
    find_weight_files,
)
from pesc.checkpoint.shard_writer import BaseShardWriter, Progress, _check_disk_space, _human, _write_expert_shard
from pesc.checkpoint.source import EarlySources, early_sources
from pesc.errors import PescError
from pesc.gguf import is_gguf_file, save_dense_from_gguf

MARKER_FILE = ".pesc-convert"

# Top-level source files never carried over: weights, indexes, the config and card we rewrite, code.
_NOT_CARRIED = re.compile(
    r"^(config\.json|README\.md|.*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|py|pyc)|.*\.index\.json|\..*)$"
)


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------
class ConvertSettings:
    """The method, its settings (checked, defaults filled in: what config.json records, plus the seed of
    the draw) and the shard size. Settings read as attributes: `settings.top_k`."""

    def __init__(self, method: str | None = None, max_shard_size: int = 5_000_000_000, **values):
        from pesc.methods import get_method

        if not _is_int(max_shard_size) or max_shard_size <= 0:
            raise PescError(f"max_shard_size must be a positive integer, got {max_shard_size!r}")
        self.method = get_method(method)
        self.values = self.method.resolve_settings(values, where="")
        self.max_shard_size = max_shard_size

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def moe_fields(self) -> dict:
        return dict(self.values)



_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB` or a plain integer (decimal units, as Hugging Face counts)."""
    if _is_int(size):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise PescError(f"--max-shard-size {size!r} is not a size: write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise PescError(f"--max-shard-size must be positive, got {size!r}")
    return value


def resolve_settings(flags: dict, recipe: str | None = None, method_name: str | None = None,
                     max_shard_size: str | int = 5_000_000_000) -> ConvertSettings:
    """The method (--method, else the recipe's `method:`, else pesc); its defaults, overridden by the recipe's
    `moe:` section, overridden by the flags given (not None; each must be one of the method's settings)."""
    from pesc.methods import check_flags, get_method

    values: dict = {}
    if recipe is not None:
        from pesc.recipe import load_moe_settings, load_recipe

        method_name = method_name or load_recipe(recipe).get("method")
        values.update(load_moe_settings(recipe, method_name))
    values.update(check_flags(get_method(method_name), flags))
    return ConvertSettings(method_name, parse_size(max_shard_size), **values)


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------
@dataclass
class ExpertShard:
    """One new shard: its tensors in write order, as (layer, name inside the decoder layer, info)."""

    entries: list[tuple[int, str, TensorInfo]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, _, info in self.entries)


@dataclass
class Plan:
    src: Path
    hub_id: str | None
    out: Path
    settings: ConvertSettings
    config: object  # the method's config
    sources: list[SourceFile]
    expert_shards: list[ExpertShard]
    link: bool
    force: bool = False  # OUT may be replaced (checked by pesc.atomic.check_output_dir)
    origin: str | None = None  # what the user gave when `src` was made from it (a GGUF file)

    @property
    def source_label(self) -> str:
        """The source as the user knows it: Hub id, GGUF file or folder."""
        return self.hub_id or self.origin or str(self.src)

    @property
    def num_files(self) -> int:
        return len(self.sources) + len(self.expert_shards)

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.num_files:05d}.safetensors"

    @property
    def source_bytes(self) -> int:
        return sum(f.size if f.kind == "safetensors" else f.tensor_bytes for f in self.sources)

    @property
    def expert_bytes(self) -> int:
        return sum(s.nbytes for s in self.expert_shards)


def _expert_layout(method, model, config) -> list[tuple[int, str, tuple[int, ...]]]:
    """(layer, name inside the layer, shape) of every added tensor, layer by layer (`method.layer_prefixes`), in
    write order, the checkpoint's key being the layer's prefix plus the name."""
    added = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if method.is_added(name)]
    return [
        (layer_idx, name[len(prefix):], shape)
        for layer_idx, prefix in enumerate(method.layer_prefixes(config))
        for name, shape in added
        if name.startswith(prefix)
    ]


def meta_model(method, config):
    """The method's model on the meta device (no memory), or a one-line error for an unsupported family."""
    import torch

    try:
        with torch.device("meta"):
            return method.model_class_for(config)(config)
    except ValueError as error:
        raise unsupported_architecture(error) from None


def unsupported_architecture(error: ValueError) -> PescError:
    """The model class refused the family (no gated FFN, no `layers` list, ...)."""
    return PescError(f"unsupported architecture: {error}")


def _check_added_size(out: Path, method, config) -> None:
    """Refuse settings whose added tensors cannot fit beside OUT, sized before the model is built: a huge
    --num-experts would otherwise hang while its millions of modules are made."""
    import torch

    from pesc.summary import human_count

    try:
        params = method.added_params_estimate(config)
    except ValueError as error:
        raise unsupported_architecture(error) from None
    needed = params * getattr(torch, config.moe_dtype).itemsize
    free = shutil.disk_usage(nearest_existing(out.parent)).free
    if needed > free:
        raise PescError(
            f"not enough disk space beside {out}: these settings add {human_count(params)} parameters "
            f"({_human(needed)} in {config.moe_dtype}; {config.num_experts:,} experts per site), {_human(free)} is "
            "free; lower --num-experts or the experts' size, or free some space"
        )


def check_weights(method, model, config, sources: list[SourceFile], folder: Path, with_experts: bool = False) -> None:
    """Every source tensor must be one the method's model has, with its shape; every required one present.

    A dense source has no experts (`with_experts` False); an already-MoE source (an import) has them all.
    """
    expected = {
        name: tuple(t.shape) for name, t in model.state_dict().items() if with_experts or not method.is_added(name)
    }
    optional = set(getattr(model, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    found: set[str] = set()
    for file in sources:
        for name, info in file.tensors.items():
            if _IGNORED_SOURCE_TENSORS.search(name):
                continue
            if name not in expected:
                raise PescError(
                    f"weights don't match config.json: {file.path.name} holds {name}, which a "
                    f"{config.base_model_type} model with this config does not have; check that config.json "
                    "belongs to these weights"
                )
            if info.shape != expected[name]:
                raise PescError(
                    f"weights don't match config.json: {name} in {file.path.name} has shape {list(info.shape)}, "
                    f"config.json implies {list(expected[name])}; check that config.json belongs to these weights"
                )
            found.add(name)
    missing = sorted(set(expected) - found - optional)
    if missing:
        raise PescError(
            f"weights don't match config.json: {folder} has no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete or belongs to another model"
        )


def plan_conversion(src: str, early: EarlySources, out: Path, settings: ConvertSettings, link: bool, force: bool) -> Plan:
    """Check everything `early_sources` left out, write nothing: the plan of the output, or a PescError."""
    from pesc.checkpoint.config import read_config
    from pesc.methods import METHODS, method_for_model_type

    method = settings.method
    folder, hub_id = early.folder, early.hub_id
    dense_config = read_config(folder)
    existing = method_for_model_type(dense_config.model_type)
    if existing is not None:
        raise PescError(
            f"{src} is already a {existing.label} checkpoint (model_type {dense_config.model_type}): convert its "
            "dense base model instead"
        )
    sources = early.files if early.files is not None else find_weight_files(folder)
    for file in sources:
        for other in METHODS.values():
            added = next((name for name in file.tensors if other.is_added(name)), None)
            if added:
                raise PescError(
                    f"{src} already holds {other.label} experts ({added}): convert its dense base model instead"
                )

    moe_dtype = None
    if getattr(dense_config, "dtype", None) is None:
        # No dtype in config.json: store the experts like the first FFN weight.
        ffn = next((f.tensors[k] for f in sources for k in f.tensors
                    if k.endswith(("mlp.gate_proj.weight", "DenseReluDense.wo.weight"))), None)
        moe_dtype = _TORCH_DTYPE_NAMES[ffn.dtype] if ffn is not None else "float32"
    try:
        config = method.config_from_dense(dense_config, settings.values, moe_dtype=moe_dtype)
    except ValueError as error:
        raise PescError(f"cannot convert {src}: {error}") from None
    if config.moe_dtype not in _TORCH_DTYPE_NAMES.values() or not config.moe_dtype.startswith(("float", "bfloat")):
        raise PescError(f"cannot store experts in dtype {config.moe_dtype!r}: the base model must be floating point")
    if getattr(config, "dtype", None) is None:  # as save_pretrained records it: the dtype of the weights
        dense_dtype = getattr(dense_config, "dtype", None)
        config.dtype = str(dense_dtype).removeprefix("torch.") if dense_dtype is not None else config.moe_dtype
    _check_added_size(out, method, config)
    model = meta_model(method, config)
    check_weights(method, model, config, sources, folder)

    prefixes = method.layer_prefixes(config)
    st_dtype = _safetensors_dtype(config.moe_dtype)
    shards: list[ExpertShard] = [ExpertShard()]
    for layer_idx, name, shape in _expert_layout(method, model, config):
        info = TensorInfo(prefixes[layer_idx] + name, st_dtype, shape)
        if shards[-1].entries and shards[-1].nbytes + info.nbytes > settings.max_shard_size:
            shards.append(ExpertShard())
        shards[-1].entries.append((layer_idx, name, info))
    return Plan(folder, hub_id, out, settings, config, sources, shards, link, force)


# --------------------------------------------------------------------------------------
# Writing what the plan says (the shards themselves: pesc.checkpoint.shard_writer)
# --------------------------------------------------------------------------------------
def _model_card(plan: Plan):
    """The shared model card (pesc.model_card), for a converted model: no training section."""
    from pesc.model_card import build_model_card

    settings, config, base = plan.settings, plan.config, plan.hub_id
    method = settings.method
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"a local checkpoint (`{plan.src.name}`)"
    return build_model_card(
        config,
        title=f"{(base or plan.src.name).split('/')[-1]} {method.card_title(config)}",
        base_model=base or plan.src.name,
        base_model_id=base,
        description=method.card_text(config, base_text, converted=True),
        extra_settings={"moe_dtype": config.moe_dtype, "seed": settings.seed},
        converted=True,
    )


def _carried_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_CARRIED.match(p.name))


@dataclass
class ConvertResult:
    out: Path
    files: list[str]
    linked: int
    copied: int
    rewritten: int
    expert_files: int
    total_bytes: int


def write_rest(
    plan: Plan,
    folder: Path,
    base: BaseShardWriter,
    progress: Progress,
    card=None,
    marker_file: str = MARKER_FILE,
    written_by: str = "pesc convert",
    layer_state: Callable[[int], dict] | None = None,
) -> ConvertResult:
    """The expert shards (while the base shards are still being written), then index, config, code, card.

    `card` (default: the converted model's), the marker and `layer_state` (each layer's added tensors by
    their names inside the layer; default: the method's seeded draw) let an import reuse the same writer."""
    from pesc import __version__

    config = plan.config
    if layer_state is None:
        layer_state = functools.partial(plan.settings.method.initial_state, config, seed=plan.settings.seed)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(plan.expert_shards, len(plan.sources) + 1):
        base.check()  # a failed copy stops the conversion now
        _write_expert_shard(folder / plan.shard_name(number), shard, layer_state, progress)
        for _, _, info in shard.entries:
            weight_map[info.name] = plan.shard_name(number)
            total_size += info.nbytes
    base.finish(plan)
    for number, file in enumerate(plan.sources, 1):
        for tensor, info in file.tensors.items():
            if file.kind == "bin" and _IGNORED_SOURCE_TENSORS.search(tensor):
                continue
            weight_map[tensor] = plan.shard_name(number)
            total_size += info.nbytes

    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    config.to_json_file(folder / "config.json", use_diff=True)
    method = plan.settings.method
    for code_file in method.shipped_files:
        shutil.copyfile(code_file, folder / code_file.name)
    for extra in _carried_files(plan.src):
        shutil.copyfile(extra, folder / extra.name)
    (card or _model_card(plan)).save(folder / "README.md")
    marker = {
        "written_by": written_by,
        "pesc_version": __version__,
        "source": plan.source_label,
        "settings": plan.settings.moe_fields(),
    }
    write_marker(folder, marker_file, marker)
    return ConvertResult(
        out=plan.out,
        files=sorted(p.name for p in folder.iterdir()),
        **base.counts,
        expert_files=len(plan.expert_shards),
        total_bytes=total_size,
    )


def _convert_gguf(gguf_file: Path, out: Path, settings: ConvertSettings, force: bool, echo) -> ConvertResult:
    """Dequantize a GGUF file into a dense checkpoint beside OUT, convert that with hard links, then remove it."""
    check_output_dir(out, force)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.pesc-gguf-", dir=nearest_existing(out.parent)) as tmp:
        dense = Path(tmp) / gguf_file.stem  # the model card names the base after this folder
        save_dense_from_gguf(gguf_file, dense, echo=echo)
        return convert(dense, out, settings, link=True, force=force, echo=echo, origin=str(gguf_file))


def convert(
    src: str | Path,
    out: str | Path,
    settings: ConvertSettings | None = None,
    link: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
    origin: str | None = None,
) -> ConvertResult:
    """Convert the dense checkpoint SRC (folder, Hub id or GGUF file) into the method's checkpoint at OUT, in bounded memory.

    Everything is written into a temporary folder beside OUT (pesc.atomic) and renamed at
    the end. The safetensors base shards start copying into it before the plan's checks,
    which would otherwise add the import of torch and transformers to the copy's time; a
    failed check stops the copy and removes the folder, so nothing is left behind.
    A GGUF file is first dequantized into a dense checkpoint (`_convert_gguf`), which
    is not bounded in memory: the whole model is loaded once.
    """
    settings = settings or ConvertSettings()
    out = Path(out).expanduser()
    if is_gguf_file(src) or str(src).lower().endswith(".gguf"):
        return _convert_gguf(Path(src).expanduser(), out, settings, force, echo)
    early = early_sources(str(src), out, force)
    copy_early = early.files is not None and all(f.kind == "safetensors" for f in early.files)
    progress = Progress()
    with atomic_output_dir(out, force) as folder:
        base = BaseShardWriter(folder, link, progress)
        try:
            if copy_early:
                _check_disk_space(out, 0 if link else sum(f.size for f in early.files), link)
                base.start(early.files)
            plan = plan_conversion(str(src), early, out, settings, link, force)
            plan.origin = origin
            kinds = {f.kind for f in plan.sources}
            echo(
                f"source    {plan.hub_id + ' (' + str(plan.src) + ')' if plan.hub_id else plan.source_label}: "
                f"{plan.config.base_model_type}, {len(plan.sources)} {'/'.join(sorted(kinds))} file(s), "
                f"{_human(sum(f.tensor_bytes for f in plan.sources))} of tensors"
            )
            echo(
                "settings  "
                + ", ".join(f"{k} {v}" for k, v in settings.moe_fields().items())
                + f", moe_dtype {plan.config.moe_dtype}, max_shard_size {_human(settings.max_shard_size)}"
            )
            for line in settings.method.parameter_summary(plan.config).lines():
                echo(line)
            _check_disk_space(out, (0 if link else plan.source_bytes - progress.pending) + plan.expert_bytes, link)
            progress.show((0 if link else plan.source_bytes) + plan.expert_bytes)
            if not base.started:
                base.start(plan.sources)
            result = write_rest(plan, folder, base, progress)
        except BaseException:
            base.abort()
            raise
        finally:
            progress.close()
    how = []
    if result.linked:
        how.append(f"{result.linked} base shard(s) hard-linked")
    if result.copied:
        how.append(f"{result.copied} base shard(s) copied")
    if result.rewritten:
        how.append(f"{result.rewritten} .bin file(s) re-written as safetensors")
    how.append(f"{result.expert_files} expert shard(s) written")
    echo(f"wrote     {result.out}: {', '.join(how)}, {_human(result.total_bytes)} of tensors")
    loader = next(name for name in plan.config.auto_map if name.startswith("AutoModelFor"))
    echo(f"load with {loader}.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    return result
