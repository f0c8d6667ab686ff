"""FSDP and DeepSpeed ZeRO-3, two processes: `accelerate launch --config_file pesc/recipes/accelerate/{fsdp,
deepspeed_zero3}.yaml train.py CONFIG` trains, saves a checkpoint, resumes from it, and ends with the weights
one process reaches on the same global batch; the aux loss and expert load it logs are the global batch's.

Each 2-process run is cut after step 2 (launched with max_steps=2, then its final/ is removed, as a crash after
checkpoint-2 leaves it) and resumed to step 3. Checkpoint-2 follows an evaluation, as in the recipe tiny: on
a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights at an eval forward, and ZeRO-3 then died saving the
checkpoint. The reference is one process, uninterrupted, with 2 accumulated micro batches of 2 (see
test_train_ddp.py for why those are the same micro batches). Every run has torch_dtype and the 4-bit compute
dtype float32 (sharded training keeps the model dtype: no fp32 upcast), SGD and no dropout; the tolerance on
the final LoRA and expert weights is derived at REL_TOL.

4-bit: bitsandbytes NF4 on the CPU, with the storage-dtype rule (4-bit weights stored in torch_dtype so that
ZeRO-3 / FSDP partition one dtype), checked on the live model.

A method is one more entry in METHODS: its settings for the tiny run (the routed blocks ZeRO-3 must gather
whole are the method's own `zero3_leaf_modules`).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pesc.methods import get_method
from pesc.checkpoint.run_files import EXPERTS_FILE, FINAL_DIR
from pesc.testing.launch import BACKENDS, assert_same_routing_logs, launch_training
from helpers import MULTI_PROCESS_SETTINGS, make_config

METHODS = {"pesc": {"method": "pesc"}}
STEPS, CUT = 3, 2
SHARDED = dict(MULTI_PROCESS_SETTINGS, max_steps=STEPS, save_steps=CUT, torch_dtype="float32", bnb_4bit_compute_dtype="float32",
               val_set_size=8)
# Tolerance: |2 processes - 1 process| <= REL_TOL * the largest |entry| of the one-process tensor, per tensor. Both
# runs start from bit-equal weights (pesc's seeded draw, the same NF4 codes: dequantization is one product per weight,
# at most one rounding apart if the two storage dtypes took different kernels) and compute the same function of the
# same micro batches in float32. bnb_4bit_compute_dtype is float32 because bfloat16 rounds every 4-bit matmul's input
# and output to 8 bits: a last-bit difference upstream then flips a rounding, a 2**-8 jump (measured here: 6e-5 on a
# LoRA B of max 0.16 after 2 steps; the run that failed atol 2e-6 on an AMD CPU computed in bfloat16), which no
# float32 argument bounds. What differs is the order of float32 sums: ZeRO-3 reduce-scatters the ranks' gradients
# where one process accumulates them, and GEMM blocking follows the CPU's kernels (AMX, AVX-512, AVX2) and
# OMP_NUM_THREADS. Two orders of a sum of n terms differ by at most 2*n*u of the terms' magnitude (u = 2**-24, Higham,
# Accuracy and Stability of Numerical Algorithms, 3.1). Here n <= 260 (the vocabulary in the loss and in lm_head's
# backward; tokens per micro batch 128, features <= 128) and a gradient is at most ~40 sums deep (2 layers of norm,
# attention, MLP and adapters, forward and backward, head and loss): each step's gradient is off by at most 2*260*40*u
# = 2**-9.7 of its magnitude, relative errors that carry over to the weights a later step starts from. SGD (not Adam)
# makes the weight difference lr times the gradient difference: Adam's m / (sqrt(v) + eps) scales a gradient that is
# ~0 by up to 1/eps = 1e8, and two gradients a rounding apart on either side of 0 (each >> eps) become updates of +lr
# and -lr: up to 2 lr per step, which no rounding argument bounds. Over 3 steps the update of a tensor is thus within
# 3*2**-9.7 ~ 2**-8 of its size, and no update is larger than the tensor's largest entry (LoRA B and adapter_up start
# at zero: they are their update; the others moved by at most half of it here). Measured: at most 2**-21.7 (Intel with
# AMX, OMP_NUM_THREADS 1 and 2). A broken run moves whole tensors by far more: a rank's gradients dropped halves every
# update, a lost expert update leaves adapter_up at zero (100 %), a lost router update 2 %, DeepSpeed's random expert
# draw instead of pesc's 200 %.
REL_TOL = 2.0**-8
WEIGHT_FILES = ("adapter_model.safetensors", EXPERTS_FILE)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, tiny_llama_dir, data_file):
    """{(method, load_in_4bit): one-process run folder}, each trained once for the module."""
    from pesc.training import train

    runs = {}

    def reference(method: str, load_in_4bit: bool):
        if (method, load_in_4bit) not in runs:
            folder = tmp_path_factory.mktemp(f"single-{method}-{load_in_4bit}")
            config = make_config(folder, tiny_llama_dir, data_file, gradient_accumulation_steps=2,
                                 load_in_4bit=load_in_4bit, **{**SHARDED, **METHODS[method]})
            train(str(config))
            runs[method, load_in_4bit] = folder / "run"
        return runs[method, load_in_4bit]

    return reference


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("backend", ["zero3", "fsdp"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_run_trains_saves_resumes_and_equals_one_process(
    method, backend, load_in_4bit, tmp_path, tiny_llama_dir, data_file, reference_runs
):
    backend = BACKENDS[backend]
    if reason := backend.skip_reason(processes=2):
        pytest.skip(reason)
    config = make_config(tmp_path, tiny_llama_dir, data_file, load_in_4bit=load_in_4bit,
                         **{**SHARDED, **METHODS[method]})
    run = tmp_path / "run"

    launch_training(backend, tmp_path / "first", config, "--set", f"max_steps={CUT}")
    # checkpoint-2 is written after the evaluation at step 2 (4-bit forwards without grad, as in the recipe tiny)
    history = json.loads((run / f"checkpoint-{CUT}" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [CUT]
    assert all((run / f"checkpoint-{CUT}" / name).is_file() for name in WEIGHT_FILES)
    shutil.rmtree(run / FINAL_DIR)  # cut after checkpoint-2: no final/, as an interrupted run leaves it
    launch_training(backend, tmp_path / "resumed", config, "--resume")
    launches = (("first", {0, 1}, CUT), ("resumed", {CUT}, STEPS))

    for part, steps, last_step in launches:
        ranks = [torch.load(tmp_path / part / f"probe-rank{r}.pt") for r in (0, 1)]
        # two processes in one job, wrapped by the engine named (not two single runs, not a silent fallback)
        assert [(r["world_size"], r["process_index"]) for r in ranks] == [(2, 0), (2, 1)], part
        # the process group is gone before the interpreter exits (gloo's threads abort a process left with one)
        assert [r["process_group_at_exit"] for r in ranks] == [False, False], part
        assert all(r["wrapper"] in backend.wrappers for r in ranks), [r["wrapper"] for r in ranks]
        # a resumed run starts at step 2 (data position and weights from checkpoint-2), not from scratch
        assert {b["step"] for r in ranks for b in r["micro_batches"]} == steps, part
        assert ranks[0]["global_step"] == last_step
        # 4-bit weights are stored in the model dtype (the storage-dtype rule), and only when quantized
        storage = {"torch.float32"} if load_in_4bit else set()
        assert all(r["quant_storage"] == storage for r in ranks), [r["quant_storage"] for r in ranks]
        # ZeRO-3 gathers each routed block whole: a rank whose tokens skip an expert cannot hang the others
        leaves = {c.__name__ for c in get_method(method).zero3_leaf_modules} if backend.name == "zero3" else set()
        assert all(r["z3_leaves"] == leaves for r in ranks), [r["z3_leaves"] for r in ranks]

    reference = reference_runs(method, load_in_4bit)
    for name in WEIGHT_FILES:
        got, expected = load_file(run / FINAL_DIR / name), load_file(reference / FINAL_DIR / name)
        assert got.keys() == expected.keys() and got
        for key, tensor in expected.items():
            atol = REL_TOL * float(tensor.abs().max())
            torch.testing.assert_close(got[key], tensor, rtol=0, atol=atol, msg=f"{name}: {key}")
    # it trained: adapter_up moved from its zero init
    assert any("adapter_up" in k and t.abs().sum() > 0 for k, t in load_file(run / FINAL_DIR / EXPERTS_FILE).items())
    assert_same_routing_logs(run, reference, STEPS)
