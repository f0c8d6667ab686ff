"""Launch `pesc train` in several processes the way a user does (torchrun, accelerate launch with the
shipped pesc/recipes/accelerate/*.yaml), under the training probe, and read back what the run logged: the
test machinery shared by the DDP, FSDP and DeepSpeed ZeRO-3 tests.

On a machine without a GPU every launch is on the CPU over gloo; only `--mixed_precision no` is added to the
accelerate configs (they ask for bf16, which the CPU runs slowly and the one-process reference does not use).
"""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pesc.recipe import RECIPES

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = RECIPES / "accelerate"
NOT_AUX = ("train_loss", "eval_loss")  # the language-model losses the Trainer logs beside the aux losses


@dataclass(frozen=True)
class Backend:
    """How to launch one multi-process path, and which class wraps the model when it really ran."""

    name: str
    launcher: tuple[str, ...]
    wrappers: tuple[str, ...]
    needs_gpus: str | None = None  # why it cannot run on the CPU, when it cannot

    def skip_reason(self, processes: int) -> str | None:
        if self.needs_gpus and torch.cuda.device_count() < processes:
            return self.needs_gpus
        return None


def _accelerate(config: str) -> tuple[str, ...]:
    return ("-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--mixed_precision", "no")


BACKENDS = {
    "ddp": Backend("ddp", ("-m", "torch.distributed.run", "--standalone"), ("DistributedDataParallel",)),
    "zero3": Backend("zero3", _accelerate("deepspeed_zero3.yaml"), ("DeepSpeedEngine",)),
    "fsdp": Backend(
        "fsdp", _accelerate("fsdp.yaml"), ("FullyShardedDataParallel", "FSDPPeftModelForCausalLM"),  # FSDP1, FSDP2
        needs_gpus=(
            "FSDP needs 2 GPUs: accelerate enables FSDP only on an accelerator device (with no GPU it sets up "
            "MULTI_CPU and drops the FSDP plugin, so the run would silently be plain DDP), and torch's FSDP "
            "on the CPU cannot save the full state dict a checkpoint needs (FSDP1: 'setStorage ... out of "
            "bounds' when unflattening; FSDP2: peft's save_pretrained meets an invalid storage)"
        ),
    ),
}


def launch_training(backend: Backend, probe_dir: Path, config: Path, *train_args: str, processes: int = 2,
                    aux_gradients: bool = False, timeout: int = 400) -> None:
    """Run `pesc train CONFIG TRAIN_ARGS` in `processes` processes under the probe (records into probe_dir)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not backend.needs_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, over gloo, even on a machine with GPUs
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe = ["-m", "pesc.testing.training_probe", *(["--aux-gradients"] if aux_gradients else [])]
    count = ("--nproc_per_node" if backend.name == "ddp" else "--num_processes", str(processes))
    command = [sys.executable, *backend.launcher, *count, *probe, str(probe_dir), str(config), *train_args]
    # its own process group, so that a launch past its timeout is killed with its workers (the launcher
    # alone would leave them running, holding the rendezvous port for the next launch)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the {processes}-process launch did not finish in {timeout} s:\n"
                             + stdout[-3000:] + stderr[-5000:]) from None
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]


def logged_routing(run_dir: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """What a run logged about routing: (step, {aux loss name: value}) per logging step (every named aux loss
    of the method: `aux_loss`, ...), and the expert_load.jsonl records."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    aux = [(entry["step"], {k: v for k, v in entry.items() if k.endswith("_loss") and k not in NOT_AUX})
           for entry in history if "loss" in entry]
    loads = [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]
    return aux, loads


def assert_same_routing_logs(run_dir: Path, reference_dir: Path, steps: int) -> None:
    """A multi-process run logged, at every step, the aux losses and expert load of the one-process reference.

    A logged aux loss is rounded to 6 decimals and each process sums its micro batches in float32: one unit
    in the last place (1e-6) is allowed. The expert load comes from integer counts: exact.
    """
    aux, loads = logged_routing(run_dir)
    reference_aux, reference_loads = logged_routing(reference_dir)
    assert [step for step, _ in aux] == [step for step, _ in reference_aux] == list(range(1, steps + 1))
    for (step, values), (_, expected) in zip(aux, reference_aux):
        assert values.keys() == expected.keys() and "aux_loss" in values, (step, values, expected)
        for name, value in values.items():
            assert abs(value - expected[name]) <= 1.5e-6, f"step {step}: {name} {value}, one process {expected[name]}"
    assert [r["step"] for r in loads] == list(range(1, steps + 1))
    assert loads == reference_loads
