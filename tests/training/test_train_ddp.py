"""Two processes, DDP over gloo on the CPU: `torchrun --nproc_per_node 2 train.py CONFIG` trains on one
global batch split across the ranks, and computes what one process computes on the same global batch.

The reference run is one process with micro batch 2 and 2 accumulation steps: the same micro batches, in the
same order, as rank 0 and rank 1 get at each step, so each micro batch's forward and backward are the same
computation in both runs. Only the reduction differs: gloo averages the ranks' gradients, the single process
accumulates two backward passes. Tolerance on gradients and weights: rtol 1e-5, atol 1e-8, for float32
summation order (measured: bit-equal after 3 SGD steps, as a sum of two terms and scalings by 2 are exact
here; an aux rescale off by the world size changes the routers' first gradient by 100 %).
"""

import torch

from pesc.testing.launch import BACKENDS, assert_same_routing_logs, launch_training
from helpers import MULTI_PROCESS_SETTINGS as SETTINGS, make_config

STEPS = SETTINGS["max_steps"]
TOL = dict(rtol=1e-5, atol=1e-8)


def _sequences(micro_batch) -> set[tuple]:
    """The examples packed into a micro batch (each starts where position_ids restart at 0)."""
    ids, positions = micro_batch["input_ids"].reshape(-1), micro_batch["position_ids"].reshape(-1)
    starts = (positions == 0).nonzero().reshape(-1).tolist() + [len(ids)]
    return {tuple(ids[a:b].tolist()) for a, b in zip(starts, starts[1:])}


def _mean(gradients: list[dict]) -> dict:
    return {name: sum(g[name] for g in gradients) / len(gradients) for name in gradients[0]}


def test_ddp_two_processes_gloo_equals_one_process_on_the_same_global_batch(tmp_path, tiny_llama_dir, data_file):
    from pesc.testing.training_probe import probed_training
    from pesc.training import train

    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    config = make_config(tmp_path / "ddp", tiny_llama_dir, data_file, **SETTINGS)
    launch_training(BACKENDS["ddp"], tmp_path / "ddp", config, aux_gradients=True)
    single_config = make_config(tmp_path / "single", tiny_llama_dir, data_file, gradient_accumulation_steps=2,
                                **SETTINGS)
    with probed_training(tmp_path / "single"):
        train(str(single_config))

    ranks = [torch.load(tmp_path / "ddp" / f"probe-rank{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "single" / "probe-rank0.pt")
    # the Trainer itself runs distributed (not two independent single-process runs that happen to agree)
    assert [(r["world_size"], r["process_index"], r["global_step"]) for r in ranks] == [(2, 0, STEPS), (2, 1, STEPS)]
    assert {r["wrapper"] for r in ranks} == {"DistributedDataParallel"}
    # the process group is gone before the interpreter exits (gloo's threads abort a process left with one)
    assert [r["process_group_at_exit"] for r in ranks] == [False, False]
    assert (single["world_size"], single["global_step"]) == (1, STEPS)

    for step in range(STEPS):
        per_rank = [[b for b in r["micro_batches"] if b["step"] == step] for r in ranks]
        accumulated = [b for b in single["micro_batches"] if b["step"] == step]
        assert [len(b) for b in per_rank] == [1, 1] and len(accumulated) == 2
        # the ranks split the global batch: no example on both
        assert not _sequences(per_rank[0][0]) & _sequences(per_rank[1][0])
        # ... and together trained on the single process's global batch, micro batch for micro batch
        for rank in (0, 1):
            for key in ("input_ids", "position_ids"):
                assert torch.equal(per_rank[rank][0][key], accumulated[rank][key]), (step, rank, key)

    # The first step's router gradient is the aux term's alone (adapter_up is zero: the LM loss does not
    # reach the routers yet): coef * mean(aux) over the ranks' (or the accumulated) micro batches.
    for run, aux_gradients in ((ranks[0], [r["aux_gradients"][0] for r in ranks]), (single, single["aux_gradients"])):
        expected = _mean(aux_gradients)
        assert len(expected) == 2 and all(g.abs().sum() > 0 for g in expected.values())
        for name, grad in expected.items():
            torch.testing.assert_close(run["gradients"][0][name], grad, **TOL, msg=name)

    for step in range(STEPS):
        for name, grad in single["gradients"][step].items():
            torch.testing.assert_close(ranks[0]["gradients"][step][name], grad, **TOL, msg=f"step {step + 1}: {name}")
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys() == single["params"].keys()
    for name, tensor in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], tensor, rtol=0, atol=0, msg=name)  # DDP keeps ranks equal
        torch.testing.assert_close(tensor, single["params"][name], **TOL, msg=name)
    # it trained: adapter_up moved from its zero init
    assert any("adapter_up" in n and t.abs().sum() > 0 for n, t in ranks[0]["params"].items())
    run = tmp_path / "ddp" / "run"
    assert (run / "final" / "experts.safetensors").is_file()
    assert (run / f"checkpoint-{STEPS}" / "adapter_model.safetensors").is_file()
    # the logged aux loss and expert load are the global batch's (both ranks'), as one process logs them
    assert_same_routing_logs(run, tmp_path / "single" / "run", STEPS)
