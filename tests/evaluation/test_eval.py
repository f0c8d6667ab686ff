"""`pesc eval`: the same numbers as lm-eval run directly, on an export and on a training run; suites; bad input.

The tasks are lm-eval YAML tasks over local JSONL files (no network): a multiple-choice task (accuracy) and a
rolling log-likelihood task whose perplexities are a continuous fingerprint of the model's logits.
"""

import json
import shlex
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from pesc.cli import main
from pesc.errors import PescError
from pesc.evaluation import harness, task_data
from pesc.evaluation.report import metric_values, metrics_table, results_table
from pesc.evaluation.suites import SUITES, SuiteTask

lm_eval = pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[2]

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
    (folder / "tiny_missing.yaml").write_text(_task_yaml("tiny_missing", folder / "missing.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
    )))
    (folder / "tiny_load_args.yaml").write_text(_task_yaml("tiny_load_args", folder / "ppl.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
    )).replace("dataset_kwargs:\n", "dataset_kwargs:\n  verification_mode: no_checks\n  streaming: false\n"
               "  trust_remote_code: true\n"))
    # groups: their tasks' data and code-running are checked, not the group's own config alone
    (folder / "tiny_group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_missing\n")
    (folder / "tiny_unsafe_group.yaml").write_text("group: tiny_unsafe_group\ntask:\n  - tiny_ppl\n  - tiny_unsafe\n")
    (folder / "tiny_bad_group.yaml").write_text("group: tiny_bad_group\ntask:\n  - tiny_mc\n  - dataset_path: json\n")
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


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """Offline mode on and an empty datasets cache, whatever this machine's own cache holds."""
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_suites_use_real_lm_eval_tasks_with_the_papers_shots(tasks_dir, offline_empty_cache):
    settings = {name: {spec.task: spec.num_fewshot for spec in specs} for name, specs in SUITES.items()}
    assert settings["camelidae"] == {
        "mmlu": 5, "gsm8k": 5, "minerva_math": 4, "humaneval": 0, "mbpp": 4, "hellaswag": 10, "nq_open": 0,
        "triviaqa": 0,
    }
    assert settings["loramoe-knowledge"] == {"triviaqa": 0, "nq_open": 0, "webqs": 0}
    known = set(harness.task_manager(str(tasks_dir)).all_tasks)
    assert {task for tasks in settings.values() for task in tasks} <= known
    # the code-running tasks of the suite are refused without the opt-in; with it, offline with nothing cached,
    # every task's Hub data is found missing (mmlu through the first of its tasks)
    with pytest.raises(ValueError, match="humaneval, mbpp run the model's generated code"):
        harness.check_tasks(list(SUITES["camelidae"]), str(tasks_dir), confirm_run_unsafe_code=False)
    with pytest.raises(PescError) as error:
        harness.check_tasks(list(SUITES["camelidae"]), str(tasks_dir), confirm_run_unsafe_code=True)
    assert str(error.value).startswith("task mmlu (its task mmlu_")
    assert "needs the dataset cais/mmlu (" in str(error.value)
    assert "; also unreachable: gsm8k, minerva_math, humaneval, mbpp, hellaswag, nq_open, triviaqa;" in str(error.value)


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
        (["--tasks", "tiny_mc,no_such_task"], "unknown lm-eval task no_such_task:"),
        (["--tasks", "tiny_mcc"], "unknown lm-eval task tiny_mcc (did you mean 'tiny_mc'?)"),
        (["--tasks", "tiny_unsafe"], "pass --confirm-run-unsafe-code"),
        (["--tasks", "tiny_unsafe_group"], "tiny_unsafe_group run the model's generated code"),
        (["--tasks", "tiny_mc,tiny_missing"], "task tiny_missing cannot read its data, json {'test': '"),
        (["--tasks", "tiny_group"], "task tiny_group (its task tiny_missing) cannot read its data"),
        (["--tasks", "tiny_bad_group"], "group tiny_bad_group: an entry of its task list has neither 'task' nor"),
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


def test_a_hub_task_offline_and_not_cached_fails_in_one_line_before_any_weight_loads(
        exported, tasks_dir, tmp_path, capsys, monkeypatch, offline_empty_cache):
    """The line names the task and its dataset, the other unreachable ones, and the way to a local task; it is
    the line docs/eval.md shows."""
    from pesc.evaluation import run

    monkeypatch.setattr(run, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded for a task without data"))
    started = time.monotonic()
    err = _fails(["eval", str(exported), "--tasks", "tiny_mc,arc_easy,hellaswag", "--include-path", str(tasks_dir),
                  "--out", str(tmp_path / "out")], capsys)
    assert err == (
        f"Error: task arc_easy needs the dataset allenai/ai2_arc (ARC-Easy), which is not in the local datasets "
        f"cache ({offline_empty_cache}) and offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE); also "
        f"unreachable: hellaswag; {task_data.LOCAL_TASK_HINT}"
    )
    assert time.monotonic() - started < 60  # the task index (~10 s), then no network wait at all
    assert not (tmp_path / "out").exists()
    docs = (ROOT / "docs" / "eval.md").read_text()
    assert err.replace(str(offline_empty_cache), "/home/you/.cache/huggingface/datasets") in docs.splitlines()


def _cache_as_hub_dataset(cache: Path, repo: str, config: str, data_file: Path) -> None:
    """Put a JSONL file into the datasets cache as `datasets` leaves a Hub dataset it once downloaded:
    CACHE/namespace___name/CONFIG/VERSION/HASH/ with name-SPLIT.arrow and a dataset_info.json naming CONFIG."""
    builder = datasets.load_dataset_builder("json", data_files={"test": str(data_file)}, cache_dir=str(cache))
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    namespace, name = repo.split("/")
    target = cache / f"{namespace}___{name}" / config / prepared.parts[-2] / prepared.parts[-1]
    target.mkdir(parents=True)
    for path in prepared.iterdir():
        (target / path.name.replace("json-", f"{name}-")).write_bytes(path.read_bytes())
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config}))


