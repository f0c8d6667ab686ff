"""Audit of bad inputs across every `pesc` command (issue #28): does each end in one clean line?

    python scripts/audit_bad_inputs.py [--out report.md] [--jobs 1] [--timeout 60] [--only convert,train]
                                       [--cases 5,46] [--keep]

Builds tiny fixtures in a temporary folder (seconds), then runs every case below as its own
`python -m pesc.cli ...` process (offline, memory-capped) and classifies what it did:

- clean:     exit status != 0, no traceback, exactly one `Error:` line and it is the last stderr line (progress
             lines before it are fine), the error names the problem (the case's phrases), and nothing was left
             behind (no `.pesc-tmp-` folder, no partial OUT, no input changed). A case whose right answer is
             exit 0 (push --dry-run leaving a secret out) is clean when its own check holds.
- traceback: "Traceback" on stderr.
- silent:    exit 0 on a bad input (or the exit-0 case's own check failed).
- hang:      still running after --timeout seconds (then SIGTERM, then SIGKILL).
- leftover:  failed, but left a `.pesc-tmp-` folder, a new file or folder, or changed an input.
- unsafe:    the case's safety check failed although the command failed (a folder's own module ran).
- unclear:   failed without a last-line `Error:` (or with several), or the error does not name the problem.

It is a report: the exit status is 0 whatever the cases show. Each case runs in its own folder
(`$W` in the table; `$T` is the fixtures folder; `--keep` keeps both, to rerun a case by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("clean", "traceback", "silent", "hang", "leftover", "unsafe", "unclear")
METHODS = ("pesc", "loramoe", "mov", "molora", "moelora")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                      {"role": "assistant", "content": f"{i + 1}."}]} for i in range(8)]


# ---------------------------------------------------------------- fixtures


def build_fixtures(root: Path) -> dict[str, Path]:
    """Tiny inputs every case starts from, written once through pesc itself (in this process: one import)."""
    sys.path.insert(0, str(REPO / "tests"))  # the official-format writers are the tests' own (tests/helpers.py)
    from helpers import official_state, write_adapter, write_published

    from pesc.cli import main
    from pesc.testing import build_tiny_dense, save_tiny_dense
    from pesc.testing.tiny_gguf import save_tiny_gguf
    from pesc.testing.trained_run import save_fake_trained_run

    fx = {name: root / name.lower() for name in ("DENSE", "SMALL", "RUN", "EXPORT", "ADAPTER", "CAMELIDAE")}
    fx.update({m.upper(): root / f"conv-{m}" for m in METHODS})
    fx.update(DATA=root / "data.jsonl", GGUF=root / "tiny.gguf")

    main(["tiny-model", str(fx["DENSE"])])
    save_tiny_dense(fx["SMALL"], "llama", hidden_size=32, intermediate_size=64)  # another shape, for mismatches
    for method in METHODS:
        extra = ["--adapter-dim", "8"] if method == "pesc" else []
        main(["convert", str(fx["DENSE"]), str(fx[method.upper()]), "--method", method, "--num-experts", "4", *extra])
    save_fake_trained_run(fx["RUN"], fx["DENSE"], adapter_dim=8)
    main(["export", str(fx["RUN"]), str(fx["EXPORT"]), "--dtype", "float32"])
    fx["DATA"].write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    write_adapter(fx["ADAPTER"], official_state(build_tiny_dense("llama")))
    save_tiny_gguf(fx["GGUF"])
    write_published(fx["EXPORT"], fx["CAMELIDAE"], "llama", "bin")
    return fx


# ---------------------------------------------------------------- damage: each a function of the copied folder


def truncate(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return edit


def truncate_first_shard(folder: Path) -> None:
    truncate(next(folder.glob("model-*.safetensors")).name)(folder)


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def remove(*names: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for name in names:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return edit


def config_set(name: str = "config.json", **updates) -> Callable[[Path], None]:
    """Change a JSON file's keys; a value of None deletes the key."""
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        for key, value in updates.items():
            data.pop(key, None) if value is None else data.__setitem__(key, value)
        (folder / name).write_text(json.dumps(data))
    return edit


