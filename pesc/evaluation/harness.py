"""Running lm-evaluation-harness on a model object: task checks before any weight loads, one run per shot count."""

import difflib
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from pesc.errors import PescError
from pesc.evaluation.suites import SuiteTask
from pesc.evaluation.task_data import check_task_data, leaf_configs

# The result keys that hold one entry per task (merged across the runs of different shot counts).
_PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PescError("pesc eval needs lm-evaluation-harness: pip install 'pesc-moe[eval]'") from None


@lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's task index (its own tasks, plus the YAML tasks under include_path); indexing takes seconds."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise PescError(f"--include-path {include_path} is not a folder: give the folder of your task YAML files")
    return TaskManager(include_path=include_path)


def _with_close_match(name: str, known: list[str]) -> str:
    """NAME with the closest task name, where one is close: a typo (arc_esay, hellaswg score >= 0.87), not
    one of lm-eval's ~15k names that merely shares letters (difflib's default 0.6 finds one for any name)."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f"{name} (did you mean '{close[0]}'?)" if close else name


def check_tasks(tasks: list[SuiteTask], include_path: str | None, confirm_run_unsafe_code: bool) -> None:
    """Every task is known to lm-eval, code-running tasks are confirmed, and every task's data can be read
    here: before any weight loads."""
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [spec.task for spec in tasks if spec.task not in known]
    if unknown:
        names = ", ".join(_with_close_match(name, manager.all_tasks) for name in unknown)
        raise PescError(
            f"unknown lm-eval task {names}: see `lm-eval ls tasks`, or pass --include-path with your task YAML"
        )
    unsafe = [spec.task for spec in tasks
              if any(config.get("unsafe_code") for _, config in leaf_configs(manager, spec.task))]
    if unsafe and not confirm_run_unsafe_code:
        raise PescError(
            f"{', '.join(unsafe)} run the model's generated code on this machine: "
            "pass --confirm-run-unsafe-code to allow it (lm-eval's own opt-in)"
        )
    check_task_data(manager, [spec.task for spec in tasks])


def backend(model) -> str:
    """lm-eval's HFLM backend for the model: "seq2seq" for an encoder-decoder (T5: the context goes to the encoder,
    the continuation is scored by the decoder), else "causal" (context and continuation as one sequence)."""
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"


@contextmanager
def _weights_as_loaded(model):
    """Keep HFLM from re-tying the model's weights: it calls `model.tie_weights()` on a model object, and
    transformers 5 reads every T5 config as tied (tie_word_embeddings true even where config.json says false), so
    the call would overwrite the LM head of a T5 v1.1 / Flan-T5 / mT5 with the input embedding. from_pretrained
    has tied what the checkpoint ties already."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def harness_model(eval_model, batch_size: int = 1):
    """lm-eval's HFLM around the loaded model (a peft model for a run), with the backend its config asks for."""
    from lm_eval.models.huggingface import HFLM

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warnings about a model object passed in are for launcher scripts, not us
    try:
        with _weights_as_loaded(eval_model.model):
            return HFLM(pretrained=eval_model.model, tokenizer=eval_model.tokenizer, batch_size=batch_size,
                        backend=backend(eval_model.model))
    finally:
        hf_logger.setLevel(level)


def evaluate(
    eval_model,
    tasks: list[SuiteTask],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    confirm_run_unsafe_code: bool = False,
) -> dict:
    """lm-eval's results for the model (lm-eval shows a progress bar per request type); one
    `simple_evaluate` per distinct shot count, merged into one results dict."""
    import lm_eval

    lm = harness_model(eval_model, batch_size)
    merged: dict = {}
    for shots in dict.fromkeys(spec.num_fewshot for spec in tasks):
        names = [spec.task for spec in tasks if spec.num_fewshot == shots]
        result = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=shots,
            limit=limit,
            task_manager=task_manager(include_path),
            log_samples=False,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
        )
        for key, value in result.items():
            if key in _PER_TASK_KEYS:
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    return merged
