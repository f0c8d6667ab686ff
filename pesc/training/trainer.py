"""The transformers Trainer, taught what every method's training needs.

- Saving: every checkpoint-N (and `final/`) gets `experts.safetensors` + `pesc_config.json`
  (pesc.checkpoint.run_files) beside peft's LoRA adapter; resuming loads them back (peft restores only
  the LoRA).
  A run without LoRA (`lora_target_modules: []`) saves no model weights besides those.
- The loss: the model adds each named aux loss times its coefficient per micro batch. When the
  Trainer normalises the language-model loss over the whole accumulated batch (`num_items_in_batch`),
  it no longer divides by the accumulation steps and multiplies by the number of processes; the aux
  terms are rescaled here so that their gradient is exactly `coef * mean(loss)` over micro batches and ranks.
- Logging: every `logging_steps`, the mean of each named aux loss and the per-site expert load (the
  share of the routing each expert got: the top-k picks of a sparse router, the softmax weights of a
  dense one, from the routing records, each site over its own real tokens: a T5's encoder sites the source's, its
  decoder sites the target's; a model without aux losses, as T5's, logs it too) are added to the logs; the full per-site table also goes to
  `OUTPUT_DIR/expert_load.jsonl`. Both are over the global batch: summed across ranks (DDP, FSDP,
  ZeRO-3), equal to what one process computes on the same micro batches. When training starts, the file keeps only
  the steps up to the one it starts from: a resumed run's file equals an uninterrupted run's (no lines of the killed
  run past its checkpoint), a fresh run's starts empty.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from pesc.checkpoint.run_files import EXPERTS_FILE, load_expert_state, save_trained_state
from pesc.methods import method_of
from pesc.routing_analysis.records import real_token_rows
from pesc.routing_analysis.tally import routing_load

EXPERT_LOAD_FILE = "expert_load.jsonl"


def unwrapped_model(model):
    """The method's causal LM inside peft / DDP wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


class _StateDictView:
    def __init__(self, state_dict):
        self._state_dict = state_dict

    def state_dict(self):
        return self._state_dict


@torch.no_grad()
def load_experts_into(model: torch.nn.Module, directory) -> int:
    """Copy a checkpoint's added tensors into the (possibly wrapped) model; returns tensors loaded."""
    method = method_of(unwrapped_model(model).config)
    state = load_expert_state(directory)
    loaded = 0
    for name, param in model.named_parameters():
        if not method.is_added(name):
            continue
        key = method.checkpoint_name(name)  # peft prefixes: base_model.model.model.layers... -> model.layers...
        if key not in state:
            raise ValueError(f"{directory}/{EXPERTS_FILE} has no tensor {key}")
        param.copy_(state[key].to(device=param.device, dtype=param.dtype))
        loaded += 1
    if loaded != len(state):
        raise ValueError(f"{directory}/{EXPERTS_FILE} holds {len(state)} tensors, the model takes {loaded}")
    return loaded


def drop_records_after(path: Path, step: int) -> None:
    """Keep the lines of a JSON-lines log (one record a step, in step order) up to `step`; remove it if none is left.

    A killed run may have cut its last line short: that line goes too (its step is past every checkpoint's, since a
    step's line is written before its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] > step:
                break
        except json.JSONDecodeError:
            break
        kept.append(line)
    if not kept:
        path.unlink()
        return
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(kept))
    os.replace(partial, path)  # a kill while writing leaves the old file, never half of it


class _ExpertLoadFromStartStep(TrainerCallback):
    """At train begin (state restored, on resume), drop what a killed run logged past the step training goes on from."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            drop_records_after(Path(args.output_dir) / EXPERT_LOAD_FILE, state.global_step)


