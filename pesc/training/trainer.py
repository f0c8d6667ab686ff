"""The transformers Trainer, taught three PESC things.

- Saving: every checkpoint-N (and `final/`) gets `pesc_experts.safetensors` + `pesc_config.json`
  (pesc.run_files) beside peft's LoRA adapter; resuming loads them back (peft restores only the LoRA).
- The loss: the model adds `router_aux_loss_coef * aux_loss` per micro batch. When the Trainer
  normalises the language-model loss over the whole accumulated batch (`num_items_in_batch`), it no
  longer divides by the accumulation steps and multiplies by the number of processes; the aux term is
  rescaled here so that its gradient is exactly `coef * mean(aux_loss)` over micro batches and ranks.
- Logging: every `logging_steps`, the mean aux loss and the per-layer expert load (share of the top-k
  assignments each expert got, from the router logits) are added to the logs; the full per-layer
  table also goes to `OUTPUT_DIR/expert_load.jsonl`. Both are over the global batch: summed across
  ranks (DDP, FSDP, ZeRO-3), equal to what one process computes on the same micro batches.
"""

import json
import os
from pathlib import Path

import torch
from transformers import Trainer

from pesc.run_files import EXPERTS_FILE, load_expert_state, save_trained_state

EXPERT_LOAD_FILE = "expert_load.jsonl"


def _pesc_model(model):
    """The PescForCausalLM inside peft / DDP wrappers."""
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
    """Copy a checkpoint's routers and adapters into the (possibly wrapped) model; returns tensors loaded."""
    state = load_expert_state(directory)
    loaded = 0
    for name, param in model.named_parameters():
        key = name[name.find("model.layers.") :] if "model.layers." in name else None
        if key is None or ".moe_adapter." not in key or ".lora_" in key:
            continue
        # peft prefixes: base_model.model.model.layers... -> model.layers...
        if key not in state:
            raise ValueError(f"{directory}/{EXPERTS_FILE} has no tensor {key}")
        param.copy_(state[key].to(device=param.device, dtype=param.dtype))
        loaded += 1
    if loaded != len(state):
        raise ValueError(f"{directory}/{EXPERTS_FILE} holds {len(state)} tensors, the model takes {loaded}")
    return loaded


class PescTrainer(Trainer):
    def __init__(self, *args, pesc_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pesc_config = pesc_config if pesc_config is not None else _pesc_model(self.model).config
        self._reset_stats()

    # ---- loss and statistics ----
    def _reset_stats(self):
        self._aux_sum = 0.0
        self._aux_count = 0
        self._load_counts = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        coef = self.pesc_config.router_aux_loss_coef
        if aux is not None and model.training:
            if coef > 0 and self._loss_scaled_for_ga(num_items_in_batch):
                scale = 1
                if self.args.average_tokens_across_devices:
                    scale = self.accelerator.num_processes // self.get_tp_size()
                ga = self.current_gradient_accumulation_steps
                loss = loss + coef * aux.to(loss.dtype) * (1.0 / ga - scale)
            self._record(aux, outputs.get("router_logits"), inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    @torch.no_grad()
    def _record(self, aux, router_logits, attention_mask):
        self._aux_sum += float(aux.detach())
        self._aux_count += 1
        if not router_logits:
            return
        k, n = self.pesc_config.topk, self.pesc_config.num_experts
        keep = None
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == router_logits[0].shape[0]:
            keep = attention_mask.reshape(-1).bool()
        counts = []
        for logits in router_logits:
            if keep is not None:
                logits = logits[keep.to(logits.device)]
            chosen = torch.topk(logits.float(), k, dim=-1).indices.reshape(-1)
            counts.append(torch.bincount(chosen, minlength=n).cpu().double())
        counts = torch.stack(counts)
        self._load_counts = counts if self._load_counts is None else self._load_counts + counts

    def _stats_over_ranks(self):
        """(aux sum, aux count, expert load counts) summed over every rank's micro batches since the last log:
        each rank routed its own share of the global batch. Every rank logs at the same steps (the Trainer
        gathers the loss there), so the reduction is a collective they all join."""
        sums = torch.tensor([self._aux_sum, self._aux_count], dtype=torch.float64)
        counts = self._load_counts
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            sums = self.accelerator.reduce(sums.to(device), reduction="sum").cpu()
            if counts is not None:
                counts = self.accelerator.reduce(counts.to(device), reduction="sum").cpu()
        return float(sums[0]), float(sums[1]), counts

    def log(self, logs, start_time=None):
        if "loss" in logs and self._aux_count:
            aux_sum, aux_count, load_counts = self._stats_over_ranks()
            logs["aux_loss"] = round(aux_sum / aux_count, 6)
            if load_counts is not None:
                load = load_counts / load_counts.sum(dim=1, keepdim=True).clamp_min(1)
                # 1.0 = perfectly even; E = every token to one expert (max share x experts, worst layer)
                logs["expert_load_max"] = round(float(load.max()) * load.shape[1], 4)
                if self.args.should_save:
                    record = {"step": self.state.global_step, "expert_load": [[round(x, 5) for x in row] for row in load.tolist()]}
                    os.makedirs(self.args.output_dir, exist_ok=True)
                    with open(Path(self.args.output_dir) / EXPERT_LOAD_FILE, "a") as f:
                        f.write(json.dumps(record) + "\n")
            self._reset_stats()
        super().log(logs, start_time)

    # ---- saving and resuming ----
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        source = _StateDictView(state_dict) if state_dict is not None else self.accelerator.unwrap_model(self.model)
        save_trained_state(source, self.pesc_config, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        load_experts_into(model if model is not None else self.model, resume_from_checkpoint)
