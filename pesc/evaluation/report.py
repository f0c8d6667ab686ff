"""What `pesc eval` writes: lm-eval's results as JSON (plus what was evaluated) and Markdown tables."""

import json
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
    """lm-eval's own Markdown table (and its groups table when groups ran)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def metric_values(results: dict) -> dict[tuple[str, str, str], float | str]:
    """{(task, metric, filter): value} of a results dict, standard errors left out."""
    values = {}
    for task, entries in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in entries.items():
            if key in _NOT_METRICS or "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            values[(task, metric, filter_name)] = value
    return values


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(columns: list[tuple[str, dict]]) -> str:
    """A Markdown table, a row per (task, metric, filter) and a column per (name, results); with two
    columns (baseline first) a third, second - first. Needs no lm-eval (model cards are built without it)."""
    values = [metric_values(results) for _, results in columns]
    shots = {task: n for _, results in columns for task, n in results.get("n-shot", {}).items()}
    names = " | ".join(name for name, _ in columns)
    delta = len(columns) == 2
    lines = [
        f"| Task | n-shot | Metric | Filter | {names} |" + (" Δ |" if delta else ""),
        "|---|--:|---|---|" + "--:|" * (len(columns) + delta),
    ]
    for key in sorted(set().union(*values)):
        cells = [column.get(key, "—") for column in values]
        row = f"| {key[0]} | {shots.get(key[0], '')} | {key[1]} | {key[2]} | " + " | ".join(map(_cell, cells)) + " |"
        if delta:
            numbers = all(isinstance(cell, float | int) for cell in cells)
            row += f" {cells[1] - cells[0]:+.4f} |" if numbers else " — |"
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
        + metrics_table([("value", results)])
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