@contextmanager
def _added_modules_count_as_adapters():
    """transformers refuses to train a quantized model that carries no peft adapter. A run without LoRA trains
    the method's added modules instead: full-precision modules on the frozen quantized base, which is
    what that check asks for. Let such a model (quantized, no peft, something trainable) through it."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.validate_quantization_for_training

    def validate(model):
        trains = any(param.requires_grad for param in model.parameters())
        if not (getattr(model, "is_quantized", False) and not hasattr(model, "peft_config") and trains):
            original(model)

    hf_trainer.validate_quantization_for_training = validate
    try:
        yield
    finally:
        hf_trainer.validate_quantization_for_training = original


class MoETrainer(Trainer):
    def __init__(self, *args, model_config=None, **kwargs):
        with _added_modules_count_as_adapters():
            super().__init__(*args, **kwargs)
        self.model_config = model_config if model_config is not None else unwrapped_model(self.model).config
        self.add_callback(_ExpertLoadFromStartStep())
        self._reset_stats()

    # ---- loss and statistics ----
    def _reset_stats(self):
        self._aux_sums: dict[str, float] = {}
        self._aux_count = 0
        self._load_counts = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True, "output_routing_records": model.training}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux_losses = (outputs.get("aux_losses") if isinstance(outputs, dict) else None) or {}
        if model.training:  # a model without aux losses (T5's) still logs its expert load, from its routing records
            if aux_losses and self._loss_scaled_for_ga(num_items_in_batch):
                scale = 1
                if self.args.average_tokens_across_devices:
                    scale = self.accelerator.num_processes // self.get_tp_size()
                ga = self.current_gradient_accumulation_steps
                coefficients = unwrapped_model(model).aux_loss_coefficients()
                for name, value in aux_losses.items():
                    if coefficients[name] > 0:
                        loss = loss + coefficients[name] * value.to(loss.dtype) * (1.0 / ga - scale)
            records = outputs.get("routing_records") if isinstance(outputs, dict) else None
            self._record(aux_losses, records, inputs.get("attention_mask"), inputs.get("labels"))
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    @torch.no_grad()
    def _record(self, aux_losses, records, attention_mask, labels):
        for name, value in aux_losses.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + float(value.detach())
        self._aux_count += 1
        if not records:
            return
        # each site over its own real tokens: a T5's encoder sites the source's, its decoder sites the target's
        counts = torch.stack([
            routing_load(record, real_token_rows(record.site, record.logits.shape[0], attention_mask, labels))
            for record in records
        ])
        self._load_counts = counts if self._load_counts is None else self._load_counts + counts

    def _stats_over_ranks(self):
        """({aux loss name: sum}, micro batch count, expert load counts) summed over every rank's micro batches
        since the last log: each rank routed its own share of the global batch. Every rank logs at the same
        steps (the Trainer gathers the loss there), so the reduction is a collective they all join."""
        names = list(self._aux_sums)
        sums = torch.tensor([*self._aux_sums.values(), self._aux_count], dtype=torch.float64)
        counts = self._load_counts
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            sums = self.accelerator.reduce(sums.to(device), reduction="sum").cpu()
            if counts is not None:
                counts = self.accelerator.reduce(counts.to(device), reduction="sum").cpu()
        return dict(zip(names, sums[:-1].tolist())), float(sums[-1]), counts

    def log(self, logs, start_time=None):
        if "loss" in logs and self._aux_count:
            aux_sums, aux_count, load_counts = self._stats_over_ranks()
            for name, total in aux_sums.items():
                logs[name] = round(total / aux_count, 6)
            if load_counts is not None:
                load = load_counts / load_counts.sum(dim=1, keepdim=True).clamp_min(1)
                # 1.0 = perfectly even; E = every token to one expert (max share x experts, worst site)
                logs["expert_load_max"] = round(float(load.max()) * load.shape[1], 4)
                if self.args.should_save:
                    record = {"step": self.state.global_step, "expert_load": [[round(x, 5) for x in row] for row in load.tolist()]}
                    os.makedirs(self.args.output_dir, exist_ok=True)
                    with open(Path(self.args.output_dir) / EXPERT_LOAD_FILE, "a") as f:
                        f.write(json.dumps(record) + "\n")
            self._reset_stats()
        super().log(logs, start_time)

    # ---- saving and resuming ----
    def _trains_lora(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._trains_lora():
            super()._save(output_dir, state_dict=state_dict)
        elif self.args.should_save:
            # No LoRA: the frozen (4-bit) base is not saved again, only what trained (below), the
            # tokenizer and the arguments, as the Trainer saves them beside a model.
            os.makedirs(output_dir, exist_ok=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if not self.args.should_save:
            return
        source = _StateDictView(state_dict) if state_dict is not None else self.accelerator.unwrap_model(self.model)
        save_trained_state(source, self.model_config, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._trains_lora():
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        load_experts_into(model if model is not None else self.model, resume_from_checkpoint)
