"""Two processes, DDP over gloo on the CPU: `torchrun --nproc_per_node 2 train.py CONFIG` trains and the
ranks end with identical LoRA, router and adapter weights."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from test_train import data_file, make_config  # noqa: F401  (the same tiny config and data fixture)

REPO = Path(__file__).resolve().parents[1]

# train.py with one extra callback: each rank writes its trainable tensors when training ends
DRIVER = textwrap.dedent(
    """
    import os, sys, torch
    from transformers import TrainerCallback
    from pesc.training import trainer as trainer_module

    class DumpTrainable(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"params": params, "step": state.global_step,
                        "world": int(os.environ["WORLD_SIZE"]), "backend": torch.distributed.get_backend(),
                        "args_world": args.world_size, "process_index": args.process_index,
                        "ddp": type(kwargs["train_dataloader"]).__name__},
                       os.path.join(args.output_dir, f"rank{os.environ['RANK']}.pt"))

    original = trainer_module.PescTrainer.__init__
    def init(self, *a, **k):
        original(self, *a, **k)
        self.add_callback(DumpTrainable())
    trainer_module.PescTrainer.__init__ = init

    from pesc.cli import main
    main(["train", *sys.argv[1:]])
    """
)


def test_ddp_two_processes_gloo(tmp_path, tiny_llama_dir, data_file):
    config = make_config(tmp_path, tiny_llama_dir, data_file, max_steps=3, save_steps=3, micro_batch_size=2)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(driver), str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = tmp_path / "run"
    rank0, rank1 = (torch.load(run / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == 2 and rank0["backend"] == "gloo" and rank0["step"] == rank1["step"] == 3
    # the Trainer itself runs distributed (not two independent single-process runs that happen to agree)
    assert (rank0["args_world"], rank1["args_world"]) == (2, 2)
    assert (rank0["process_index"], rank1["process_index"]) == (0, 1)
    assert rank0["params"].keys() == rank1["params"].keys()
    assert any(".router." in n for n in rank0["params"])
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(rank1["params"][name], tensor, rtol=0, atol=0, msg=name)
    # it trained: adapter_up and lora_B moved from their zero init
    assert any("adapter_up" in n and t.abs().sum() > 0 for n, t in rank0["params"].items())
    assert (run / "final" / "pesc_experts.safetensors").is_file()
    assert (run / "checkpoint-3" / "adapter_model.safetensors").is_file()
