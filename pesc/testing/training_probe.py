"""Record what a MoETrainer run did, for tests that compare runs (one process against DDP ranks).

Per process, into `OUT_DIR/probe-rank{R}.pt` when training ends:
- `micro_batches`: each micro batch's `input_ids` (and `position_ids`), with the optimizer step it fed;
- `aux_gradients` (when asked: DDP only, as it differentiates the unwrapped model's own parameters): for
  each micro batch of the first step, the gradient of `coef * aux_loss` alone with respect to the routers,
  from a separate forward of the unwrapped model (no DDP synchronisation);
- `gradients`: every trainable parameter's gradient as the optimizer was about to see it, per step (the
  local shards under FSDP; none under ZeRO-3, which keeps gradients in its own buffers);
- `params`: the trainable parameters at the end (local shards when sharded); `world_size`,
  `process_index`, `global_step`;
- `wrapper`: the class that wrapped the model for training (DistributedDataParallel, DeepSpeedEngine,
  FullyShardedDataParallel / FSDP...: which engine actually ran), `quant_storage`: the storage dtypes
  of the 4-bit weights (empty when not quantized), and `z3_leaves`: the classes of the modules flagged as
  DeepSpeed ZeRO-3 leaves (gathered whole);
- `process_group_at_exit`: whether torch.distributed's process group was still up when `pesc train` returned
  (added then, by `main`): one left to interpreter shutdown can abort a finished run.

`python -m pesc.testing.training_probe [--aux-gradients] OUT_DIR CONFIG [pesc train options]` runs
`pesc train CONFIG ...` under the probe: the script a test hands to torchrun or accelerate launch.
"""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback


class TrainingProbe(TrainerCallback):
    def __init__(self, trainer, path: Path, aux_gradients: bool = True):
        self.trainer, self.path, self.record_aux_gradients = trainer, path, aux_gradients
        self.micro_batches, self.aux_gradients, self.gradients = [], [], []
        training_step = trainer.training_step

        def recorded_training_step(model, inputs, num_items_in_batch=None):
            self._record_micro_batch(inputs)
            return training_step(model, inputs, num_items_in_batch)

        trainer.training_step = recorded_training_step
        trainer.add_callback(self)

    def _record_micro_batch(self, inputs):
        step = self.trainer.state.global_step
        self.micro_batches.append(
            {"step": step, **{k: inputs[k].detach().cpu() for k in ("input_ids", "position_ids") if k in inputs}}
        )
        if step == 0 and self.record_aux_gradients:
            model = self.trainer.model
            routers = {n: p for n, p in model.named_parameters() if ".router." in n and p.requires_grad}
            aux = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_router_logits=True).aux_loss
            coef = self.trainer.model_config.router_aux_loss_coef
            grads = torch.autograd.grad(coef * aux, list(routers.values()))
            self.aux_gradients.append({n: g.detach().cpu() for n, g in zip(routers, grads)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(
            {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        torch.save(
            {
                "micro_batches": self.micro_batches,
                "aux_gradients": self.aux_gradients,
                "gradients": self.gradients,
                "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                "world_size": args.world_size,
                "process_index": args.process_index,
                "global_step": state.global_step,
                "wrapper": type(self.trainer.model_wrapped).__name__,
                "quant_storage": {
                    str(p.dtype) for p in model.parameters() if type(p).__name__ == "Params4bit"
                },
                "z3_leaves": {type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)},
            },
            self.path,
        )


@contextmanager
def probed_training(out_dir: str | Path, aux_gradients: bool = True):
    """Within the block, every MoETrainer built records its run into `out_dir` (see the module docstring)."""
    from pesc.training.trainer import MoETrainer

    original = MoETrainer.__init__

    def init(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        TrainingProbe(trainer, Path(out_dir) / f"probe-rank{trainer.args.process_index}.pt", aux_gradients)

    MoETrainer.__init__ = init
    try:
        yield
    finally:
        MoETrainer.__init__ = original


def main(argv: list[str]) -> None:
    from pesc.cli import main as pesc_main

    aux_gradients = argv[:1] == ["--aux-gradients"]
    out_dir, *train_args = argv[1:] if aux_gradients else argv
    with probed_training(out_dir, aux_gradients):
        pesc_main(["train", *train_args])
    path = Path(out_dir) / f"probe-rank{os.environ.get('RANK', 0)}.pt"  # a failed run has exited above
    torch.save({**torch.load(path), "process_group_at_exit": torch.distributed.is_initialized()}, path)


if __name__ == "__main__":
    main(sys.argv[1:])