def test_offline_a_cached_hub_dataset_passes_the_check_and_loads(tasks_dir, tmp_path, offline_empty_cache):
    """The check finds what `datasets` loads: ARC-Easy cached passes, ARC-Challenge (the same dataset, another
    config, not cached) does not."""
    rows = tmp_path / "arc.jsonl"
    rows.write_text(json.dumps({"question": "?", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}) + "\n")
    _cache_as_hub_dataset(offline_empty_cache, "allenai/ai2_arc", "ARC-Easy", rows)
    harness.check_tasks([SuiteTask("arc_easy", 0)], str(tasks_dir), confirm_run_unsafe_code=False)
    assert datasets.load_dataset("allenai/ai2_arc", "ARC-Easy")["test"].num_rows == 1
    with pytest.raises(PescError, match=r"^task arc_challenge needs the dataset allenai/ai2_arc \(ARC-Challenge\)"):
        harness.check_tasks([SuiteTask("arc_challenge", 0)], str(tasks_dir), confirm_run_unsafe_code=False)


@pytest.fixture
def no_proxy(monkeypatch):
    """Requests to 127.0.0.1 go there, not to a proxy the environment names."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)


def test_online_the_hubs_answer_decides(tasks_dir, tmp_path, monkeypatch, no_proxy):
    """Offline mode off: an answering Hub leaves the download to lm-eval; a silent one means the cache must
    hold the data, looked up in offline mode (not one request to the Hub: no retries), which ends with the
    check. The "Hub" here is a local server that records every request."""
    from huggingface_hub import constants

    requests = []

    class Recording(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub)
    monkeypatch.setattr(constants, "ENDPOINT", hub)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(task_data, "hub_answers", lambda endpoint: True)
        harness.check_tasks([SuiteTask("arc_easy", 0)], str(tasks_dir), confirm_run_unsafe_code=False)
        monkeypatch.setattr(task_data, "hub_answers", lambda endpoint: False)
        unanswered = rf"not in the local datasets cache .* and the Hub \({hub}\) did not answer within 5 s"
        with pytest.raises(PescError, match=unanswered):
            harness.check_tasks([SuiteTask("arc_easy", 0)], str(tasks_dir), confirm_run_unsafe_code=False)
    finally:
        server.shutdown()
        server.server_close()
    assert requests == []
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


def test_load_dataset_only_arguments_pass_the_check(tasks_dir):
    """dataset_kwargs that lm-eval hands to load_dataset but load_dataset_builder does not take (streaming,
    verification_mode; trust_remote_code, which lm-eval drops for datasets >= 4) are no reason to refuse."""
    harness.check_tasks([SuiteTask("tiny_load_args", 0)], str(tasks_dir), confirm_run_unsafe_code=False)


def test_the_hub_probe_is_one_request_bounded_by_its_timeout(monkeypatch, no_proxy):
    """Any HTTP answer counts (here a 501: the handler has no HEAD); a refused connection does not, nor a
    server that accepts and never answers, after HUB_TIMEOUT_S (not a minute of retries)."""
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    assert task_data.hub_answers(f"http://127.0.0.1:{server.server_port}")
    thread.join()
    server.server_close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert not task_data.hub_answers(f"http://127.0.0.1:{port}")  # nothing listens there now
    monkeypatch.setattr(task_data, "HUB_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts the connection; nobody ever answers
        started = time.monotonic()
        assert not task_data.hub_answers(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert 0.5 <= time.monotonic() - started < 0.5 + 2  # the timeout, plus scheduling slack on a busy machine


LOCAL_TASK_COMMAND = "pesc eval out/pesc-tiny --tasks capitals --include-path examples/eval_local_task"


def test_the_local_task_of_the_docs_runs_as_written(exported, tmp_path, monkeypatch, offline_empty_cache):
    """docs/eval.md shows examples/eval_local_task's files and command verbatim; run from the repository root
    (its data_files path is relative), offline, it passes the data check and is scored on all its questions."""
    example = ROOT / "examples" / "eval_local_task"
    docs = (ROOT / "docs" / "eval.md").read_text()
    for name in ("capitals.yaml", "capitals.jsonl"):
        assert (example / name).read_text() in docs
    assert LOCAL_TASK_COMMAND in docs.splitlines()
    args = [str(exported) if arg == "out/pesc-tiny" else arg for arg in shlex.split(LOCAL_TASK_COMMAND)[1:]]
    monkeypatch.chdir(ROOT)
    main([*args, "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    questions = len((example / "capitals.jsonl").read_text().splitlines())
    assert results["n-samples"]["capitals"]["effective"] == questions == 6
    assert set(metric_values(results)) == {("capitals", "acc", "none"), ("capitals", "acc_norm", "none")}
