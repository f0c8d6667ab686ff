"""FSDP and DeepSpeed ZeRO-3, two processes: `accelerate launch --config_file configs/accelerate/{fsdp,
deepspeed_zero3}.yaml train.py CONFIG` trains, saves a checkpoint, resumes from it, and ends with the weights
one process reaches on the same global batch; the aux loss and expert load it logs are the global batch's.

The float32 2-process run is cut after step 2 (launched with max_steps=2, then its final/ is removed, as a
crash after checkpoint-2 leaves it) and resumed to step 3; the 4-bit run goes straight through. The reference
is one process with 2 accumulated micro batches of 2 (see test_train_ddp.py for why those are the same micro
batches). Every run has torch_dtype float32 (sharded training keeps the model dtype: no fp32 upcast), SGD
and no dropout.
Tolerance on the final LoRA and expert weights: atol 2e-6, rtol 1e-5; float32 summation order differs
(ZeRO-3 reduce-scatters the two ranks' gradients, one process accumulates them). Measured: max abs difference
3e-8 (float32 base), 2.4e-7 (4-bit base) after 3 steps at lr 0.5; experts initialised with DeepSpeed's own
random draw instead of pesc's seeded one differ by 0.25.

4-bit: bitsandbytes NF4 on the CPU, with the storage-dtype rule (4-bit weights stored in torch_dtype so that
ZeRO-3 / FSDP partition one dtype), checked on the live model.

A method is one more entry in METHODS: its settings for the tiny run (the routed blocks ZeRO-3 must gather
whole are the method's own `zero3_leaf_modules`).
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from pesc.methods import get_method
from pesc.run_files import EXPERTS_FILE, FINAL_DIR
from pesc.testing.launch import BACKENDS, assert_same_routing_logs, launch_training
from test_train import data_file, make_config  # noqa: F401  (the same tiny config and data fixture)
from test_train_ddp import SETTINGS

METHODS = {"pesc": {"method": "pesc"}}
STEPS, CUT = 3, 2
SHARDED = dict(SETTINGS, max_steps=STEPS, save_steps=CUT, torch_dtype="float32")
TOL = dict(rtol=1e-5, atol=2e-6)
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


# Resuming is the backend's checkpointing and the same for both dtypes: the 4-bit run goes straight to the end
# (one launch instead of two, about 40 s of CI time).
@pytest.mark.parametrize("load_in_4bit, resume", [(False, True), (True, False)], ids=["float32-resumed", "4bit"])
@pytest.mark.parametrize("backend", ["zero3", "fsdp"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_run_trains_saves_resumes_and_equals_one_process(
    method, backend, load_in_4bit, resume, tmp_path, tiny_llama_dir, data_file, reference_runs
):
    backend = BACKENDS[backend]
    if reason := backend.skip_reason(processes=2):
        pytest.skip(reason)
    config = make_config(tmp_path, tiny_llama_dir, data_file, load_in_4bit=load_in_4bit,
                         **{**SHARDED, **METHODS[method]})
    run = tmp_path / "run"

    if resume:
        launch_training(backend, tmp_path / "first", config, "--set", f"max_steps={CUT}")
        assert (run / f"checkpoint-{CUT}" / EXPERTS_FILE).is_file()
        shutil.rmtree(run / FINAL_DIR)  # cut after checkpoint-2: no final/, as an interrupted run leaves it
        launch_training(backend, tmp_path / "resumed", config, "--resume")
        launches = (("first", {0, 1}, CUT), ("resumed", {CUT}, STEPS))
    else:
        launch_training(backend, tmp_path / "whole", config)
        launches = (("whole", set(range(STEPS)), STEPS),)
    assert (run / f"checkpoint-{CUT}" / EXPERTS_FILE).is_file()

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
            torch.testing.assert_close(got[key], tensor, **TOL, msg=f"{name}: {key}")
    # it trained: adapter_up moved from its zero init
    assert any("adapter_up" in k and t.abs().sum() > 0 for k, t in load_file(run / FINAL_DIR / EXPERTS_FILE).items())
    assert_same_routing_logs(run, reference, STEPS)
