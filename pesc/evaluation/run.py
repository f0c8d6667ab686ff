"""`pesc eval` end to end: check everything that can be checked cheaply, then load, evaluate, report."""

import gc
from dataclasses import asdict
from pathlib import Path

from pesc import __version__
from pesc.evaluation.harness import check_tasks, evaluate
from pesc.evaluation.loading import check_eval_source, load_eval_model
from pesc.evaluation.report import (
    COMPARE_FILE,
    RESULTS_FILE,
    TABLE_FILE,
    check_results_folder,
    metrics_table,
    results_json,
    results_table,
    write_report,
)
from pesc.evaluation.suites import requested_tasks
from pesc.errors import PescError


def _evaluate_one(path, tasks, settings: dict, load: dict) -> tuple[dict, dict]:
    eval_model = load_eval_model(path, **load)
    results = evaluate(eval_model, tasks, **settings)
    description = {**eval_model.description, "pesc_version": __version__, "tasks": [asdict(t) for t in tasks]}
    description.update({key: settings[key] for key in ("limit", "batch_size")})
    del eval_model  # one model in memory at a time (--compare loads the second after)
    gc.collect()
    return results, description


def run_eval(
    model: str,
    out: str | Path,
    *,
    tasks: str | None = None,
    suite: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    include_path: str | None = None,
    compare: str | None = None,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    confirm_run_unsafe_code: bool = False,
    trust_remote_code: bool = False,
    echo=print,
) -> Path:
    """Evaluate MODEL (and the --compare baseline); writes results.json and results.md into OUT; returns OUT."""
    specs = requested_tasks(tasks, suite, num_fewshot)
    for value, flag in ((limit, "--limit"), (batch_size, "--batch-size")):
        if value is not None and value < 1:
            raise PescError(f"{flag} must be >= 1, got {value}")
    out = Path(out)
    check_results_folder(out)
    for path in [model] + ([compare] if compare else []):
        check_eval_source(path, trust_remote_code)
    check_tasks(specs, include_path, confirm_run_unsafe_code)
    settings = dict(include_path=include_path, limit=limit, batch_size=batch_size,
                    confirm_run_unsafe_code=confirm_run_unsafe_code)
    load = dict(dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)

    results, description = _evaluate_one(model, specs, settings, load)
    files = {RESULTS_FILE: results_json(results, description)}
    if compare:
        baseline, baseline_description = _evaluate_one(compare, specs, settings, {**load, "load_in_4bit": False})
        files[COMPARE_FILE] = results_json(baseline, baseline_description)
        table = metrics_table([(Path(compare).name, baseline), (Path(model).name, results)])
    else:
        table = results_table(results)
    files[TABLE_FILE] = table
    write_report(out, files)
    echo(table)
    echo(f"results: {out / RESULTS_FILE}, table: {out / TABLE_FILE}")
    return out
