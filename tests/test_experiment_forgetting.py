"""Issue #29's experiment (examples/forgetting): the probe's scorer on hand-checked replies, the fact filter and the
training mix, the whole pipeline on a tiny random model (the code path `python examples/forgetting/run.py` runs,
at tiny sizes: so the script cannot rot), resuming and skipping units, and the docs table being the script's."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from pesc.errors import PescError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from forgetting import configs, report  # noqa: E402
from forgetting.experiment import main, select_facts  # noqa: E402
from forgetting.facts import Fact, all_facts  # noqa: E402
from forgetting.scoring import exact_match, normalise  # noqa: E402
from forgetting.tasks import TASKS, eval_items, training_mix  # noqa: E402


@pytest.mark.parametrize(("reply", "answers", "expected"), [
    ("Paris.", ["Paris"], True),
    (" paris", ["Paris"], True),  # case, surrounding space
    ("PARIS!", ["Paris"], True),
    ("Paris\nIt is a city in France.", ["Paris"], True),  # the first line
    ("Paris. It is the capital.", ["Paris"], True),  # the first sentence
    ("Au. It is a metal used in jewellery", ["Au"], True),
    ("J.K. Rowling. She wrote it in 1997.", ["J. K. Rowling"], True),  # initials do not end the sentence
    ("Bogota", ["Bogotá"], True),  # accents dropped
    ("Tim Berners Lee", ["Tim Berners-Lee"], True),  # punctuation is a space
    ("2 5 9", ["2, 5, 9"], True),
    ("3.5", ["3.5"], True),  # a full stop inside a number ends nothing
    ("Shakespeare", ["William Shakespeare", "Shakespeare"], True),  # any accepted answer
    ("Paris, France", ["Paris"], False),  # more than the answer
    ("Paris is the capital of France.", ["Paris"], False),
    ("The capital is Paris.", ["Paris"], False),  # the answer in a later position
    ("Ag. Au.", ["Au"], False),  # a wrong first sentence is wrong
    ("Parisian", ["Paris"], False),
    ("35", ["3.5"], False),
    ("3.5", ["3"], False),  # nor does it end a sentence: "3" is not the reply
    ("", ["Paris"], False),
    ("", [""], False),  # an empty answer accepts nothing
])
def test_exact_match_hand_checked(reply, answers, expected):
    assert exact_match(reply, answers) is expected


def test_normalise():
    assert normalise("  Bogotá!  ") == "bogota"
    assert normalise("J.K.  ROWLING") == "j k rowling"
    assert normalise("Saint-Exupéry's") == "saint exupery s"


def test_every_fact_is_answerable_and_unique():
    facts = all_facts()
    assert len(facts) >= 150
    assert len({fact.key for fact in facts}) == len(facts)
    for fact in facts:
        # the training row's sentence is the stem and the first answer, which the scorer accepts after the stem
        assert fact.row()["messages"][1]["content"] == f"{fact.stem} {fact.answers[0]}."
        assert exact_match(f" {fact.answers[0]}.", list(fact.answers))


def test_select_facts_keeps_what_the_base_model_knows_and_splits_it():
    facts = [Fact(category, f"q{category}{i}", "s", ("a",)) for category in "xy" for i in range(5)]
    correct = {"qx0", "qx1", "qx3", "qy2", "qy4"}
    probed = [{"correct": fact.question in correct} for fact in facts]
    seen, held_out = select_facts(facts, probed, require_correct=True, seed=3)
    assert {f.question for f in seen} | {f.question for f in held_out} == correct
    assert not {f.question for f in seen} & {f.question for f in held_out}
    # half and half within each category, the odd one out held out: x has 3 (2 held out), y has 2 (1 and 1)
    assert sorted(f.category for f in held_out) == ["x", "x", "y"]
    assert select_facts(facts, probed, True, seed=3) == (seen, held_out)  # seeded
    seen_all, held_all = select_facts(facts, probed, require_correct=False, seed=3)
    assert len(seen_all) + len(held_all) == len(facts)
    with pytest.raises(PescError, match="answered 1 of 10 facts correctly: too few"):
        select_facts(facts, [{"correct": fact.question == "qx0"} for fact in facts], True, seed=3)


def test_training_mix_holds_out_the_eval_questions():
    items = eval_items(per_task=10, seed=29)
    assert len(items) == 10 * len(TASKS) and len({i["question"] for i in items}) == len(items)
    knowledge = [fact.row() for fact in all_facts()[:7]]
    held_out = {item["question"] for item in items}
    mix = training_mix(400, knowledge, 0.1, held_out, seed=29)
    assert len(mix) == 400
    assert sum(row["task_type"] == "knowledge" for row in mix) == 40
    assert not held_out & {row["messages"][0]["content"] for row in mix}
    assert training_mix(400, knowledge, 0.1, held_out, seed=29) == mix  # the same seed, the same file


def _docs_with_markers(path: Path) -> Path:
    path.write_text(f"# Experiments\n\nbefore\n\n{report.BEGIN}\nold block\n{report.END}\n\nafter\n")
    return path


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "report"
    docs = _docs_with_markers(tmp_path / "experiments.md")
    argv = ["--tiny", "--work", str(work), "--steps", "2", "--seeds", "0", "--report-dir", str(out),
            "--docs", str(docs), "--update-docs"]
    main(argv)

    results = {conf.name: json.loads((work / "units" / conf.name / "seed0" / "results.json").read_text())
               for conf in configs.CONFIGS}
    for name, result in results.items():
        conf = configs.BY_NAME[name]
        # the count planned from the configs equals what the run saved (experts file + LoRA adapter)
        assert result["trainable"] == result["planned_trainable"], name
        anchor = results[next(c.name for c in configs.CONFIGS if c.anchor and c.block == conf.block)]["trainable"]
        assert abs(result["trainable"] / anchor - 1) <= configs.MATCH_TOLERANCE, name
        for key in ("heldout_knowledge", "seen_knowledge", "downstream"):
            assert 0 <= result[key] <= 1
        assert result["task_loss"] > 0
        assert (result["group_shares"] is not None) == conf.routes, name
    for name in ("loramoe-nolbc", "loramoe-official", "loramoe-towards"):
        assert all(0 < share < 1 for share in results[name]["group_shares"].values())
    assert [step for step, _ in results["pesc"]["expert_load"]] == [1, 2]  # logged every step of 2
    # LoRAMoE with one expert is plain LoRA: its one-row routers spread nothing (busiest expert x 1 = 1)
    assert all(load == 1 for _, load in results["dense"]["expert_load"])

    aggregate = json.loads((out / "results.json").read_text())
    assert (out / "results.png").is_file() and aggregate["stamp"]["figure"]
    assert aggregate["stamp"]["command"] == "python examples/forgetting/run.py " + " ".join(argv)
    markdown = (out / "results.md").read_text()
    for conf in configs.CONFIGS:
        assert conf.label in markdown
    text = docs.read_text()
    assert text.startswith("# Experiments\n\nbefore\n\n") and text.endswith(f"{report.END}\n\nafter\n")
    assert report.read_block(text) == report.render(aggregate, "report/results.png")

    # a rerun skips the finished units, and resumes one whose run has a checkpoint but no final/
    unit = work / "units" / "pesc" / "seed0"
    for name in ("results.json", "answers.json", "run/trainer_state.json"):
        (unit / name).unlink()
    shutil.rmtree(unit / "run" / "final")
    kept = work / "units" / "molora" / "seed0" / "results.json"
    kept_mtime = kept.stat().st_mtime_ns
    capsys.readouterr()
    main(argv)
    printed = capsys.readouterr().out
    assert "== pesc seed 0: resuming" in printed
    assert "== molora seed 0: finished, skipped" in printed and kept.stat().st_mtime_ns == kept_mtime
    assert json.loads((unit / "results.json").read_text())["trainable"] == results["pesc"]["trainable"]

    # a work folder made with other settings is refused, in one line
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:4], "3", *argv[5:]])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (f"Error: {work} was made with steps=2, not 3: give another --work "
                                               "folder, or remove it")


def test_the_docs_table_is_the_scripts():
    """docs/experiments.md's results block is what the script renders from examples/forgetting/results.json."""
    results = json.loads((REPO / "examples" / "forgetting" / "results.json").read_text())
    figure = "../examples/forgetting/results.png" if results["stamp"]["figure"] else None
    docs = (REPO / "docs" / "experiments.md").read_text()
    assert report.read_block(docs) == report.render(results, figure)
    assert results["stamp"]["command"].startswith("python examples/forgetting/run.py")
    assert results["stamp"]["commit"] != "unknown"
