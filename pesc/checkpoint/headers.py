"""What a checkpoint's weight files hold, read from their headers alone (no tensor is loaded).

convert plans from the headers, and every command checks them before a slow load (checkpoint.weights):
a safetensors header gives each tensor's name, dtype and shape in milliseconds and shows a truncated
or corrupt file before anything is copied or loaded. The dtype tables and the one-line corrupt-file
errors live here with the readers.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pesc.errors import PescError

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
# Tensors that old checkpoints carry but no current model has (recomputed buffers): tolerated.
_IGNORED_SOURCE_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
