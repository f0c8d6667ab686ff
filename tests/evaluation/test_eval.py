"""`pesc eval`: the same numbers as lm-eval run directly, on an export and on a training run; suites; bad input.

The tasks are lm-eval YAML tasks over local JSONL files (no network): a multiple-choice task (accuracy) and a
rolling log-likelihood task whose perplexities are a continuous fingerprint of the model's logits.
"""

import json
from pathlib import Path

import pytest

from pesc.cli import main
from pesc.evaluation import harness
from pesc.evaluation.report import metric_values, metrics_table, results_table
from pesc.evaluation.suites import SUITES, SuiteTask

lm_eval = pytest.importorskip("lm_eval")

TASKS = "tiny_mc,tiny_ppl"
MC_DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "seven"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot", "wet"], "label": 1},
    {"question": "Ice is", "choices": ["cold", "hot", "sour"], "label": 0},
    {"question": "A cat says", "choices": ["woof", "meow", "moo"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "north", "east"], "label": 2},
]
PPL_DOCS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Mixture of experts, upcycled."}]


def _task_yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    for name, docs in (("mc", MC_DOCS), ("ppl", PPL_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "tiny_mc.yaml").write_text(_task_yaml("tiny_mc", folder / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "num_fewshot: 0\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )))
    # tiny_mc's YAML fixes 0 shots (lm-eval then ignores a num_fewshot it is given): this twin takes any
    (folder / "tiny_mc_shots.yaml").write_text(_task_yaml("tiny_mc_shots", folder / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "fewshot_split: test\nmetric_list:\n  - metric: acc\n"
    )))
    (folder / "tiny_ppl.yaml").write_text(_task_yaml("tiny_ppl", folder / "ppl.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )))
    (folder / "tiny_unsafe.yaml").write_text(_task_yaml("tiny_unsafe", folder / "ppl.jsonl", (
        "unsafe_code: true\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )))
    return folder


def _pesc_eval(model, tasks_dir, out, *extra) -> dict:
    main(["eval", str(model), "--tasks", TASKS, "--include-path", str(tasks_dir), "--out", str(out),
          "--batch-size", "2", *extra])
    return json.loads((out / "results.json").read_text())


def _lm_eval_directly(folder: Path, tasks_dir: Path) -> dict:
    """The independent reference: lm-eval's own HF loader on the folder (the model code it ships)."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32,trust_remote_code=True",
        device="cpu",
        tasks=TASKS.split(","),
        batch_size=2,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=False,
    )


def _metrics(results: dict) -> dict:
    values = metric_values(results)
    assert {task for task, _, _ in values} == {"tiny_mc", "tiny_ppl"} and len(values) == 5, values
    return values


def test_eval_of_an_export_equals_lm_eval_run_directly(exported, tasks_dir, tmp_path, capsys):
    results = _pesc_eval(exported, tasks_dir, tmp_path / "out")
    printed = capsys.readouterr().out
    reference = _lm_eval_directly(exported, tasks_dir)
    # The same float32 maths on the same weights and batches: equal (pesc's modeling code is what the folder ships).
    assert _metrics(results) == _metrics(reference)
    assert results["n-samples"]["tiny_mc"]["effective"] == len(MC_DOCS)
    assert results["pesc"]["kind"] == "model folder" and results["pesc"]["model"] == str(exported)
    table = (tmp_path / "out" / "results.md").read_text()
    assert table in printed
    # each score beside its standard error and n; lm-eval's "N/A" stderr (a perplexity's) leaves the value alone
    tiny_mc = results["results"]["tiny_mc"]
    assert isinstance(tiny_mc["acc_stderr,none"], float)
    assert results["results"]["tiny_ppl"]["word_perplexity_stderr,none"] == "N/A"
    assert f"| tiny_mc | 0 | 6 | acc | none | {tiny_mc['acc,none']:.4f} ± {tiny_mc['acc_stderr,none']:.4f} |" in table
    ppl = results["results"]["tiny_ppl"]["word_perplexity,none"]
    assert f"| tiny_ppl | 0 | 2 | word_perplexity | none | {ppl:.4f} |" in table.splitlines()


def test_eval_of_a_run_equals_its_float32_export(trained_run, exported, tiny_llama_dir, tasks_dir, tmp_path):
    run_results = _metrics(_pesc_eval(trained_run, tasks_dir, tmp_path / "run"))
    export_results = _metrics(_pesc_eval(exported, tasks_dir, tmp_path / "export"))
    dense_results = _metrics(_pesc_eval(tiny_llama_dir, tasks_dir, tmp_path / "dense"))
    # The run is evaluated with its LoRA unmerged, the export merged: float32 rounding of W + BA, ~1e-7 relative.
    assert run_results == {key: pytest.approx(value, rel=1e-5) for key, value in export_results.items()}
    ppl = ("tiny_ppl", "word_perplexity", "none")
    assert abs(run_results[ppl] - dense_results[ppl]) > 1e-3 * dense_results[ppl]  # LoRA + experts do count


def test_compare_prints_one_side_by_side_table(exported, tiny_llama_dir, tasks_dir, tmp_path, capsys):
    results = _pesc_eval(exported, tasks_dir, tmp_path / "out", "--compare", str(tiny_llama_dir))
    printed = capsys.readouterr().out
    baseline = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert baseline["pesc"]["model"] == str(tiny_llama_dir)
    mine, theirs = metric_values(results), metric_values(baseline)
    ppl = ("tiny_ppl", "word_perplexity", "none")
    row = next(line for line in printed.splitlines() if line.startswith("| tiny_ppl | 0 | 2 | word_perplexity |"))
    # a perplexity has no stderr ("N/A"): the bare values, and no verdict on the difference
    assert row.split("|")[6:10] == [f" {theirs[ppl]:.4f} ", f" {mine[ppl]:.4f} ", f" {mine[ppl] - theirs[ppl]:+.4f} ",
                                    " — "]
    header = f"| Task | n-shot | n | Metric | Filter | {tiny_llama_dir.name} | {exported.name} | Δ | within stderr |"
    assert header in printed.splitlines()
    assert sum(line.startswith("| tiny_") for line in printed.splitlines()) == len(mine) == 5
    assert (tmp_path / "out" / "results.md").read_text() in printed


def _lm_eval_like(scores: dict[str, tuple[float, float | str]], n: int) -> dict:
    """A results dict shaped as lm-eval's: one task "t", {metric: (value, stderr)} under the "none" filter."""
    entries = {"alias": "t"}
    for metric, (value, stderr) in scores.items():
        entries.update({f"{metric},none": value, f"{metric}_stderr,none": stderr})
    return {"results": {"t": entries}, "n-shot": {"t": 5}, "n-samples": {"t": {"original": 100, "effective": n}}}


def test_the_table_shows_n_and_each_scores_stderr():
    """n is lm-eval's "effective" count (what --limit left), the stderr sits beside its score, "N/A" leaves it out."""
    table = results_table(_lm_eval_like({"acc": (0.5, 0.14433756729740643), "word_perplexity": (12.5, "N/A")}, 12))
    assert table.splitlines() == [
        "| Task | n-shot | n | Metric | Filter | value |",
        "|---|--:|--:|---|---|--:|",
        "| t | 5 | 12 | acc | none | 0.5000 ± 0.1443 |",
        "| t | 5 | 12 | word_perplexity | none | 12.5000 |",
    ]


def test_compare_marks_a_difference_within_the_combined_stderr():
    """|Δ| against sqrt(se_a² + se_b²): acc's 0.04 lies within sqrt(0.03² + 0.04²) = 0.05 (no finding),
    acc_norm's 0.2 outside sqrt(0.06² + 0.08²) = 0.1; where a side has no stderr ("N/A"), no verdict."""
    dense = _lm_eval_like({"acc": (0.50, 0.03), "acc_norm": (0.40, 0.06), "ppl": (9.0, "N/A")}, 12)
    moe = _lm_eval_like({"acc": (0.54, 0.04), "acc_norm": (0.60, 0.08), "ppl": (8.0, 0.5)}, 12)
    assert metrics_table([("dense", dense), ("moe", moe)]).splitlines() == [
        "| Task | n-shot | n | Metric | Filter | dense | moe | Δ | within stderr |",
        "|---|--:|--:|---|---|--:|--:|--:|---|",
        "| t | 5 | 12 | acc | none | 0.5000 ± 0.0300 | 0.5400 ± 0.0400 | +0.0400 | yes (±0.0500) |",
        "| t | 5 | 12 | acc_norm | none | 0.4000 ± 0.0600 | 0.6000 ± 0.0800 | +0.2000 | no (±0.1000) |",
        "| t | 5 | 12 | ppl | none | 9.0000 | 8.0000 ± 0.5000 | -1.0000 | — |",
    ]


def test_suites_use_real_lm_eval_tasks_with_the_papers_shots(tasks_dir):
    settings = {name: {spec.task: spec.num_fewshot for spec in specs} for name, specs in SUITES.items()}
    assert settings["camelidae"] == {
        "mmlu": 5, "gsm8k": 5, "minerva_math": 4, "humaneval": 0, "mbpp": 4, "hellaswag": 10, "nq_open": 0,
        "triviaqa": 0,
    }
    assert settings["loramoe-knowledge"] == {"triviaqa": 0, "nq_open": 0, "webqs": 0}
    known = set(harness.task_manager(str(tasks_dir)).all_tasks)
    assert {task for tasks in settings.values() for task in tasks} <= known
    # the code-running tasks of the suite are refused without the opt-in, accepted with it
    with pytest.raises(ValueError, match="humaneval, mbpp run the model's generated code"):
        harness.check_tasks(list(SUITES["camelidae"]), str(tasks_dir), confirm_run_unsafe_code=False)
    harness.check_tasks(list(SUITES["camelidae"]), str(tasks_dir), confirm_run_unsafe_code=True)


def test_a_suite_evaluates_and_reports_every_few_shot_group(exported, tasks_dir, tmp_path, monkeypatch, capsys):
    """A suite whose tasks take different shots runs once per shot count: every run's tasks reach the results,
    each with its own shots, and the table."""
    from pesc.evaluation.run import run_eval

    suite = (SuiteTask("tiny_mc_shots", 2), SuiteTask("tiny_ppl", 0), SuiteTask("tiny_mc", None))
    monkeypatch.setitem(SUITES, "three-groups", suite)
    run_eval(str(exported), tmp_path / "out", suite="three-groups", include_path=str(tasks_dir), batch_size=2)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {task for task, _, _ in metric_values(results)} == {"tiny_mc_shots", "tiny_ppl", "tiny_mc"}
    assert results["n-shot"] == {"tiny_mc_shots": 2, "tiny_ppl": 0, "tiny_mc": 0}  # tiny_mc: its YAML's own 0
    table = (tmp_path / "out" / "results.md").read_text()
    first_column = {line.split("|")[1].strip() for line in table.splitlines()[2:]}
    assert first_column == {"tiny_mc_shots", "tiny_ppl", "tiny_mc"}
    assert table in capsys.readouterr().out


def _fails(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "tiny_mc,no_such_task"], "unknown lm-eval task no_such_task"),
        (["--tasks", "tiny_unsafe"], "pass --confirm-run-unsafe-code"),
        (["--suite", "camelidae", "--num-fewshot", "3"], "--num-fewshot cannot be combined with --suite"),
        (["--tasks", "tiny_mc", "--suite", "camelidae"], "give either --tasks"),
        (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be >= 1"),
        (["--tasks", "tiny_mc", "--compare", "MISSING"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_before_any_weight_loads(args, message, exported, tasks_dir, tmp_path, capsys,
                                                       monkeypatch):
    import pesc.evaluation.run as run

    monkeypatch.setattr(run, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    args = [str(tmp_path / "MISSING") if arg == "MISSING" else arg for arg in args]
    err = _fails(["eval", str(exported), "--include-path", str(tasks_dir), "--out", str(tmp_path / "out"), *args],
                 capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_take_the_results_fails_before_any_weight_loads(exported, tasks_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """Under a regular file no folder can be made, even as root (where a read-only mode does not stop writes):
    the probe write finds it before the evaluation, not write_report after it."""
    import pesc.evaluation.run as run

    monkeypatch.setattr(run, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded despite a bad --out"))
    (tmp_path / "file").write_text("")
    args = ["eval", str(exported), "--tasks", "tiny_mc", "--include-path", str(tasks_dir), "--out"]
    err = _fails([*args, str(tmp_path / "file" / "results" / "out")], capsys)
    assert f"--out {tmp_path / 'file' / 'results' / 'out'}: cannot write the results there" in err
    assert "Not a directory" in err
    err = _fails([*args, str(tmp_path / "file")], capsys)
    assert f"--out {tmp_path / 'file'} is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_model_and_include_path(tmp_path, exported, capsys):
    err = _fails(["eval", str(tmp_path / "nope"), "--tasks", "tiny_mc", "--out", str(tmp_path / "o")], capsys)
    assert "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _fails(["eval", str(tmp_path / "empty"), "--tasks", "tiny_mc", "--out", str(tmp_path / "o")], capsys)
    assert "holds no training checkpoint" in err
    err = _fails(["eval", str(exported), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "x")], capsys)
    assert "--include-path" in err and "is not a folder" in err


def test_a_run_loads_in_4bit_as_trained_only_on_request(trained_run, exported):
    import bitsandbytes as bnb

    from pesc.evaluation.loading import load_eval_model

    def four_bit_layers(eval_model):
        return sum(isinstance(module, bnb.nn.Linear4bit) for module in eval_model.model.modules())

    quantized = load_eval_model(trained_run, load_in_4bit=True)
    assert four_bit_layers(quantized) == 7 * 2 and quantized.description["load_in_4bit"] is True  # 7 linears x 2 layers
    assert four_bit_layers(load_eval_model(trained_run)) == 0
    with pytest.raises(ValueError, match="--load-in-4bit is for training runs"):
        load_eval_model(exported, load_in_4bit=True)


def test_export_puts_eval_results_into_the_model_card(trained_run, tasks_dir, tmp_path, capsys):
    results = _pesc_eval(trained_run, tasks_dir, tmp_path / "eval", "--limit", "3")
    main(["export", str(trained_run), str(tmp_path / "model"), "--eval", str(tmp_path / "eval" / "results.json")])
    card = (tmp_path / "model" / "README.md").read_text()
    section = card[card.index("## Evaluation"):]
    assert f"`pesc eval` of `{trained_run}` (training checkpoint, float32), at most 3 examples per task" in section
    rows = [line for line in section.splitlines() if line.startswith("| tiny_")]
    expected = metric_values(results)
    assert len(rows) == len(expected) == 5
    for (task, metric, filter_name), value in expected.items():
        stderr = results["results"][task][f"{metric}_stderr,{filter_name}"]
        score = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr != "N/A" else "")
        n = {"tiny_mc": 3, "tiny_ppl": len(PPL_DOCS)}[task]  # --limit 3: at most 3 of each task's documents
        assert f"| {task} | 0 | {n} | {metric} | {filter_name} | {score} |" in rows

    (tmp_path / "bad.json").write_text('{"not": "results"}')
    err = _fails(["export", str(trained_run), str(tmp_path / "other"), "--eval", str(tmp_path / "bad.json")], capsys)
    assert "is not a results file of pesc eval" in err and not (tmp_path / "other").exists()
