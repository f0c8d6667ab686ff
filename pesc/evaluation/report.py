"""What `pesc eval` writes: lm-eval's results as JSON (plus what was evaluated) and Markdown tables."""

import json
import math
import os
import tempfile
from pathlib import Path

from pesc.atomic import nearest_existing
from pesc.errors import PescError

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
COMPARE_FILE = "compare.json"
_NOT_METRICS = ("alias", "name", "sample_len", "sample_count")


def results_table(results: dict) -> str:
    """One model's table: each score with its standard error and the number of samples behind it."""
    return metrics_table([("value", results)])


def _metric_entries(results: dict):
    """(task, metric, filter, value, stderr or None) of a results dict; a stderr lm-eval could not compute
    (its "N/A": one sample, or a metric without one) is None."""
    for task, entries in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in entries.items():
            if key in _NOT_METRICS or "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = entries.get(f"{metric}_stderr,{filter_name}")
            yield task, metric, filter_name, value, stderr if _is_number(stderr) else None


def _is_number(value) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)


def metric_values(results: dict) -> dict[tuple[str, str, str], float | str]:
    """{(task, metric, filter): value} of a results dict, standard errors left out."""
    return {(task, metric, name): value for task, metric, name, value, _ in _metric_entries(results)}


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _score(value, stderr) -> str:
    return _cell(value) + (f" ± {stderr:.4f}" if stderr is not None else "")


def _samples(results: dict, task: str) -> str:
    """How many samples lm-eval scored for the task (its n-samples "effective": fewer than all under --limit);
    empty for a group (lm-eval counts none)."""
    return str(results.get("n-samples", {}).get(task, {}).get("effective", ""))


def _within(delta: float, stderrs: list) -> str:
    """Whether a difference is within the two scores' combined standard error, sqrt(se_a² + se_b²): a
    difference inside it is no finding. "—" where a score has no standard error."""
    if any(stderr is None for stderr in stderrs):
        return "—"
    combined = math.sqrt(sum(stderr**2 for stderr in stderrs))
    return f"{'yes' if abs(delta) <= combined else 'no'} (±{combined:.4f})"


def metrics_table(columns: list[tuple[str, dict]]) -> str:
    """A Markdown table, a row per (task, metric, filter) and a column per (name, results), each score
    "value ± stderr" with n, the samples scored; with two columns (baseline first) also second - first and
    whether that lies within the combined standard error. Needs no lm-eval (model cards are built without it)."""
    entries = [{(t, m, f): (v, se) for t, m, f, v, se in _metric_entries(results)} for _, results in columns]
    shots = {task: n for _, results in columns for task, n in results.get("n-shot", {}).items()}
    names = " | ".join(name for name, _ in columns)
    delta = len(columns) == 2
    lines = [
        f"| Task | n-shot | n | Metric | Filter | {names} |" + (" Δ | within stderr |" if delta else ""),
        "|---|--:|--:|---|---|" + "--:|" * (len(columns) + delta) + ("---|" if delta else ""),
    ]
    for key in sorted(set().union(*entries)):
        cells = [column.get(key, ("—", None)) for column in entries]
        samples = " / ".join(dict.fromkeys(n for _, results in columns if (n := _samples(results, key[0]))))
        row = f"| {key[0]} | {shots.get(key[0], '')} | {samples} | {key[1]} | {key[2]} | "
        row += " | ".join(_score(value, stderr) for value, stderr in cells) + " |"
        if delta:
            (first, first_se), (second, second_se) = cells
            if _is_number(first) and _is_number(second):
                row += f" {second - first:+.4f} | {_within(second - first, [first_se, second_se])} |"
            else:
                row += " — | — |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def evaluation_section(results: dict) -> str:
    """The model card's Evaluation text: the scores and what produced them."""
    about = results.get("pesc", {})
    source = "pesc eval"
    if "model" in about:
        source = f"`pesc eval` of `{about['model']}` ({about.get('kind')}, {about.get('dtype')})"
    limit = f", at most {about['limit']} examples per task" if about.get("limit") else ""
    return (
        f"lm-evaluation-harness {results.get('lm_eval_version', '')}, {source}{limit}:\n\n"
        + results_table(results)
    )


def _write_text(path: Path, text: str) -> None:
    """Write beside and rename: a results file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_json(results: dict, description: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps({**results, "pesc": description}, indent=2, default=handle_non_serializable)


def check_results_folder(out: Path) -> None:
    """OUT can take the results, checked before any model loads (else a read-only --out fails only after the
    whole evaluation): a probe file is created and removed in OUT, or, while OUT does not exist yet, in the
    nearest folder above it that does (so nothing is left behind when the evaluation fails)."""
    if out.exists() and not out.is_dir():
        raise PescError(f"--out {out} is a file: give a folder for the results")
    probed = nearest_existing(out)
    try:
        with tempfile.TemporaryFile(dir=probed):
            pass
    except OSError as error:
        raise PescError(f"--out {out}: cannot write the results there ({error.strerror}: {probed}): "
                        "give a folder you can write to") from None


def write_report(out: Path, files: dict[str, str]) -> None:
    """Write {file name: text} into OUT (created if missing)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PescError(f"cannot create the results folder {out} ({error.strerror})") from None
    for name, text in files.items():
        _write_text(out / name, text)


def read_results(path: str | Path) -> dict:
    """A results.json written by `pesc eval`."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PescError(f"cannot read the eval results {path} ({error})") from None
    if not isinstance(results, dict) or "results" not in results:
        raise PescError(f"{path} is not a results file of pesc eval (no 'results'): give its results.json")
    return results
