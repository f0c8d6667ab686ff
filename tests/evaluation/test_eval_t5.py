"""`pesc eval` and `pesc compare` on T5 (MoV as arXiv 2309.05444 published it): lm-eval's seq2seq backend, the prompt
in the encoder and the answer scored by the decoder, on a converted folder, a training run and a dense baseline.

The tasks are the local capitals task of docs/eval.md (multiple choice: one loglikelihood request per choice) and a
generate_until twin over the same questions (greedy answer, exact match), their data path made absolute.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import processors

from pesc.cli import main
from pesc.convert import ConvertSettings, convert
from pesc.evaluation.harness import harness_model
from pesc.evaluation.loading import load_eval_model
from pesc.evaluation.report import metric_values
from pesc.testing.tiny import build_tiny_t5_tokenizer
from pesc.testing.tiny_t5 import save_tiny_t5

lm_eval = pytest.importorskip("lm_eval")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "eval_local_task"
QUESTIONS = len((EXAMPLE / "capitals.jsonl").read_text().splitlines())
TASKS = "capitals,capitals_gen"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """docs/eval.md's capitals task (its data path absolute, so the tests run from any folder) and a generate_until
    task over the same rows: the greedy answer (up to a newline) against the right capital."""
    folder = tmp_path_factory.mktemp("tasks")
    capitals = yaml.safe_load((EXAMPLE / "capitals.yaml").read_text())
    capitals["dataset_kwargs"]["data_files"]["test"] = str(EXAMPLE / "capitals.jsonl")
    (folder / "capitals.yaml").write_text(yaml.safe_dump(capitals))
    generate = {key: capitals[key] for key in ("dataset_path", "dataset_kwargs", "test_split")}
    # a short prompt and 2 tokens: lm-eval's seq2seq backend lets the decoder run to the prompt's length + max_gen_toks
    generate.update(task="capitals_gen", output_type="generate_until", doc_to_target="{{choices[label]}}",
                    doc_to_text="{{country}}", generation_kwargs={"until": ["\n"], "max_gen_toks": 2, "do_sample": False},
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    (folder / "capitals_gen.yaml").write_text(yaml.safe_dump(generate))
    return folder


def t5_tokenizer():
    """The tiny T5 tokenizer, appending </s> to every text as T5's own tokenizers do (lm-eval's seq2seq backend
    encodes the context with it, the continuation without)."""
    tokenizer = build_tiny_t5_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
    return tokenizer


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
    """{"dense": a tiny T5 v1.1, "mov": its MoV conversion at init (the dense model exactly)}, with the tokenizer."""
    root = tmp_path_factory.mktemp("t5-eval")
    dense = save_tiny_t5(root / "dense", "t5-v1.1")
    t5_tokenizer().save_pretrained(dense)
    convert(dense, root / "mov", ConvertSettings("mov", num_experts=4), echo=lambda _: None)
    t5_tokenizer().save_pretrained(root / "mov")
    return {"dense": dense, "mov": root / "mov"}


def per_sample(path, tasks_dir, tasks=TASKS) -> dict:
    """{task: [each document's responses]}: the loglikelihood of every choice (multiple choice), the generated text
    (generate_until), from lm-eval's logged samples of pesc's model object."""
    from lm_eval.tasks import TaskManager

    lm = harness_model(load_eval_model(path), batch_size=4)
    assert lm.backend == "seq2seq"
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks.split(","), log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return {task: [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def test_a_mov_t5_at_init_scores_every_sample_as_its_dense_t5(t5_models, tasks_dir):
    """At init the converted MoV T5 is the dense T5 exactly (tests/methods/test_t5.py), so every choice's
    loglikelihood and every greedy answer are equal, not close."""
    mov, dense = per_sample(t5_models["mov"], tasks_dir), per_sample(t5_models["dense"], tasks_dir)
    assert [len(mov[task]) for task in TASKS.split(",")] == [QUESTIONS, QUESTIONS]
    assert all(len(choices) == 4 for choices in mov["capitals"])  # one loglikelihood per capital offered
    assert all(answer[0] for answer in mov["capitals_gen"])  # something generated, to be compared
    assert mov == dense


def test_eval_of_a_t5_with_a_dense_baseline_end_to_end(t5_models, tasks_dir, tmp_path, capsys):
    """`pesc eval MOV --compare DENSE`: both sides scored on all the questions of both tasks, in the JSON and in the
    side-by-side table, and (at init) with equal scores; the MoV folder's scores equal lm-eval's own HF loader on
    it (the modeling code the folder ships, AutoModelForSeq2SeqLM, the seq2seq backend lm-eval picks for T5)."""
    from lm_eval.tasks import TaskManager

    out = tmp_path / "out"
    main(["eval", str(t5_models["mov"]), "--tasks", TASKS, "--include-path", str(tasks_dir), "--out", str(out),
          "--compare", str(t5_models["dense"]), "--batch-size", "2"])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    baseline = json.loads((out / "compare.json").read_text())
    for side in (results, baseline):
        assert {task: side["n-samples"][task]["effective"] for task in TASKS.split(",")} == {
            "capitals": QUESTIONS, "capitals_gen": QUESTIONS}
    assert set(metric_values(results)) == {("capitals", "acc", "none"), ("capitals", "acc_norm", "none"),
                                           ("capitals_gen", "exact_match", "none")}
    assert metric_values(results) == metric_values(baseline)
    table = (out / "results.md").read_text()
    assert table in printed
    acc = results["results"]["capitals"]["acc,none"]
    assert any(line.startswith(f"| capitals | 0 | {QUESTIONS} | acc | none | {acc:.4f}") for line in table.splitlines())
    assert any(line.startswith(f"| capitals_gen | 0 | {QUESTIONS} | exact_match | none |") for line in table.splitlines())

    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={t5_models['mov']},dtype=float32,trust_remote_code=True,backend=seq2seq",
        device="cpu",
        tasks=TASKS.split(","), batch_size=2, log_samples=False,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    # the same float32 maths on the same weights, batches and tokens: equal
    assert metric_values(results) == metric_values(reference)


def test_a_t5_training_run_evaluates_as_trained(t5_models, tasks_dir, tmp_path):
    """A 2-step MoV run on the tiny T5 is evaluated from its run folder (base + trained vectors and routers), by
    `pesc eval RUN` too; its choices' loglikelihoods equal those of its float32 export and differ from the dense
    T5's (the training counts)."""
    from pesc.export import export
    from pesc.training import train

    config = {
        "base_model": str(t5_models["dense"]), "method": "mov", "moe": {"num_experts": 4, "seed": 0},
        "datasets": [{"path": "pesc:tiny_t5_sums.jsonl", "type": "input_target"}], "load_in_4bit": False,
        "sequence_len": 16, "target_len": 4, "sample_packing": False, "micro_batch_size": 8, "max_steps": 2,
        "learning_rate": 0.05, "warmup_ratio": 0.0, "bf16": False, "output_dir": str(tmp_path / "run"),
        "save_steps": 2,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    final = train(str(tmp_path / "config.yaml"))
    main(["eval", str(final.parent), "--tasks", "capitals", "--include-path", str(tasks_dir), "--out",
          str(tmp_path / "eval"), "--limit", "2"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["pesc"]["kind"] == "training checkpoint" and results["n-samples"]["capitals"]["effective"] == 2
    exported = export(final.parent, tmp_path / "export", dtype="float32", log=lambda message: None)
    run = per_sample(final.parent, tasks_dir, "capitals")["capitals"]
    merged = per_sample(exported, tasks_dir, "capitals")["capitals"]
    dense = per_sample(t5_models["dense"], tasks_dir, "capitals")["capitals"]
    loglikelihoods = lambda samples: torch.tensor([[float(ll) for ll, _ in doc] for doc in samples])  # noqa: E731
    # the run's vectors and routers are the export's tensors (MoV trains no LoRA to merge): the same float32 maths
    assert torch.equal(loglikelihoods(run), loglikelihoods(merged))
    assert not torch.equal(loglikelihoods(run), loglikelihoods(dense))


def test_compare_of_a_t5_is_zero_at_init_and_refuses_a_decoder(t5_models, tiny_llama_dir, tmp_path, capsys):
    """`pesc compare` on T5: every decoder position, the prompt teacher-forced; 0 against the dense T5 at init, more
    once a MoV vector moves; a T5 against a decoder-only model is one line."""
    from transformers import AutoModelForSeq2SeqLM

    from pesc.methods import register_auto_classes

    main(["compare", str(t5_models["dense"]), str(t5_models["mov"]), "--atol", "0"])
    assert "= 0\n" in capsys.readouterr().out
    register_auto_classes()
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_models["mov"], dtype=torch.float32)
    name, vector = next((name, param) for name, param in model.named_parameters() if "decoder" in name
                        and param.dim() >= 1 and torch.all(param == 1))
    with torch.no_grad():
        vector.mul_(1.5)  # a decoder-side scaling vector of one expert: only teacher-forced decoder positions see it
    model.save_pretrained(tmp_path / "moved")
    t5_tokenizer().save_pretrained(tmp_path / "moved")
    with pytest.raises(SystemExit):
        main(["compare", str(t5_models["dense"]), str(tmp_path / "moved"), "--atol", "1e-6"])
    assert "more than --atol" in capsys.readouterr().err, name
    with pytest.raises(SystemExit):
        main(["compare", str(t5_models["mov"]), str(tiny_llama_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an encoder-decoder and" in err[0] and "is decoder-only" in err[0]
