"""Record what a MoETrainer run did, for tests that compare runs (one process against DDP ranks).

Per process, into `OUT_DIR/probe-rank{R}.pt` when training ends:
- `micro_batches`: each micro batch's `input_ids` (and `position_ids`), with the optimizer step it fed;
- `aux_gradients`: for each micro batch of the first step, the gradient of `coef * aux_loss` alone with
  respect to the routers, from a separate forward of the unwrapped model (no DDP synchronisation);
- `gradients`: every trainable parameter's gradient as the optimizer was about to see it, per step;
- `params`: the trainable parameters at the end; `world_size`, `process_index`, `global_step`.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback


class TrainingProbe(TrainerCallback):
    def __init__(self, trainer, path: Path):
        self.trainer, self.path = trainer, path
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
        if step == 0:
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
            },
            self.path,
        )


@contextmanager
def probed_training(out_dir: str | Path):
    """Within the block, every MoETrainer built records its run into `out_dir` (see the module docstring)."""
    from pesc.training.trainer import MoETrainer

    original = MoETrainer.__init__

    def init(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        TrainingProbe(trainer, Path(out_dir) / f"probe-rank{trainer.args.process_index}.pt")

    MoETrainer.__init__ = init
    try:
        yield
    finally:
        MoETrainer.__init__ = original
