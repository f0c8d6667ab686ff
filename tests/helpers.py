"""Helpers that several test files share (and scripts/audit_bad_inputs.py): one module, so that no test file
imports another. The fixtures they share are in conftest.py."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pesc.cli import main
from pesc.model_card import TESTED_TRANSFORMERS
from pesc.serving.vllm_server import vllm_python

# ---------------------------------------------------------------- the CLI in process

# `pesc convert` flags of a small seeded PESC model.
SMALL = ["--num-experts", "4", "--top-k", "2", "--adapter-dim", "8", "--seed", "3"]


def run_cli(capsys, *args):
    """Run `pesc ARGS` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *phrases):
    assert code not in (0, None), err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def assert_nothing_left(parent, out_name="out"):
    leftovers = [p.name for p in parent.iterdir() if p.name == out_name or ".pesc-tmp-" in p.name or ".pesc-old-" in p.name]
    assert leftovers == []


def exit_of(capsys, *args) -> tuple[int, str]:
    """`pesc ARGS` in process, expected to exit: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(capsys, *args) -> str:
    """Run a command that must fail cleanly; returns its one error line."""
    code, err = exit_of(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- checkpoints


def read_tensors(folder):
    """Every tensor of a checkpoint folder, over all its safetensors shards."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ---------------------------------------------------------------- training


def training_rows(n=48):
    """Chat rows of small sums (the `data_file` fixture's)."""
    rows = []
    for i in range(n):
        a, b = i % 9, (i * 7) % 11
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]})
    return rows


