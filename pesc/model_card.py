"""The model card (README.md) written into every model folder pesc publishes.

Deterministic text only (no dates, no absolute temporary paths), so that exporting twice
gives byte-identical folders. The metadata block is built with huggingface_hub's
`ModelCardData`; nothing here touches the network (no `validate()`, no `push_to_hub()`).
"""

import json
import re
from pathlib import Path

import transformers
import yaml
from huggingface_hub import ModelCard, ModelCardData

from pesc.methods import method_of
from pesc.summary import human_count

BASE_TAGS = ["moe", "mixture-of-experts", "sparse"]
# The transformers releases the shipped model code is checked on, oldest first (tests/modeling/test_compat.py
# loads converted and exported checkpoints under each): it runs on the first and every later one.
# 5.3.0 skips tying the embeddings of remote-code models, which the model code makes up for.
TESTED_TRANSFORMERS = ("4.46.3", "5.0.0", "5.3.0", "5.12.0", "5.24.0")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_model_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (owner/name) and is not a local folder, else None."""
    if not name or not _HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def read_trainer_metrics(*folders: str | Path) -> dict | None:
    """Headline numbers from the first `trainer_state.json` found in `folders` (None if none)."""
    for folder in folders:
        path = Path(folder) / "trainer_state.json"
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        history = state.get("log_history") or []
        metrics = {}
        for key in ("global_step", "epoch"):
            if state.get(key) is not None:
                metrics[key] = state[key]
        train = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        if train:
            metrics["first_train_loss"] = train[0]
            metrics["final_train_loss"] = train[-1]
        if evals:
            metrics["final_eval_loss"] = evals[-1]
            metrics["best_eval_loss"] = min(evals)
        for entry in history:
            for key in ("train_runtime", "train_samples_per_second", "total_flos"):
                if key in entry:
                    metrics[key] = entry[key]
        return metrics or None
    return None


def _walk(value, keys=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, (*keys, str(k)))
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, keys)
    else:
        yield keys, value


def datasets_from_train_config(path: str | Path) -> tuple[list[str], list[str]]:
    """(Hub dataset ids, local data file names) named in a `pesc_train_config.yaml`.

    The config's schema belongs to the trainer; this reads any key that names data
    (`dataset`, `datasets`, `dataset_name`, `data_files`, `train_file`, ... or any key
    under a `data`/`dataset` section). Values with a file suffix or that exist on disk are
    local files; `owner/name` values are Hub dataset ids.
    """
    path = Path(path)
    if not path.is_file():
        return [], []
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [], []
    hub, local = [], []
    data_keys = {"dataset", "datasets", "dataset_name", "dataset_id", "data_files", "train_file", "eval_file", "data"}
    for keys, value in _walk(config):
        if not keys or not isinstance(value, str) or not value:
            continue
        if keys[-1] not in data_keys and not (keys[-1] in {"path", "name", "file", "files"} and any(
            "data" in k for k in keys[:-1]
        )):
            continue
        if Path(value).suffix or Path(value).exists():
            if Path(value).name not in local:
                local.append(Path(value).name)
        elif _HUB_ID.match(value) and value not in hub:
            hub.append(value)
    return hub, local


def _format_metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_model_card(
    config,
    *,
    title: str,
    base_model: str,
    base_model_id: str | None = None,
    datasets: list[str] = (),
    data_files: list[str] = (),
    lora: dict | None = None,
    metrics: dict | None = None,
    base_model_relation: str | None = "finetune",
    extra_tags: list[str] = (),
    description: str | None = None,
    extra_settings: dict | None = None,
    evaluation: str | None = None,
    converted: bool = False,
) -> ModelCard:
    """A model card for a method's model folder: metadata block plus settings, parameter counts, training.

    `base_model` is shown in the text as given; `base_model_id` (a Hub id) goes in the metadata.
    `extra_settings` adds rows to the settings table. Without `lora`, `datasets`, `data_files` and
    `metrics` (a freshly converted, untrained model) the card has no Training section. `evaluation`
    (Markdown, from `pesc eval` results) becomes an Evaluation section.
    """
    method = method_of(config)
    tags = list(dict.fromkeys([*BASE_TAGS[:1], *method.card_tags[:1], *BASE_TAGS[1:], *method.card_tags[1:],
                               config.base_model_type, *extra_tags]))
    data = ModelCardData(
        base_model=base_model_id,
        base_model_relation=base_model_relation if base_model_id else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=list(datasets) or None,
    )
    summary = method.parameter_summary(config)
    code_files = ", ".join(f"`{path.name}`" for path in method.shipped_files)
    lines = [
        f"# {title}",
        "",
        description or method.card_text(config, base_model),
        "",
        "## Use",
        "",
        f"The model code ships in this folder ({code_files}), so load it with",
        "`trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")',
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID", trust_remote_code=True)',
        "```",
        "",
        f"The model code runs on transformers {TESTED_TRANSFORMERS[0]} or newer, 4.x and 5.x alike (checked on "
        f"{', '.join(TESTED_TRANSFORMERS)}, the logits and greedy generation exactly the same on each). This "
        f"checkpoint was made with transformers {transformers.__version__}.",
        "",
        "## Architecture",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base family | `{config.base_model_type}` |",
        f"| layers | {summary.num_layers} |",
        f"| hidden size | {summary.hidden_size} |",
        *(f"| {key} | {value} |" for key, value in method.card_rows(config, converted)),
        *(f"| {key} | {value} |" for key, value in (extra_settings or {}).items()),
        f"| total parameters | {summary.total_params:,} ({human_count(summary.total_params)}) |",
        f"| active parameters per token | {summary.active_params:,} ({human_count(summary.active_params)}) |",
        f"| expert + router parameters | {summary.trainable_params:,} ({human_count(summary.trainable_params)}) |",
        f"| dense base parameters | {summary.dense_params:,} ({human_count(summary.dense_params)}) |",
        "",
    ]
    if lora is not None or datasets or data_files or metrics:
        lines += ["## Training", ""]
        if lora is not None:
            targets = lora.get("target_modules")
            if isinstance(targets, (list, tuple, set)):
                targets = ", ".join(sorted(targets))
            lines += [
                "QLoRA: LoRA on the dense linears of a 4-bit base, routers and expert adapters trained in full; "
                "the LoRA was merged into the dense weights of an unquantized base for this release.",
                "",
                f"- LoRA rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')}",
                f"- LoRA targets: {targets}",
            ]
        if datasets:
            lines.append(f"- datasets: {', '.join(datasets)}")
        if data_files:
            lines.append(f"- data files: {', '.join(data_files)}")
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {_format_metric(value)} |" for key, value in metrics.items()]
        lines.append("")
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content, ignore_metadata_errors=True)