def nan_in(name: str, key_part: str = "") -> Callable[[Path], None]:
    """One NaN in the first floating tensor of a safetensors file (whose name contains key_part)."""
    def edit(folder: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(folder / name, "pt") as opened:
            metadata = opened.metadata()
        tensors = load_file(folder / name)
        key = next(k for k in sorted(tensors) if key_part in k and tensors[k].is_floating_point())
        tensors[key].view(-1)[0] = float("nan")
        save_file(tensors, folder / name, metadata=metadata)
    return edit


def nan_in_bin(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        import torch

        state = torch.load(folder / name, weights_only=True)
        state[min(state)].view(-1)[0] = float("nan")
        torch.save(state, folder / name)
    return edit


def bin_instead_of_safetensors(value: str) -> Callable[[Path], None]:
    """model.safetensors re-saved as pytorch_model.bin with one entry that is not a tensor (`str` or `array`)."""
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        _save_with_non_tensor(state, folder / "pytorch_model.bin", value)
    return edit


def non_tensor_in_bin(name: str, value: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        import torch

        _save_with_non_tensor(torch.load(folder / name, weights_only=True), folder / name, value)
    return edit


def _save_with_non_tensor(state: dict, path: Path, value: str) -> None:
    import numpy as np
    import torch

    key = min(state)
    state[key] = "not a tensor" if value == "str" else np.zeros(state[key].shape, dtype=np.float32)
    torch.save(state, path)


def split_index(missing_shard: bool) -> Callable[[Path], None]:
    """model.safetensors becomes shard 1 of 2 with an index; shard 2 is named but absent (or the index is junk)."""
    def edit(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as opened:
            keys = sorted(opened.keys())
        first = "model-00001-of-00002.safetensors"
        (folder / "model.safetensors").rename(folder / first)
        weight_map = {key: first for key in keys}
        if missing_shard:
            weight_map[keys[-1]] = "model-00002-of-00002.safetensors"
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
    return edit


def evil_code(folder: Path, marker: Path) -> None:
    """config.json's auto_map names the folder's own module, which writes `marker` when it is imported."""
    from helpers import with_code

    with_code(folder, marker, "evil-llama")


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    command: str  # the table's group: the pesc subcommand
    argline: str  # after `python -m pesc.cli`; {PLACEHOLDERS} are fixture paths, {W} the case folder
    phrases: tuple[str, ...] = ()  # each must be in the error line (case-insensitive; "a|b": either)
    why: str = ""
    prepare: Callable[[dict], None] | None = None  # builds case-local inputs in {W}
    ok: Callable[[str, dict], str | None] | None = None  # for a case whose right answer is exit 0: None when right
    safety: Callable[[dict], str | None] | None = None  # checked whatever the exit status
    number: int = 0
    result: dict = field(default_factory=dict)


def copy(key: str, dest: str = "src", *edits) -> Callable[[dict], None]:
    """Prepare: copy fixture `key` to {W}/dest and damage the copy."""
    def prepare(ctx: dict) -> None:
        target = ctx["W"] / dest
        shutil.copytree(ctx[key], target)
        for edit in edits:
            edit(target)
    return prepare


def files(**contents: str | bytes) -> Callable[[dict], None]:
    """Prepare: files in {W} (names with '/' make folders; `__` in a keyword stands for '.')."""
    def prepare(ctx: dict) -> None:
        for name, content in contents.items():
            write(name.replace("__", "."), fill(content, ctx) if isinstance(content, str) else content)(ctx["W"])
    return prepare


def both(*prepares) -> Callable[[dict], None]:
    def prepare(ctx: dict) -> None:
        for step in prepares:
            step(ctx)
    return prepare


def user_folder(name: str = "out") -> Callable[[dict], None]:
    """Prepare: {W}/name, a folder of the user's (not written by pesc)."""
    return files(**{f"{name}/notes.txt": "my notes, not pesc's\n"})


def fifo(name: str) -> Callable[[dict], None]:
    def prepare(ctx: dict) -> None:
        os.mkfifo(ctx["W"] / name)
    return prepare


def evil(key: str = "DENSE") -> Callable[[dict], None]:
    def prepare(ctx: dict) -> None:
        shutil.copytree(ctx[key], ctx["W"] / "evil")
        evil_code(ctx["W"] / "evil", ctx["MARK"])
    return prepare


def base_moved(ctx: dict) -> None:
    """Prepare: the run in {W}/run names a base model that is no longer there (moved after training)."""
    for name in ("pesc_train_config.yaml", "checkpoint-2/adapter_config.json"):
        path = ctx["W"] / "run" / name
        path.write_text(path.read_text().replace(str(ctx["DENSE"]), str(ctx["W"] / "moved-away")))


def marker_absent(ctx: dict) -> str | None:
    return f"the folder's module ran: {ctx['MARK']} was written" if ctx["MARK"].exists() else None


TRAIN_BASE = {
    "base_model": "{DENSE}", "moe": {"num_experts": 4, "top_k": 2, "adapter_dim": 8}, "lora_r": 4,
    "datasets": [{"path": "{DATA}", "type": "messages"}], "chat_template": "chatml", "sequence_len": 64,
    "micro_batch_size": 4, "max_steps": 1, "save_steps": 1, "warmup_ratio": 0.0, "gradient_checkpointing": False,
    "bf16": False, "output_dir": "{W}/run",
}
DROP = object()


def train_config(name: str = "config.yaml", **changes) -> Callable[[dict], None]:
    """Prepare: {W}/config.yaml, TRAIN_BASE with `changes` (DROP removes a key)."""
    def prepare(ctx: dict) -> None:
        import yaml

        config = {k: v for k, v in {**TRAIN_BASE, **changes}.items() if v is not DROP}
        (ctx["W"] / name).write_text(yaml.safe_dump(fill(config, ctx), sort_keys=False))
    return prepare


def fill(value, ctx: dict):
    """Placeholders {NAME} in strings (nested in lists and dicts) replaced by the case's paths."""
    if isinstance(value, str):
        for key, path in ctx.items():
            value = value.replace("{" + key + "}", str(path))
        return value
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, ctx) for k, v in value.items()}
    return value


def rows(*items) -> str:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def not_listed(*names: str) -> Callable[[str, dict], str | None]:
    """push --dry-run: each name must be left out of the upload listing (and said to be left out)."""
    def check(stdout: str, ctx: dict) -> str | None:
        listing = [line.split()[-1] for line in stdout.splitlines() if line.startswith("  ") and len(line.split()) >= 3]
        listed = [name for name in names if name in listing]
        if listed:
            return f"would upload {', '.join(listed)}"
        unsaid = [name for name in names if f"left out {name}" not in stdout]
        return f"does not say it leaves out {', '.join(unsaid)}" if unsaid else None
    return check


def all_cases() -> list[Case]:
    cases: list[Case] = []

    def case(command, argline, *phrases, why="", **kwargs):
        cases.append(Case(command, argline, tuple(phrases), why, **kwargs))

    # ------------------------------------------------ convert
    out = "{W}/out"
    case("convert", f"convert {{W}}/nope {out}", "nope", why="SRC does not exist")
    case("convert", f"convert {{DATA}} {out}", "data.jsonl", why="SRC is a file")
    case("convert", f"convert {{W}}/empty {out}", "config.json", why="SRC is an empty folder",
         prepare=lambda ctx: (ctx["W"] / "empty").mkdir())
    case("convert", f"convert {{W}}/src {out}", "config.json", why="config.json is not JSON",
         prepare=copy("DENSE", "src", write("config.json", "{\"model_type\": \"llama\", ")))
    case("convert", f"convert {{W}}/src {out}", "config.json", why="config.json is a JSON list",
         prepare=copy("DENSE", "src", write("config.json", "[]")))
    case("convert", f"convert {{W}}/src {out}", "banana", why="unknown model_type",
         prepare=copy("DENSE", "src", config_set(model_type="banana")))
    case("convert", f"convert {{W}}/src {out}", "model_type", why="config.json has no model_type",
         prepare=copy("DENSE", "src", config_set(model_type=None)))
    case("convert", f"convert {{W}}/src {out}", "hidden_size", why="hidden_size is a string",
         prepare=copy("DENSE", "src", config_set(hidden_size="sixty-four")))
    case("convert", f"convert {{W}}/src {out}", "intermediate_size|shape|model.safetensors",
         why="config.json's intermediate_size does not match the weights",
         prepare=copy("DENSE", "src", config_set(intermediate_size=256)))
    case("convert", f"convert {{W}}/src {out}", "model.safetensors", "truncated",
         why="model.safetensors cut in half", prepare=copy("DENSE", "src", truncate("model.safetensors")))
    case("convert", f"convert {{W}}/src {out}", "model.safetensors", why="model.safetensors is empty",
         prepare=copy("DENSE", "src", write("model.safetensors", b"")))
    case("convert", f"convert {{W}}/src {out}", "index", why="the weight index is not JSON",
         prepare=copy("DENSE", "src", split_index(missing_shard=False)))
    case("convert", f"convert {{W}}/src {out}", "model-00002-of-00002", why="the index names a missing shard",
         prepare=copy("DENSE", "src", split_index(missing_shard=True)))
    case("convert", f"convert {{W}}/src {out}", "pytorch_model.bin", why=".bin with a str where a tensor goes",
         prepare=copy("DENSE", "src", bin_instead_of_safetensors("str")))
    case("convert", f"convert {{W}}/src {out}", "pytorch_model.bin", why=".bin with a numpy array (not loadable "
         "with weights_only)", prepare=copy("DENSE", "src", bin_instead_of_safetensors("array")))
    case("convert", f"convert {{W}}/src {out}", "weights|safetensors", why="no weight file at all",
         prepare=copy("DENSE", "src", remove("model.safetensors")))
    case("convert", f"convert {{W}}/src {out}", "NaN", why="a NaN in the dense weights",
         prepare=copy("DENSE", "src", nan_in("model.safetensors", "mlp")))
    for flag, value, phrase in [("--num-experts", "0", "num_experts"), ("--num-experts", "-3", "num_experts"),
                                ("--num-experts", "100000000", "num_experts|num-experts"), ("--top-k", "0", "top_k"),
                                ("--adapter-dim", "0", "adapter_dim"), ("--moe-scaling", "nan", "moe_scaling"),
                                ("--adapter-dropout", "1.5", "adapter_dropout"), ("--seed", "-1", "seed"),
                                ("--max-shard-size", "banana", "max-shard-size|max_shard_size"),
                                ("--max-shard-size", "0", "max-shard-size|max_shard_size"),
                                ("--max-shard-size", "-5GB", "max-shard-size|max_shard_size")]:
        case("convert", f"convert {{DENSE}} {out} {flag} {value}", phrase, why=f"{flag} {value}")
    case("convert", f"convert {{DENSE}} {out} --num-experts 4 --top-k 5", "top_k", why="top-k > experts")
    case("convert", f"convert {{DENSE}} {out} --method nope", "nope", why="unknown method")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --adapter-dim 8", "adapter_dim|adapter-dim",
         why="a flag of another method (pesc's --adapter-dim on loramoe)")
    case("convert", f"convert {{DENSE}} {out} --method mov --top-k 2", "top_k|top-k", why="mov has no top-k")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --sites foo_proj", "foo_proj", why="unknown site")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --num-experts 4 --lbc-groups [[0,1],[9]]", "lbc_groups",
         why="lbc group names expert 9 of 4")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --lbc-groups not-json", "lbc_groups|lbc-groups",
         why="lbc groups not JSON")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --lbc-direction sideways", "lbc_direction",
         why="bad choice")
    case("convert", f"convert {{DENSE}} {out} --method loramoe --lbc-include-padding maybe", "lbc_include_padding",
         why="bool setting given 'maybe'")
    case("convert", f"convert {{DENSE}} {out} --method molora --top-k-weights nope", "top_k_weights", why="bad choice")
    case("convert", f"convert {{DENSE}} {out} --method molora --router-jitter -1", "router_jitter",
         why="negative jitter")
    case("convert", f"convert {{DENSE}} {out} --method moelora --contrastive-temperature 0",
         "contrastive_temperature", why="temperature 0")
    case("convert", f"convert {{DENSE}} {out} --method moelora --lora-rank 0", "lora_rank", why="rank 0")
    case("convert", f"convert {{DENSE}} {out} --method moelora --sites q_proj,q_proj", "q_proj", why="a site twice")
    case("convert", f"convert {{DENSE}} {out} --config {{W}}/nope.yaml", "nope.yaml", why="--config missing")
    case("convert", f"convert {{DENSE}} {out} --config {{W}}/bad.yaml", "bad.yaml", why="--config not YAML",
         prepare=files(bad__yaml="moe: {num_experts: [4\n"))
    case("convert", f"convert {{DENSE}} {out} --config {{W}}/r.yaml", "num_expert", why="unknown key in moe:",
         prepare=files(r__yaml="moe:\n  num_expert: 4\n"))
    case("convert", f"convert {{DENSE}} {out} --config {{W}}/r.yaml", "nope", why="method: nope in the recipe",
         prepare=files(r__yaml="method: nope\nmoe:\n  num_experts: 4\n"))
    case("convert", "convert {W}/src {W}/src/out", "inside the input", why="OUT inside SRC",
         prepare=copy("DENSE"))
    case("convert", "convert {W}/src {W}/src", "input", why="OUT is SRC", prepare=copy("DENSE"))
    case("convert", f"convert {{DENSE}} {out}", "already exists", why="OUT exists, no --force",
         prepare=user_folder())
    case("convert", f"convert {{DENSE}} {out} --force", "not written by pesc", why="--force on a user folder",
         prepare=user_folder())
    case("convert", f"convert {{DENSE}} {out}", "not a folder", why="OUT is a file",
         prepare=files(out="a file\n"))
    case("convert", "convert {DENSE} {W}/file/out", "is a file", why="OUT under a file",
         prepare=files(file="a file\n"))
    case("convert", f"convert {{PESC}} {out}", "pesc|already", why="SRC is already a PESC checkpoint")
    case("convert", f"convert {{LORAMOE}} {out} --method pesc", "loramoe", why="SRC is a LoRAMoE checkpoint")
    case("convert", f"convert {{W}}/junk.gguf {out}", "GGUF", why="a .gguf that is not GGUF",
         prepare=files(junk__gguf="not a gguf file at all\n"))
    case("convert", f"convert someone/no-such-model-xyz {out}", "someone/no-such-model-xyz",
         why="a Hub id, offline")

    # ------------------------------------------------ inspect
    case("inspect", "inspect {W}/nope", "nope", why="nonexistent path")
    case("inspect", "inspect {DATA}", "data.jsonl", why="a file, not a folder")
    case("inspect", "inspect {W}/src", "config.json", why="config.json not JSON",
         prepare=copy("DENSE", "src", write("config.json", "{oops")))
    case("inspect", "inspect {W}/src", "banana", why="unknown model_type",
         prepare=copy("DENSE", "src", config_set(model_type="banana")))
    case("inspect", "inspect {W}/src", "num_hidden_layers", why="num_hidden_layers negative",
         prepare=copy("DENSE", "src", config_set(num_hidden_layers=-2)))
    case("inspect", "inspect {DENSE} --num-experts 0", "num_experts", why="--num-experts 0")
    case("inspect", "inspect {DENSE} --num-experts 4 --top-k 9", "top_k", why="top-k > experts")
    case("inspect", "inspect {DENSE} --method nope", "nope", why="unknown method")
    case("inspect", "inspect {DENSE} --method mov --adapter-dim 8", "adapter_dim|adapter-dim",
         why="a flag of another method")
    case("inspect", "inspect {PESC} --num-experts 16", "num_experts|num-experts",
         why="a setting flag on an already converted checkpoint (ignored?)")
    case("inspect", "inspect {W}/src", "num_experts", why="a pesc config.json without num_experts",
         prepare=copy("PESC", "src", config_set(num_experts=None)))

    # ------------------------------------------------ train
    cfg = "train {W}/config.yaml"
    case("train", "train {W}/nope.yaml", "nope.yaml", why="config missing")
    case("train", "train {W}", "folder|directory|not a file", why="config is a folder")
    case("train", cfg, "not valid YAML", why="YAML syntax error",
         prepare=files(config__yaml="base_model: x\ndatasets: [unclosed\n"))
    case("train", cfg, "mapping", why="YAML is a list", prepare=files(config__yaml="- a\n- b\n"))
    case("train", cfg, "mapping|base_model", why="empty YAML", prepare=files(config__yaml=""))
    case("train", cfg, "learning_rat", why="unknown key (typo)", prepare=train_config(learning_rat=0.01))
    case("train", cfg, "lora_r", why="lora_r: 'eight'", prepare=train_config(lora_r="eight"))
    case("train", cfg, "lora_r", why="lora_r: 0", prepare=train_config(lora_r=0))
    case("train", cfg, "micro_batch_size", why="micro_batch_size: 1.5", prepare=train_config(micro_batch_size=1.5))
    case("train", cfg, "sequence_len", why="sequence_len: -5", prepare=train_config(sequence_len=-5))
    case("train", cfg, "datasets", why="no datasets", prepare=train_config(datasets=DROP))
    case("train", cfg, "type", why="dataset entry without type",
         prepare=train_config(datasets=[{"path": "{DATA}"}]))
    case("train", cfg, "chat", why="dataset type 'chat'", prepare=train_config(datasets=[{"path": "{DATA}",
                                                                                          "type": "chat"}]))
    case("train", cfg, "feild", why="unknown key in a dataset entry",
         prepare=train_config(datasets=[{"path": "{DATA}", "type": "messages", "feild": "x"}]))
    case("train", cfg, "nope", why="method: nope", prepare=train_config(method="nope"))
    case("train", cfg, "num_experts", why="moe.num_experts: 0", prepare=train_config(moe={"num_experts": 0}))
    case("train", cfg, "top_k", why="moe.top_k > num_experts", prepare=train_config(moe={"num_experts": 4,
                                                                                        "top_k": 8}))
    case("train", cfg, "experts", why="unknown moe key", prepare=train_config(moe={"experts": 4}))
    case("train", cfg, "adapter_dim", why="pesc's adapter_dim under method mov",
         prepare=train_config(method="mov", moe={"adapter_dim": 8}))
    case("train", cfg, "num_experts", why="moe.num_experts: 100000000",
         prepare=train_config(moe={"num_experts": 100000000}))
    case("train", cfg, "bf16", why="bf16: maybe", prepare=train_config(bf16="maybe"))
    case("train", cfg, "val_set_size", why="val_set_size: 2.0", prepare=train_config(val_set_size=2.0))
    case("train", cfg, "val_set_size", why="val_set_size: 100 of 8 rows", prepare=train_config(val_set_size=100))
    case("train", cfg, "chatmll", why="chat_template: chatmll (typo)", prepare=train_config(chat_template="chatmll"))
    case("train", cfg, "lora_target_modules", why="lora_target_modules names no module",
         prepare=train_config(lora_target_modules=["nope_proj"]))
    case("train", cfg, "torch_dtype", why="torch_dtype: float8", prepare=train_config(torch_dtype="float8"))
    case("train", cfg, "base_model", "nope", why="base_model missing", prepare=train_config(base_model="{W}/nope"))
    case("train", cfg, "model.safetensors", why="base_model's weights truncated",
         prepare=both(copy("DENSE", "src", truncate("model.safetensors")), train_config(base_model="{W}/src")))
    case("train", cfg, "tokenizer", why="tokenizer: missing folder", prepare=train_config(tokenizer="{W}/nope"))
    case("train", cfg, "missing.jsonl", why="data file missing",
         prepare=train_config(datasets=[{"path": "{W}/missing.jsonl", "type": "messages"}]))
    case("train", cfg, "bad.jsonl", why="a malformed JSON line",
         prepare=both(files(bad__jsonl=rows(ROWS[0], '{"messages": [', ROWS[1])),
                      train_config(datasets=[{"path": "{W}/bad.jsonl", "type": "messages"}])))
    case("train", cfg, "messages", why="rows without the messages column",
         prepare=both(files(bad__jsonl=rows({"text": "hi"}, {"text": "there"})),
                      train_config(datasets=[{"path": "{W}/bad.jsonl", "type": "messages"}])))
    case("train", cfg, "row", why="assistant answers empty",
         prepare=both(files(bad__jsonl=rows(*[{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": " "}]}] * 4)),
                      train_config(datasets=[{"path": "{W}/bad.jsonl", "type": "messages"}])))
    case("train", cfg, "robot", why="a turn with role 'robot'",
         prepare=both(files(bad__jsonl=rows(*[{"messages": [{"role": "robot", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}] * 4)),
                      train_config(datasets=[{"path": "{W}/bad.jsonl", "type": "messages"}])))
    case("train", cfg, "content", why="content is a number",
         prepare=both(files(bad__jsonl=rows(*[{"messages": [{"role": "user", "content": 42},
                                                            {"role": "assistant", "content": "yo"}]}] * 4)),
                      train_config(datasets=[{"path": "{W}/bad.jsonl", "type": "messages"}])))
    case("train", cfg, "empty.jsonl", why="empty data file",
         prepare=both(files(empty__jsonl=""), train_config(datasets=[{"path": "{W}/empty.jsonl",
                                                                      "type": "messages"}])))
    case("train", cfg, "fifo.jsonl", why="a FIFO as data file",
         prepare=both(fifo("fifo.jsonl"), train_config(datasets=[{"path": "{W}/fifo.jsonl", "type": "messages"}])))
    case("train", cfg, "instruction", why="type alpaca on messages rows",
         prepare=train_config(datasets=[{"path": "{DATA}", "type": "alpaca"}]))
    case("train", cfg, "task_type", why="loramoe data without task_type",
         prepare=train_config(method="loramoe", moe={"num_experts": 4}))
    case("train", cfg, "sequence_len", why="sequence_len 4 drops every row", prepare=train_config(sequence_len=4))
    case("train", cfg, "holds files", why="output_dir holds user files",
         prepare=both(user_folder("run"), train_config()))
    case("train", cfg, "is a file", why="output_dir is a file", prepare=both(files(run="x\n"), train_config()))
    case("train", cfg, "is a file", why="output_dir under a file",
         prepare=both(files(file="x\n"), train_config(output_dir="{W}/file/run")))
    case("train", cfg, "--resume", why="output_dir holds checkpoints, no --resume",
         prepare=both(copy("RUN", "run"), train_config()))
    case("train", f"{cfg} --resume", "resume", why="--resume on a new output_dir", prepare=train_config())
    case("train", f"{cfg} --set lora_r", "--set", why="--set without =", prepare=train_config())
    case("train", f"{cfg} --set lora_rr=4", "lora_rr", why="--set unknown key", prepare=train_config())
    case("train", f"{cfg} --set moe.top_k=abc", "top_k", why="--set wrong type", prepare=train_config())
    case("train", cfg, "optimizer", why="optimizer: adamw", prepare=train_config(optimizer="adamw"))

    # ------------------------------------------------ export
    case("export", f"export {{W}}/nope {out}", "nope", why="run missing")
    case("export", f"export {{DATA}} {out}", "not a folder", why="run is a file")
    case("export", f"export {{W}}/empty {out}", "empty|checkpoint", why="run folder empty",
         prepare=lambda ctx: (ctx["W"] / "empty").mkdir())
    case("export", f"export {{DENSE}} {out}", "checkpoint|run", why="a model folder, not a run")
    case("export", f"export {{W}}/run {out}", "experts.safetensors", "truncated", why="experts file truncated",
         prepare=copy("RUN", "run", truncate("checkpoint-2/experts.safetensors")))
    case("export", f"export {{W}}/run {out}", "experts.safetensors", why="experts file missing",
         prepare=copy("RUN", "run", remove("checkpoint-2/experts.safetensors")))
    case("export", f"export {{W}}/run {out}", "adapter_config.json", why="adapter_config.json not JSON",
         prepare=copy("RUN", "run", write("checkpoint-2/adapter_config.json", "{")))
    case("export", f"export {{W}}/run {out}", "adapter_model.safetensors", why="LoRA weights truncated",
         prepare=copy("RUN", "run", truncate("checkpoint-2/adapter_model.safetensors")))
    case("export", f"export {{W}}/run {out}", "NaN", why="a NaN in the trained experts",
         prepare=copy("RUN", "run", nan_in("checkpoint-2/experts.safetensors")))
    case("export", f"export {{W}}/run {out} --dtype float32", "NaN", why="a NaN in the LoRA",
         prepare=copy("RUN", "run", nan_in("checkpoint-2/adapter_model.safetensors", "lora_B")))
    case("export", f"export {{W}}/run {out}", "base", why="the run's base model moved away (no --base)",
         prepare=both(copy("RUN", "run"), base_moved))
    case("export", f"export {{RUN}} {out} --dtype int8", "--dtype", why="bad dtype")
    case("export", f"export {{RUN}} {out} --max-shard-size lots", "max-shard-size|max_shard_size",
         why="bad --max-shard-size")
    case("export", "export {W}/run {W}/run/out", "inside the input", why="OUT inside the run", prepare=copy("RUN", "run"))
    case("export", f"export {{RUN}} {out}", "already exists", why="OUT exists", prepare=user_folder())
    case("export", f"export {{RUN}} {out} --force", "not written by pesc", why="--force on a user folder",
         prepare=user_folder())
    case("export", f"export {{RUN}} {out} --base {{W}}/nope", "nope", why="--base missing")
    case("export", f"export {{RUN}} {out} --base {{SMALL}}", "does not match", why="--base of another shape")
    case("export", f"export {{RUN}} {out} --eval {{W}}/nope.json", "nope.json", why="--eval file missing")
    case("export", f"export {{RUN}} {out} --eval {{W}}/r.json", "r.json", why="--eval not JSON",
         prepare=files(r__json="{results"))
    case("export", f"export {{RUN}} {out} --eval {{W}}/r.json", "r.json", why="--eval JSON not from pesc eval",
         prepare=files(r__json='{"hello": 1}'))

    # ------------------------------------------------ push (--dry-run: nothing is sent)
    case("push", "push {W}/nope --repo-id u/n --dry-run", "nope", why="folder missing")
    case("push", "push {DATA} --repo-id u/n --dry-run", "not a folder", why="a file")
    case("push", "push {W}/src --repo-id u/n --dry-run", "config.json", why="no config.json",
         prepare=copy("EXPORT", "src", remove("config.json")))
    case("push", "push {W}/src --repo-id u/n --dry-run", "README", why="no model card",
         prepare=copy("EXPORT", "src", remove("README.md")))
    case("push", "push {W}/src --repo-id u/n --dry-run", "README", why="model card with broken YAML metadata",
         prepare=copy("EXPORT", "src", write("README.md", "---\nlicense: [mit\n---\n# card\n")))
    case("push", "push {W}/src --repo-id u/n --dry-run", "index", why="weight index not JSON",
         prepare=copy("EXPORT", "src", write("model.safetensors.index.json", "{")))
    case("push", "push {W}/src --repo-id u/n --dry-run", "safetensors", why="a shard missing",
         prepare=copy("EXPORT", "src", lambda folder: next(folder.glob("model-*.safetensors")).unlink()))
    case("push", "push {W}/src --repo-id u/n --dry-run", "safetensors", "truncated", why="a shard truncated",
         prepare=copy("EXPORT", "src", truncate_first_shard))
    for repo_id in ("no-slash", "a/b/c", "user/na me", "user/name..x", "/name"):
        case("push", f"push {{EXPORT}} --repo-id {shlex.quote(repo_id)} --dry-run", "--repo-id",
             why=f"--repo-id {repo_id!r}")
    case("push", "push {W}/src --repo-id u/n --dry-run", why="a .env and token.txt in the folder: left out",
         prepare=copy("EXPORT", "src", write(".env", "HF_TOKEN=hf_xxx\n"), write("token.txt", "hf_xxx\n")),
         ok=not_listed(".env", "token.txt"))
    case("push", "push {W}/src --repo-id u/n --dry-run", why="secrets in a subfolder (keys/id_rsa, conf/.env)",
         prepare=copy("EXPORT", "src", write("keys/id_rsa", "KEY\n"), write("conf/.env", "A=1\n")),
         ok=not_listed("keys/id_rsa", "conf/.env"))
    case("push", "push {W}/src --repo-id u/n --dry-run", why="a .pypirc / .git-credentials in the folder",
         prepare=copy("EXPORT", "src", write(".pypirc", "password: x\n"), write(".git-credentials", "https://u:t@h\n")),
         ok=not_listed(".pypirc", ".git-credentials"))
    case("push", "push {EXPORT} --repo-id u/n --dry-run --include-file nope.txt", "nope.txt",
         why="--include-file of no file")
    case("push", "push {EXPORT} --repo-id u/n", "token", why="no token, not a dry run")
    case("push", "push {EXPORT} --repo-id u/n --token hf_fake", "push|offline|reach", why="offline push with a token")

    # ------------------------------------------------ generate
    gen = "--prompt hi --max-new-tokens 2"
    case("generate", f"generate {{W}}/nope {gen}", "nope", why="path missing")
    case("generate", f"generate {{DATA}} {gen}", "data.jsonl", why="a file")
    case("generate", f"generate {{RUN}} {gen}", "run|config.json", why="a training run folder")
    case("generate", f"generate {{W}}/src {gen}", "safetensors", "truncated", why="an export's shard truncated",
         prepare=copy("EXPORT", "src", truncate_first_shard))
    case("generate", f"generate {{W}}/src {gen}", "index", why="index not JSON",
         prepare=copy("DENSE", "src", split_index(missing_shard=False)))
    case("generate", f"generate {{W}}/src {gen}", "pytorch_model.bin", why=".bin with a numpy array",
         prepare=copy("DENSE", "src", bin_instead_of_safetensors("array")))
    case("generate", f"generate {{W}}/src {gen}", "non-finite|NaN", why="a NaN weight",
         prepare=copy("DENSE", "src", nan_in("model.safetensors", "mlp")))
    case("generate", f"generate {{W}}/src {gen}", "banana", why="unknown model_type",
         prepare=copy("DENSE", "src", config_set(model_type="banana")))
    case("generate", f"generate {{W}}/src {gen}", "num_experts|shape|size", why="num_experts 8 over 4 experts' tensors",
         prepare=copy("PESC", "src", config_set(num_experts=8)))
    case("generate", f"generate {{W}}/src {gen}", "tokenizer", why="no tokenizer files",
         prepare=copy("DENSE", "src", remove("tokenizer.json", "tokenizer_config.json")))
    case("generate", f"generate {{W}}/evil {gen}", "--trust-remote-code", why="auto_map code, no flag",
         prepare=evil(), safety=marker_absent)
    case("generate", "generate {DENSE} --prompt hi --max-new-tokens 0", "--max-new-tokens", why="0 tokens")
    case("generate", "generate {DENSE} --prompt hi --max-new-tokens -5", "--max-new-tokens", why="negative")
    case("generate", "generate {DENSE} --prompt hi --temperature -1", "--temperature", why="negative temperature")
    case("generate", "generate {DENSE} --prompt hi --temperature nan", "--temperature", why="NaN temperature")

    # ------------------------------------------------ compare
    case("compare", "compare {W}/nope {DENSE}", "nope", why="A missing")
    case("compare", "compare {DENSE} {W}/src", "model.safetensors", "truncated", why="B truncated",
         prepare=copy("DENSE", "src", truncate("model.safetensors")))
    case("compare", "compare {DENSE} {W}/src", "non-finite|NaN", why="B has a NaN",
         prepare=copy("DENSE", "src", nan_in("model.safetensors", "mlp")))
    case("compare", "compare {W}/evil {DENSE}", "--trust-remote-code", why="auto_map code, no flag",
         prepare=evil(), safety=marker_absent)
    case("compare", "compare {DENSE} {SMALL} --atol nan", "--atol", why="--atol nan (nothing can exceed it)")
    case("compare", "compare {DENSE} {PESC} --atol -1", "--atol", why="negative --atol")
    case("compare", "compare {DENSE} {DENSE} --prompt ''", "prompt", why="empty prompt")
    case("compare", "compare {DENSE} {W}/src", "vocab|shape|size", why="B's vocabulary is another size",
         prepare=copy("DENSE", "src", config_set(vocab_size=300)))

    # ------------------------------------------------ eval
    ev = "--tasks nonexistent_task_xyz --limit 2"
    case("eval", f"eval {{W}}/nope --tasks hellaswag --out {out}", "nope", why="model missing")
    case("eval", f"eval {{DENSE}} {ev} --out {out}", "nonexistent_task_xyz", why="unknown task")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --suite camelidae --out {out}", "--suite|--tasks",
         why="--tasks and --suite")
    case("eval", f"eval {{DENSE}} --out {out}", "--tasks|--suite", why="neither --tasks nor --suite")
    case("eval", f"eval {{DENSE}} --tasks '' --out {out}", "--tasks", why="--tasks ''")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --limit 0 --out {out}", "--limit", why="--limit 0")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --limit -1 --out {out}", "--limit", why="--limit -1")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --batch-size 0 --out {out}", "--batch-size", why="--batch-size 0")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --num-fewshot -1 --out {out}", "--num-fewshot",
         why="--num-fewshot -1")
    case("eval", "eval {DENSE} --tasks hellaswag --limit 2 --out {W}/file/out", "file", why="--out under a file",
         prepare=files(file="x\n"))
    case("eval", f"eval {{DENSE}} --tasks hellaswag --limit 2 --out {out}", "out", why="--out is a file",
         prepare=files(out="x\n"))
    case("eval", f"eval {{DENSE}} --tasks hellaswag --include-path {{W}}/nope --out {out}", "nope",
         why="--include-path missing")
    case("eval", f"eval {{DENSE}} --tasks hellaswag --compare {{W}}/nope --out {out}", "nope", why="--compare missing")
    case("eval", f"eval {{W}}/evil --tasks hellaswag --limit 2 --out {out}", "--trust-remote-code",
         why="auto_map code, no flag", prepare=evil(), safety=marker_absent)
    case("eval", f"eval {{W}}/src --tasks hellaswag --limit 2 --out {out}", "model.safetensors", why="truncated weights",
         prepare=copy("DENSE", "src", truncate("model.safetensors")))
    case("eval", f"eval {{DENSE}} --tasks hellaswag --limit 2 --out {out}", "hellaswag|Hub|offline|reach",
         why="a task whose data cannot be downloaded (offline)")

    # ------------------------------------------------ routes
    rt = f"--data {{DATA}} --out {out}"
    case("routes", f"routes {{W}}/nope {rt}", "nope", why="model missing")
    case("routes", f"routes {{PESC}} --data {{W}}/nope.jsonl --out {out}", "nope.jsonl", why="data missing")
    case("routes", f"routes {{DENSE}} {rt}", "router", why="a dense model has no routers")
    case("routes", f"routes {{PESC}} --data {{W}}/bad.jsonl --out {out}", "bad.jsonl", why="malformed JSON line",
         prepare=files(bad__jsonl=rows(ROWS[0], "{not json")))
    case("routes", f"routes {{PESC}} --data {{W}}/bad.jsonl --out {out}", "messages", why="rows without messages",
         prepare=files(bad__jsonl=rows({"text": "a"})))
    case("routes", f"routes {{PESC}} --data {{W}}/empty.jsonl --out {out}", "empty.jsonl", why="empty data file",
         prepare=files(empty__jsonl=""))
    case("routes", f"routes {{PESC}} --data {{W}}/fifo.jsonl --out {out}", "fifo.jsonl", why="a FIFO as data",
         prepare=fifo("fifo.jsonl"))
    case("routes", f"routes {{PESC}} {rt} --type alpaca", "instruction", why="--type alpaca on messages rows")
    case("routes", f"routes {{PESC}} --data =x --out {out}", "--data", why="--data '=x'")
    for group, phrase in [("knowledge", "--expert-group"), ("k=0-9", "does not exist"), ("k=2-1", "2-1"), ("k=a-b", "a-b"),
                          ("k=", "--expert-group"), ("k=0,1 --expert-group t=1,2", "1")]:
        case("routes", f"routes {{PESC}} {rt} --expert-group {group}", phrase, why=f"--expert-group {group}")
    case("routes", f"routes {{PESC}} {rt}", "already exists|exists", why="--out exists", prepare=user_folder())
    case("routes", "routes {PESC} --data {DATA} --out {W}/file/out", "file", why="--out under a file",
         prepare=files(file="x\n"))
    for flag in ("--sequence-len 0", "--limit 0", "--batch-size 0", "--batch-size -2"):
        case("routes", f"routes {{PESC}} {rt} {flag}", flag.split()[0], why=flag)
    case("routes", f"routes {{W}}/evil {rt}", "--trust-remote-code", why="auto_map code, no flag",
         prepare=evil(), safety=marker_absent)
    case("routes", f"routes {{PESC}} {rt} --chat-template nonsense", "chat", why="--chat-template that is no template")

    # ------------------------------------------------ import camelidae
    case("import camelidae", f"import camelidae {{W}}/nope {out}", "nope", why="SRC missing")
    case("import camelidae", f"import camelidae {{DENSE}} {out}", "model_type", why="a dense llama")
    case("import camelidae", f"import camelidae {{PESC}} {out}", "already a pesc", why="a pesc checkpoint")
    case("import camelidae", f"import camelidae {{W}}/src {out}", "num_experts", why="config lacks num_experts",
         prepare=copy("CAMELIDAE", "src", config_set(num_experts=None)))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "config.json", why="config.json not JSON",
         prepare=copy("CAMELIDAE", "src", write("config.json", "{")))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "pytorch_model.bin", why=".bin truncated",
         prepare=copy("CAMELIDAE", "src", truncate("pytorch_model.bin")))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "pytorch_model.bin",
         why=".bin with a numpy array", prepare=copy("CAMELIDAE", "src", non_tensor_in_bin("pytorch_model.bin",
                                                                                             "array")))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "pytorch_model.bin", why=".bin with a str",
         prepare=copy("CAMELIDAE", "src", non_tensor_in_bin("pytorch_model.bin", "str")))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "adapter_dim|shape", why="adapter_dim 32 over 8-wide tensors",
         prepare=copy("CAMELIDAE", "src", config_set(adapter_dim=32)))
    case("import camelidae", f"import camelidae {{W}}/src {out}", "NaN", why="a NaN in a tensor (lm_head)",
         prepare=copy("CAMELIDAE", "src", nan_in_bin("pytorch_model.bin")))
    case("import camelidae", f"import camelidae {{CAMELIDAE}} {out}", "already exists", why="OUT exists",
         prepare=user_folder())
    case("import camelidae", "import camelidae {W}/src {W}/src/out", "inside the input", why="OUT inside SRC",
         prepare=copy("CAMELIDAE"))

    # ------------------------------------------------ import loramoe
    lm = f"{out} --base {{DENSE}}"
    case("import loramoe", f"import loramoe {{W}}/nope {lm}", "nope", why="adapter missing")
    case("import loramoe", f"import loramoe {{DENSE}} {lm}", "adapter_config.json", why="a model folder, no adapter")
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "adapter_config.json", why="adapter_config.json not JSON",
         prepare=copy("ADAPTER", "a", write("adapter_config.json", "{")))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "adapter_model", why="no weights file",
         prepare=copy("ADAPTER", "a", remove("adapter_model.bin")))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "adapter_model.bin", why="weights truncated",
         prepare=copy("ADAPTER", "a", truncate("adapter_model.bin")))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "adapter_model.bin", why="a str where a tensor goes",
         prepare=copy("ADAPTER", "a", non_tensor_in_bin("adapter_model.bin", "str")))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "NaN", why="a NaN in the adapter",
         prepare=copy("ADAPTER", "a", nan_in_bin("adapter_model.bin")))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "lora_nums", why="lora_nums 0",
         prepare=copy("ADAPTER", "a", config_set("adapter_config.json", lora_nums=0)))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "lora_nums|experts", why="lora_nums 6 over 4 experts",
         prepare=copy("ADAPTER", "a", config_set("adapter_config.json", lora_nums=6)))
    case("import loramoe", f"import loramoe {{W}}/a {lm}", "r|rank", why="r 8 over rank-4 tensors",
         prepare=copy("ADAPTER", "a", config_set("adapter_config.json", r=8)))
    case("import loramoe", f"import loramoe {{ADAPTER}} {out} --base {{W}}/nope", "nope", why="--base missing")
    case("import loramoe", f"import loramoe {{ADAPTER}} {out} --base {{SMALL}}", "shape|match|size",
         why="--base of another shape")
    case("import loramoe", f"import loramoe {{ADAPTER}} {lm}", "already exists", why="OUT exists",
         prepare=user_folder())

    # ------------------------------------------------ from-gguf
    case("from-gguf", f"from-gguf {{W}}/nope.gguf {out}", "nope.gguf", why="file missing")
    case("from-gguf", f"from-gguf {{W}}/junk.gguf {out}", "GGUF", why="not a GGUF file",
         prepare=files(junk__gguf="hello\n"))
    case("from-gguf", f"from-gguf {{W}}/t.gguf {out}", "t.gguf", why="GGUF cut in half",
         prepare=lambda ctx: write("t.gguf", ctx["GGUF"].read_bytes()[: ctx["GGUF"].stat().st_size // 2])(ctx["W"]))
    case("from-gguf", f"from-gguf {{W}}/e.gguf {out}", "e.gguf", why="empty file", prepare=files(e__gguf=""))
    case("from-gguf", f"from-gguf {{W}} {out}2", "{W}", why="a folder, not a file")
    case("from-gguf", f"from-gguf {{GGUF}} {out} --dtype int4", "--dtype", why="bad dtype")
    case("from-gguf", f"from-gguf {{GGUF}} {out}", "already exists", why="OUT exists", prepare=user_folder())
    case("from-gguf", "from-gguf {GGUF} {W}/file/out", "is a file", why="OUT under a file", prepare=files(file="x\n"))

    # ------------------------------------------------ tiny-model
    case("tiny-model", f"tiny-model {out}", "already exists", why="OUT a non-empty user folder", prepare=user_folder())
    case("tiny-model", f"tiny-model {out}", "not a folder", why="OUT is a file", prepare=files(out="x\n"))
    case("tiny-model", "tiny-model {W}/file/out", "is a file", why="OUT under a file", prepare=files(file="x\n"))
    case("tiny-model", f"tiny-model {out} --family gpt2", "--family", why="unknown family")
    case("tiny-model", f"tiny-model {out} --seed -1", "--seed|seed", why="negative seed")
    case("tiny-model", f"tiny-model {out} --seed 99999999999999999999999", "--seed|seed", why="seed beyond 64 bits")

    for number, item in enumerate(cases, 1):
        item.number = number
    return cases


# ---------------------------------------------------------------- running and classifying


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: kind, and a file's size and mtime, to see what a failed command left or changed
    (a folder's mtime is left out: a temporary entry made and removed again is no leftover)."""
    entries = {}
    for path in folder.rglob("*"):
        stat = path.lstat()
        is_file = path.is_file() and not path.is_symlink()
        entries[path.relative_to(folder).as_posix()] = (stat.st_mode >> 12, *((stat.st_size, stat.st_mtime_ns)
                                                                              if is_file else ()))
    return entries


def run_case(case: Case, fixtures: dict, root: Path, timeout: float, mem_gb: float) -> dict:
    work = root / "cases" / f"{case.number:03d}"
    work.mkdir(parents=True)
    ctx = {**fixtures, "W": work, "MARK": root / "markers" / f"{case.number:03d}"}
    if case.prepare:
        case.prepare(ctx)
    args = [fill(token, ctx) for token in shlex.split(case.argline)]
    phrases = [fill(phrase, ctx) for phrase in case.phrases]
    before = snapshot(work)
    env = {**os.environ, **ENV, "HF_HOME": str(root / "hf-home"), "PYTHONPATH": str(REPO)}
    env.pop("HF_TOKEN", None)
    env.pop("PESC_DEBUG", None)
    start = time.monotonic()
    # The address space is capped (bash's ulimit -v, in KiB), so a case that tries to build a huge model fails
    # instead of taking a shared machine's memory.
    capped = ["bash", "-c", 'ulimit -v "$0" && exec "$@"', str(int(mem_gb * 2**20))]
    process = subprocess.Popen([*capped, sys.executable, "-m", "pesc.cli", *args], cwd=work, env=env, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(process.pid, signal.SIGTERM)  # pesc unwinds SIGTERM like Ctrl-C
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
    seconds = time.monotonic() - start
    klass, note = classify(case, ctx, process.returncode, stdout, stderr, hung, phrases, before, snapshot(work))
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    if process.returncode == 0 and not hung:
        said = [line for line in stdout.splitlines() if line.strip()]
        message = "(exit 0) " + (said[-1] if said else "")
    else:
        message = errors[-1] if errors else (lines[-1] if lines else "")
    return {"class": klass, "note": note, "code": process.returncode, "seconds": seconds, "stdout": stdout,
            "stderr": stderr, "message": message, "args": args, "work": work}


def classify(case, ctx, code, stdout, stderr, hung, phrases, before, after) -> tuple[str, str]:
    if hung:
        return "hang", "no exit within the timeout"
    if "Traceback" in stderr:
        return "traceback", ""
    temporary = [name for name in after if ".pesc-tmp-" in name.rsplit("/", 1)[-1]]
    if code == 0:
        if temporary:
            return "leftover", f"left {temporary[0]}"
        problem = case.ok(stdout, ctx) if case.ok else "exit 0 on a bad input"
        if problem is None and case.safety:
            problem = case.safety(ctx)
        return ("silent", problem) if problem else ("clean", "exit 0, as it should")
    if case.safety and (problem := case.safety(ctx)):
        return "unsafe", problem
    new = sorted(name for name in after if name not in before)
    changed = sorted(name for name in before if after.get(name) != before[name])
    if temporary or new or changed:
        what = temporary or new
        return "leftover", f"left {what[0]}" if what else f"changed {changed[0]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    if len(errors) != 1 or errors[0] != lines[-1]:
        return "unclear", "no single last-line Error:" if errors else "no Error: line"
    for phrase in phrases:
        if not any(choice.lower() in errors[0].lower() for choice in phrase.split("|")):
            return "unclear", f"the error does not name {phrase!r}"
    return "clean", ""


# ---------------------------------------------------------------- report


def short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def shown_command(case: Case, root: Path) -> str:
    line = "pesc " + " ".join(shlex.quote(arg) for arg in case.result["args"])
    return line.replace(str(case.result["work"]), "$W").replace(str(root), "$T")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(cases: list[Case], root: Path) -> str:
    commands = list(dict.fromkeys(case.command for case in cases))
    counts = {command: Counter(c.result["class"] for c in cases if c.command == command) for command in commands}
    total = Counter(c.result["class"] for c in cases)
    lines = [f"# pesc bad-input audit: {total['clean']} of {len(cases)} clean", "",
             "| command | cases | " + " | ".join(CLASSES) + " |", "|---|---:|" + "---:|" * len(CLASSES)]
    for command in commands:
        lines.append(f"| {command} | {sum(counts[command].values())} | "
                     + " | ".join(str(counts[command][k] or "") for k in CLASSES) + " |")
    lines.append(f"| **all** | **{len(cases)}** | " + " | ".join(f"**{total[k]}**" for k in CLASSES) + " |")
    lines += ["", "| # | command line | bad input | class | error (first 120 chars) / note |", "|---:|---|---|---|---|"]
    for case in cases:
        result = case.result
        detail = short(result["message"], 120) + (f" — *{result['note']}*" if result["note"] else "")
        lines.append(f"| {case.number} | `{_cell(short(shown_command(case, root), 90))}` | {_cell(case.why)} | "
                     f"{result['class']} | {_cell(detail)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds before a case counts as a hang")
    parser.add_argument("--mem-gb", type=float, default=8, help="address-space cap of each case's process (GiB)")
    parser.add_argument("--only", help="comma-separated commands to run (e.g. convert,push)")
    parser.add_argument("--cases", help="comma-separated case numbers to run (as in the table, e.g. 5,46)")
    parser.add_argument("--keep", action="store_true", help="keep the fixtures and case folders")
    options = parser.parse_args()

    cases = all_cases()
    if options.only:
        wanted = {name.strip() for name in options.only.split(",")}
        cases = [case for case in cases if case.command in wanted]
    if options.cases:
        numbers = {int(number) for number in options.cases.split(",")}
        cases = [case for case in cases if case.number in numbers]
    root = Path(tempfile.mkdtemp(prefix="pesc-audit-"))
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    try:
        print(f"building fixtures in {root} ...", flush=True)
        start = time.monotonic()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                fixtures = build_fixtures(root)
        except BaseException:
            print(captured.getvalue(), file=sys.stderr)
            raise
        print(f"fixtures built in {time.monotonic() - start:.0f} s; running {len(cases)} cases, "
              f"{options.jobs} at a time, timeout {options.timeout:g} s", flush=True)
        (root / "markers").mkdir()
        lock, done = threading.Lock(), [0]

        def one(case: Case) -> None:
            try:
                case.result = run_case(case, fixtures, root, options.timeout, options.mem_gb)
            except Exception as error:  # noqa: BLE001 - a broken case is reported, the audit goes on
                case.result = {"class": "unclear", "note": f"the audit's own setup failed: {error!r}", "code": None,
                               "seconds": 0.0, "stdout": "", "stderr": "", "message": "", "args": [],
                               "work": root}
            with lock:
                done[0] += 1
                result = case.result
                print(f"[{done[0]:3d}/{len(cases)}] #{case.number:<3d} {result['class']:<9} {result['seconds']:5.1f}s "
                      f"{case.command}: {case.why} — {short(result['message'], 100)}", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
            list(pool.map(one, cases))
        report = markdown(cases, root)
        print()
        print(report)
        if options.out:
            options.out.write_text(report)
        total = Counter(case.result["class"] for case in cases)
        print("summary: " + ", ".join(f"{total[k]} {k}" for k in CLASSES if total[k]) + f" of {len(cases)} cases")
        for case in cases:
            if case.result["class"] != "clean":
                result = case.result
                print(f"\n--- #{case.number} {result['class']}: {case.why} ({result['note']}), exit {result['code']}\n"
                      f"$ {shown_command(case, root)}\nstdout: {short(result['stdout'], 300)}\n"
                      f"stderr:\n{result['stderr'].strip()[-2000:]}")
    finally:
        if options.keep:
            print(f"\nkept {root} ($T = {root}, $W = {root}/cases/NNN)")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
