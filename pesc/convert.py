"""Streaming conversion of a dense checkpoint into a method's sparse checkpoint (PESC by default; DESIGN.md §4).

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
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pesc.atomic import atomic_output_dir, check_output_dir, nearest_existing, write_marker
from pesc.errors import PescError
from pesc.finite import refuse_non_finite
from pesc.gguf import is_gguf_file, save_dense_from_gguf

MARKER_FILE = ".pesc-convert"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}  # fmt: skip
_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}  # fmt: skip
_MAX_HEADER_BYTES = 100_000_000
_COPY_CHUNK = 64 * 1024 * 1024
# Layers whose experts are drawn ahead of the one being written, each in its own thread
# (torch's RNG and casts release the GIL). 2 measured ~1 s faster at Llama-2-7B shape on 2
# cores but +220 MiB peak RSS (glibc arenas of the second thread), which would break the
# < 1 GiB bound at hidden 8192: docs/convert.md.
_DRAW_AHEAD = 1
# Tensors that old checkpoints carry but no current model has (recomputed buffers): tolerated.
_IGNORED_SOURCE_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Top-level source files never carried over: weights, indexes, the config and card we rewrite, code.
_NOT_CARRIED = re.compile(
    r"^(config\.json|README\.md|.*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|py|pyc)|.*\.index\.json|\..*)$"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
# Reading the source: headers only
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name (BF16, F32, ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class SourceFile:
    path: Path
    kind: str  # "safetensors" or "bin"
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _corrupt(path: Path, detail: str) -> PescError:
    return PescError(f"{path} is truncated or corrupt ({detail}): download or save the checkpoint again")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a safetensors file, checking that the file holds every byte the header promises."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes, no header")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path, f"the header claims {header_len} bytes, the file has {size}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = dtype in DTYPE_SIZES and all(_is_int(d) and d >= 0 for d in shape) and 0 <= start <= end
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise _corrupt(path, f"bad header entry for {name}")
        info = TensorInfo(name, dtype, shape)
        if end - start != info.nbytes:
            raise _corrupt(path, f"{name} spans {end - start} bytes but its shape needs {info.nbytes}")
        tensors[name] = info
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise _corrupt(path, "its tensors overlap or leave gaps")
        position = end
    data_bytes = size - 8 - header_len
    if position != data_bytes:
        raise _corrupt(path, f"the header describes {position} bytes of tensor data, the file holds {data_bytes}")
    return tensors


def _load_bin(path: Path) -> dict:
    """A pickle checkpoint read safely (weights_only) and memory-mapped where its format allows."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged pickle
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))  # weights_only's refusal
        if refused:
            raise PescError(
                f"{path} holds objects other than tensors ({refused.group(1)}), which pesc does not unpickle: it "
                "loads .bin files with weights_only=True for safety; save the state dict of tensors alone (or as "
                "safetensors)"
            ) from None
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise _corrupt(path, f"torch.load failed: {detail}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PescError(f"{path} is not a state dict of tensors (a dict of name -> tensor): save one to load it")
    return state


def _safetensors_dtype(torch_dtype) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    for st_name, torch_name in _TORCH_DTYPE_NAMES.items():
        if torch_name == name:
            return st_name
    raise PescError(f"tensors of dtype {name} cannot be stored in safetensors")


def read_bin_header(path: Path) -> dict[str, TensorInfo]:
    state = _load_bin(path)
    return {name: TensorInfo(name, _safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in state.items()}


def find_weight_files(folder: Path) -> list[SourceFile]:
    """The source's weight files (safetensors preferred over .bin), with every tensor's header."""
    for index_name, single_name, kind in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
        (BIN_INDEX, BIN_SINGLE, "bin"),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
                raise _corrupt(index_path, "no valid weight_map") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise PescError(
                    f"{folder} is incomplete: its {index_name} lists {missing[0]}, which is missing "
                    f"({len(missing)} of {len(names)} shards missing); download the checkpoint again"
                )
            files = [SourceFile(folder / n, kind) for n in names]
            for file in files:
                file.tensors = _read_header(file)
            for tensor, shard in weight_map.items():
                if tensor not in next(f for f in files if f.path.name == shard).tensors:
                    raise PescError(
                        f"{index_path} says {tensor} is in {shard}, but that file has no such tensor: "
                        "the checkpoint is inconsistent; download it again"
                    )
            return files
        if (folder / single_name).is_file():
            file = SourceFile(folder / single_name, kind)
            file.tensors = _read_header(file)
            return [file]
    raise PescError(
        f"{folder} has a config.json but no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX}): give a Hugging Face model folder with its weights"
    )


def _read_header(file: SourceFile) -> dict[str, TensorInfo]:
    return read_safetensors_header(file.path) if file.kind == "safetensors" else read_bin_header(file.path)


# --------------------------------------------------------------------------------------
# Resolving the source
# --------------------------------------------------------------------------------------
def resolve_source(src: str) -> tuple[Path, str | None]:
    """A local model folder for SRC, and the Hub id it came from (None for a local folder)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PescError(f"{src} is neither a model folder nor a GGUF file: give the folder that holds config.json")
        return path, _hub_id_from_cache_path(path)
    if _HUB_ID.fullmatch(src) and not src.startswith((".", "~")):
        return _download(src), src
    raise PescError(f"{src} does not exist: give a local model folder or a Hugging Face Hub model id")


def _hub_id_from_cache_path(path: Path) -> str | None:
    """`org/name` for a folder inside the Hugging Face cache (models--org--name/snapshots/<rev>)."""
    for part in path.resolve().parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return None


def _download(repo_id: str) -> Path:
    """A Hub snapshot: config, tokenizer and safetensors (pickle .bin only when there is no safetensors)."""
    common = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "LICENSE*", "USE_POLICY*"]
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=[*common, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=[*common, "*.bin"]))
    except Exception as error:  # noqa: BLE001 - offline, network, auth, not found: all one user message
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise PescError(
            f"{repo_id} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {detail}): download it first (hf download {repo_id}) or pass a local folder"
        ) from None
    return folder


# --------------------------------------------------------------------------------------
# Early start: what can be known before torch and transformers are imported
# --------------------------------------------------------------------------------------
@dataclass
class EarlySources:
    """The source folder and, where the cheap checks vouch for them, its weight files."""

    folder: Path
    hub_id: str | None
    files: list[SourceFile] | None  # None: leave reading them (and their errors) to the plan


def early_sources(src: str, out: Path, force: bool) -> EarlySources:
    """Resolve SRC, check OUT and read the weight headers, all in plain Python (no torch).

    The base shards can then start copying while the plan's checks import torch and
    transformers (seconds). Anything unusual (no or unreadable config.json, an already
    PESC config, a header error) yields `files=None`, so that the plan reports it
    exactly as it would have.
    """
    folder, hub_id = resolve_source(src)
    check_output_dir(out, force, (folder,))
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return EarlySources(folder, hub_id, None)
    if model_type is None or str(model_type).split("_")[0] == "pesc":  # methods' model_types: pesc, pesc_<m>
        return EarlySources(folder, hub_id, None)
    try:
        files = find_weight_files(folder)
    except PescError:
        return EarlySources(folder, hub_id, None)
    return EarlySources(folder, hub_id, files)


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


def _expert_layout(method, model) -> list[tuple[str, tuple[int, ...]]]:
    """Names (inside decoder layer 0) and shapes of one layer's added tensors, in write order."""
    prefix = "model.layers.0."
    return [
        (name[len(prefix):], tuple(t.shape))
        for name, t in model.state_dict().items()
        if name.startswith(prefix) and method.is_added(name)
    ]


def expert_key(layer_idx: int, name: str) -> str:
    return f"model.layers.{layer_idx}.{name}"


def meta_model(method, config):
    """The method's model on the meta device (no memory), or a one-line error for an unsupported family."""
    import torch

    try:
        with torch.device("meta"):
            return method.model_class(config)
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
    from pesc.checkpoint import read_config
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
        ffn = next((f.tensors[k] for f in sources for k in f.tensors if k.endswith("mlp.gate_proj.weight")), None)
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

    layout = _expert_layout(method, model)
    st_dtype = _safetensors_dtype(config.moe_dtype)
    shards: list[ExpertShard] = [ExpertShard()]
    for layer_idx in range(config.num_hidden_layers):
        for name, shape in layout:
            info = TensorInfo(expert_key(layer_idx, name), st_dtype, shape)
            if shards[-1].entries and shards[-1].nbytes + info.nbytes > settings.max_shard_size:
                shards.append(ExpertShard())
            shards[-1].entries.append((layer_idx, name, info))
    return Plan(folder, hub_id, out, settings, config, sources, shards, link, force)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def write_safetensors(path: Path, infos: list[TensorInfo], tensors: Iterable, progress=None) -> None:
    """Stream tensors into a safetensors file: the header comes from `infos`, each tensor is written and dropped.

    An all-zero tensor (every fresh adapter_up: half the expert bytes) is skipped over rather
    than written, leaving a hole that reads back as zeros: the same bytes, less disk I/O.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        written = 0
        for info, tensor in zip(infos, tensors, strict=True):
            if tuple(tensor.shape) != info.shape or _safetensors_dtype(tensor.dtype) != info.dtype:
                raise RuntimeError(f"internal error: {info.name} does not match its planned shape or dtype")
            refuse_non_finite([(info.name, tensor)], f"(written into {path.parent.name})")
            data = tensor.detach().contiguous().reshape(-1).view(_byte_dtype())
            if data.any():  # on the bytes, so that -0.0 is written, not left as a hole
                handle.write(memoryview(data.numpy()))
            else:
                handle.seek(info.nbytes, os.SEEK_CUR)
            written += info.nbytes
            if progress is not None:
                progress.update(info.nbytes)
        if written != offset:
            raise RuntimeError(f"internal error: wrote {written} of {offset} bytes to {path}")
        handle.truncate()  # a trailing hole still counts in the file's size


def _byte_dtype():
    import torch

    return torch.uint8


def copy_file(src: Path, dst: Path, progress=None, cancel: threading.Event | None = None) -> None:
    """Copy bytes in the kernel (copy_file_range) in chunks, reporting progress; a plain read/write fallback."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        kernel_copy = hasattr(os, "copy_file_range")
        while remaining > 0:
            if cancel is not None and cancel.is_set():
                return
            chunk = min(remaining, _COPY_CHUNK)
            if kernel_copy:
                try:
                    copied = os.copy_file_range(fin.fileno(), fout.fileno(), chunk)
                except OSError as error:
                    if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    kernel_copy = False
                    continue
            else:
                data = fin.read(chunk)
                fout.write(data)
                copied = len(data)
            if copied == 0:
                raise OSError(errno.EIO, f"{src} ended early while copying")
            remaining -= copied
            if progress is not None:
                progress.update(copied)


def link_or_copy(src: Path, dst: Path, progress=None, notice: Callable[[str], None] = print) -> bool:
    """Hard-link src to dst; where the filesystem refuses, copy (with a notice). True if linked."""
    try:
        os.link(src.resolve(), dst)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise
        notice(f"note: cannot hard-link {src.name} into the output ({error.strerror}); copying it instead")
        copy_file(src, dst, progress)
        return False
    if progress is not None:
        progress.update(src.stat().st_size)
    return True


def _write_expert_shard(path: Path, shard: ExpertShard, layer_state: Callable[[int], dict], progress=None) -> None:
    """Write each layer's added tensors while workers already draw the next layers'.

    `layer_state(layer_idx)` gives one layer's tensors (convert: the method's seeded `initial_state`).
    At most 1 + _DRAW_AHEAD layers are in memory; every layer has its own seeded RNG, so
    drawing ahead, in any number of threads, changes no value.
    """
    layers = list(dict.fromkeys(layer for layer, _, _ in shard.entries))

    def tensors(pool):
        drawn = {}
        for layer, name, _ in shard.entries:
            if layer not in drawn:
                position = layers.index(layer)
                drawn = {
                    upcoming: drawn.get(upcoming) or pool.submit(layer_state, upcoming)
                    for upcoming in layers[position : position + 1 + _DRAW_AHEAD]
                }
            yield drawn[layer].result().pop(name)

    with ThreadPoolExecutor(max_workers=_DRAW_AHEAD, thread_name_prefix="pesc-draw") as pool:
        write_safetensors(path, [info for _, _, info in shard.entries], tensors(pool), progress)


def _rewrite_bin(src: Path, dst: Path, tensors: dict[str, TensorInfo], progress=None) -> None:
    state = _load_bin(src)
    names = [n for n in tensors if not _IGNORED_SOURCE_TENSORS.search(n)]
    write_safetensors(dst, [tensors[n] for n in names], (state.pop(n) for n in names), progress)


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


class Progress:
    """One byte progress bar shared by the base-shard worker and the expert writer.

    The worker may start counting before the bar can be shown (the plan's summary is
    printed first): counts wait in `pending` until `show` opens the bar.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.bar = None
        self.pending = 0

    def show(self, total: int) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pesc convert",
                            disable=None, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
            self.bar.update(self.pending)

    def update(self, count: int) -> None:
        with self.lock:
            if self.bar is None:
                self.pending += count
            else:
                self.bar.update(count)

    def notice(self, message: str) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BaseShardWriter:
    """Copies, links or re-writes the base shards into the output folder, in a worker thread.

    Kernel copies overlap with the main thread's work: the plan's checks (which import
    torch and transformers) and drawing the experts. The shards get provisional names
    (`base-N.safetensors`) because their final names count the expert shards, which only
    the plan knows; `finish` renames them.
    """

    def __init__(self, folder: Path, link: bool, progress: Progress):
        self.folder, self.link, self.progress = folder, link, progress
        self.cancel = threading.Event()
        self.counts = {"linked": 0, "copied": 0, "rewritten": 0}
        self.sources: list[SourceFile] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pesc-copy")
        self._job = None

    @property
    def started(self) -> bool:
        return self._job is not None

    def start(self, sources: list[SourceFile]) -> None:
        self.sources = sources
        self._job = self._pool.submit(self._write_all)

    def check(self) -> None:
        """Raise the worker's error now, if it already failed."""
        if self._job is not None and self._job.done():
            self._job.result()

    def _write_all(self) -> None:
        for number, file in enumerate(self.sources, 1):
            if self.cancel.is_set():
                return
            target = self.folder / f"base-{number:05d}.safetensors"
            if file.kind == "bin":
                _rewrite_bin(file.path, target, file.tensors, self.progress)
                self.counts["rewritten"] += 1
            elif self.link:
                linked = link_or_copy(file.path, target, None, notice=self.progress.notice)
                self.counts["linked" if linked else "copied"] += 1
            else:
                copy_file(file.path, target, self.progress, self.cancel)
                self.counts["copied"] += 1

    def finish(self, plan: Plan) -> None:
        """Wait for the worker and give each base shard its final name."""
        if self._job is not None:
            self._job.result()
        self._pool.shutdown()
        for number in range(1, len(self.sources) + 1):
            os.rename(self.folder / f"base-{number:05d}.safetensors", self.folder / plan.shard_name(number))

    def abort(self) -> None:
        """Stop the worker at its next chunk and wait for it, before the folder is removed."""
        self.cancel.set()
        self._pool.shutdown(wait=True)


def _check_disk_space(out: Path, needed: int, link: bool) -> None:
    """Refuse to start (or go on) writing `needed` more bytes beside OUT when they do not fit."""
    needed += 50_000_000  # index, card, code, and the filesystem's own overhead
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise PescError(
            f"not enough disk space in {out.parent}: the output needs about {_human(needed)} more, "
            f"{_human(free)} is free; free some space{'' if link else ' or pass --link'} and retry"
        )


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
    for code_file in method.modeling_files:
        shutil.copyfile(method.modeling_dir / code_file, folder / code_file)
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


def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


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
    echo(f"load with AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    return result