def make_config(tmp_path, base, data, **overrides) -> Path:
    """A training config for the tiny model (QLoRA, 6 steps, a checkpoint every 3), written to tmp_path."""
    config = {
        "base_model": str(base),
        "moe": {"num_experts": 4, "top_k": 2, "adapter_dim": 8, "router_aux_loss_coef": 0.01, "seed": 0},
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "datasets": [{"path": str(data), "type": "messages"}],
        "chat_template": "chatml",
        "sequence_len": 64,
        "sample_packing": True,
        "micro_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 0.01,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": True,
        "bf16": False,
        "output_dir": str(tmp_path / "run"),
        "logging_steps": 1,
        "save_steps": 3,
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class CrashedRun(Exception):
    """What `run_with_crash_at` raises to stop a run as a killed job would."""


def run_with_crash_at(step: int, config: str, monkeypatch, event: str = "on_save"):
    """Train `config`, crashing (as a killed job would) at the first callback `event` of step `step`: "on_save"
    right after checkpoint-`step` is written, "on_log" right after that step's training logs are."""
    from transformers import TrainerCallback

    from pesc.training import train
    from pesc.training import trainer as trainer_module

    def crash(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise CrashedRun()

    crash_callback = type("Crash", (TrainerCallback,), {event: crash})()
    original_init = trainer_module.MoETrainer.__init__

    def init_with_crash(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(crash_callback)

    monkeypatch.setattr(trainer_module.MoETrainer, "__init__", init_with_crash)
    with pytest.raises(CrashedRun):
        train(config)
    monkeypatch.undo()


# The overrides of `make_config` for a multi-process run and the one-process run it is compared with: no dropout
# (each rank draws its own masks), SGD (Adam's g / sqrt(v) would magnify rounding in tiny gradients) and no
# clipping: the runs must compute the same function so that their gradients can be compared.
MULTI_PROCESS_SETTINGS = dict(
    max_steps=3, save_steps=3, micro_batch_size=2, lora_dropout=0.0,
    optimizer="sgd", learning_rate=0.5, max_grad_norm=1.0e9,
    moe={"num_experts": 4, "top_k": 2, "adapter_dim": 8, "router_aux_loss_coef": 0.01, "seed": 0, "adapter_dropout": 0.0},
)


# ---------------------------------------------------------------- official LoRAMoE adapters

LORAMOE_SITES = ("gate_proj", "up_proj", "down_proj")


def official_state(base_model, num_experts=4, rank=4, seed=0, sites=LORAMOE_SITES) -> dict:
    """Tensors named and shaped as the official LoRAMoE code saves them, every one random (B too)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer_idx, layer in enumerate(base_model.model.layers):
        for site in sites:
            linear = getattr(layer.mlp, site)
            prefix = f"base_model.model.model.layers.{layer_idx}.mlp.{site}"
            state[f"{prefix}.lora_route.weight"] = torch.randn(num_experts, linear.in_features, generator=generator,
                                                               dtype=torch.float64)  # fmt: skip
            for i in range(num_experts):
                state[f"{prefix}.lora_A{i}.weight"] = torch.randn(rank, linear.in_features, generator=generator,
                                                                  dtype=torch.float64) * 0.2  # fmt: skip
                state[f"{prefix}.lora_B{i}.weight"] = torch.randn(linear.out_features, rank, generator=generator,
                                                                  dtype=torch.float64) * 0.2  # fmt: skip
    return state


def write_adapter(folder, state, weights="bin", **config_fields):
    """An official adapter folder: adapter_config.json as the official LoraConfig writes it, and the weights."""
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": 4, "lora_alpha": 32, "lora_nums": 4, "blc_alpha": 0.1, "blc_weight": 0.1, "lora_dropout": 0.05,
        "target_modules": list(LORAMOE_SITES), "fan_in_fan_out": False, "bias": "none", "inference_mode": True,
    }  # fmt: skip
    config.update(config_fields)
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if weights == "bin":
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, folder / "adapter_model.safetensors")
    return folder


def lbc_by_hand(site_logits, sample_of_token, types, groups, delta, keep, reduction, direction) -> float:
    """Issue #12's LBC, entry by entry in float64: Q[m][n] summed over sample m's kept tokens,
    I[m][n] = 1 + delta if n is in the group of m's type else 1 - delta (official; the two swapped
    towards the own group), cv^2 of Z = I * Q."""
    own, other = (1 + delta, 1 - delta) if direction == "official" else (1 - delta, 1 + delta)
    losses = []
    num_samples = len(types)
    for logits in site_logits:
        experts = logits.shape[-1]
        q = [[0.0] * experts for _ in range(num_samples)]
        for t, row in enumerate(logits.double()):
            if not keep[t]:
                continue
            exps = [math.exp(v) for v in row.tolist()]
            for n in range(experts):
                q[sample_of_token[t]][n] += exps[n] / sum(exps)
        z = []
        for m in range(num_samples):
            group = groups[types[m]] if 0 <= types[m] < len(groups) else ()
            z += [(own if n in group else other) * q[m][n] for n in range(experts)]
        mean = sum(z) / len(z)
        var = sum((v - mean) ** 2 for v in z) / (len(z) - 1)
        losses.append(var / (mean**2 + 1e-10))
    return sum(losses) if reduction == "sum" else sum(losses) / len(losses)


# ---------------------------------------------------------------- published Camelidae releases

# Not the default 0.25: the published releases set moe_scaling in config.json, and the import must carry it over.
MOE_SCALING = 0.5
CAMELIDAE_AUTO_MAP = {
    "AutoConfig": "configuration_camelidae.CamelidaeConfig",
    "AutoModelForCausalLM": "modeling_camelidae.LlamaForCausalLM",
}


def write_published(export_dir, out, family, weights="bin"):
    """The export laid out as a published Camelidae (llama) or Qwen2idae (qwen2) release."""
    out.mkdir()
    config = json.loads((export_dir / "config.json").read_text())
    published = {k: v for k, v in config.items() if k not in ("auto_map", "base_model_type", "adapter_dropout",
                                                              "router_aux_loss_coef", "architectures")}
    # as transformers 4.x wrote them (the releases were saved with 4.3x): torch_dtype, rope_theta
    published["torch_dtype"] = published.pop("dtype")
    published["rope_theta"] = published.pop("rope_parameters")["rope_theta"]
    published["topk"] = published.pop("num_experts_per_tok")  # the releases' name for it
    published.update(transformers_version="4.36.2", rope_scaling=None)
    published.update(model_type={"llama": "camelidae", "qwen2": "qwen2idae"}[family],
                     architectures=["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"],
                     auto_map=CAMELIDAE_AUTO_MAP, output_router_logits=True, moe_scaling=MOE_SCALING)
    (out / "config.json").write_text(json.dumps(published, indent=2))
    state = {}
    for shard in sorted(export_dir.glob("model-*.safetensors")):
        state.update(load_file(shard))
    if weights == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(export_dir / name, out / name)
    return out


# ---------------------------------------------------------------- a model folder with code of its own

EVIL_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM

class EvilConfig(LlamaConfig):
    model_type = "evil-llama"

class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def with_code(folder, marker, model_type):
    """Give the folder a module of its own named in config.json's auto_map (the config keeps `model_type`); the
    module writes `marker` when it is imported."""
    (folder / "modeling_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REPOSITORY = Path(__file__).resolve().parents[1]


def fresh_copy(destination: Path) -> Path:
    """The repository's files as a clone would have them: tracked and not-ignored files only."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPOSITORY / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


# the tiny model the vLLM tests serve: big enough for vLLM's CPU kernels (head size, block shapes)
SERVE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


def require_vllm():
    """Skip (fail in CI, where .ci/run makes it) when there is no vLLM environment."""
    if vllm_python() is None:
        reason = "no .venv-vllm: run scripts/setup_vllm.sh to test serving with vLLM"
        if os.environ.get("CI"):
            pytest.fail(reason + " (.ci/run makes it)")
        pytest.skip(reason)


# Checkpoints pesc 0.1.0 wrote, one per method, with the logits it computed (never regenerated).
LEGACY_CHECKPOINTS = REPOSITORY / "tests" / "fixtures" / "checkpoints_0.1.0"
# The same float32 model on another CPU or thread count sums its dot products (length <= 64) in another order:
# each differs by a few ulps (~1e-7 relative), and two layers keep the logits (|logit| < 5) within 1e-5 of each
# other. 1e-4 leaves a margin and still fails on any change of what is computed (a dropped expert moves logits by
# more than 1e-2 there: the added tensors carry noise of scale 0.2).
LEGACY_ATOL = 1e-4


# ---------------------------------------------------------------- T5


def load_t5_pair(root, variant: str, method: str, **settings):
    """A tiny dense T5 of `variant` (pesc.testing.tiny_t5) and its `pesc convert` with `method` and `settings`, both
    loaded in float64 for eval: (dense model, method model)."""
    from transformers import AutoModelForSeq2SeqLM

    from pesc.convert import ConvertSettings, convert
    from pesc.methods import register_auto_classes
    from pesc.testing.tiny_t5 import save_tiny_t5

    dense_dir, out = save_tiny_t5(Path(root) / variant, variant), Path(root) / f"{variant}-{method}"
    convert(dense_dir, out, ConvertSettings(method, **settings), echo=lambda _: None)
    register_auto_classes()
    return tuple(AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float64).eval()
                 for folder in (dense_dir, out))


def perturb_added(model, method, scale: float, seed: int = 0) -> None:
    """Every tensor `method` added to `model`, plus `scale` times seeded Gaussian noise (off its exact-at-init draw)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if method.is_added(name):
                param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


# ---------------------------------------------------------------- transformers releases (test_compat*.py)

# The releases the shipped code is checked on (PESC_COMPAT_TRANSFORMERS overrides: a comma-separated list).
COMPAT_VERSIONS = tuple(filter(None, os.environ.get("PESC_COMPAT_TRANSFORMERS", ",".join(TESTED_TRANSFORMERS)).split(",")))


def probe_releases(probe: str, spec: dict, modules_root: Path) -> dict:
    """{release: what `probe` (a script that emits a dict; @SPEC@ stands for `spec`) reports when run without pesc in
    each release's cached environment, or {"error": ...} (reported by that release's own test)}, two at a time (each
    probe is mostly imports). Skips where the environments cannot be built, fails so in CI."""
    from concurrent.futures import ThreadPoolExecutor

    from pesc.testing.compat_envs import EnvBuildError, ensure_envs
    from pesc.testing.isolated import run_without_pesc

    try:
        envs = ensure_envs(list(COMPAT_VERSIONS))
    except EnvBuildError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"cannot build the transformers environments in CI: {error}")
        pytest.skip(f"cannot build the transformers environments here (no package registry?): {error}")
    code = probe.replace("@SPEC@", repr(json.dumps(spec)))

    def run(version, env):
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "HF_MODULES_CACHE": str(modules_root / version)}  # the shipped code of this run, not a stale copy
        try:
            return run_without_pesc(code, env=environ, python=env.python, paths=list(env.paths))
        except RuntimeError as error:
            return {"error": str(error)}

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {version: pool.submit(run, version, env) for version, env in envs.items()}
        return {version: future.result() for version, future in futures.items()}
