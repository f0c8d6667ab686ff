"""The experiment's report: finished units gathered into results.json, rendered as Markdown tables (results.md
and the block in docs/experiments.md) and drawn as one figure (results.png) that shows every seed.

Everything rendered comes from results.json alone, so the docs block can be checked against it
(tests/test_experiment_forgetting.py): the numbers in the docs are never typed by hand.
"""

import json
import math
import os
from pathlib import Path

from pesc.errors import PescError

from forgetting.configs import BY_NAME, CONFIGS

BEGIN = "<!-- forgetting:begin (written by `python examples/forgetting/run.py --update-docs`; do not edit) -->"
END = "<!-- forgetting:end -->"
FIGURE = "results.png"

# (metric key, column title, digits) of the two tables; the base model's row comes first in each
LORAMOE_COLUMNS = [
    ("heldout_knowledge", "held-out knowledge acc", 3),
    ("seen_knowledge", "seen knowledge acc", 3),
    ("downstream", "downstream acc", 3),
    ("share_knowledge_rows", "knowledge-group share, knowledge rows", 3),
    ("share_task_rows", "knowledge-group share, task rows", 3),
    ("share_gap", "knowledge − task", 3),
]
PESC_COLUMNS = [
    ("task_loss", "held-out task loss", 3),
    ("downstream", "downstream acc", 3),
    ("heldout_knowledge", "held-out knowledge acc", 3),
    ("final_load_max", "busiest expert × E, last step", 2),
]


def write_text(path: Path, text: str) -> None:
    """Write beside and rename: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def unit_metrics(result: dict) -> dict:
    """The numbers of one finished unit that the tables and the figure use."""
    metrics = {key: result[key] for key in ("heldout_knowledge", "seen_knowledge", "downstream", "task_loss")}
    shares = result.get("group_shares")
    if shares:
        metrics.update(share_knowledge_rows=shares["knowledge"], share_task_rows=shares["task"],
                       share_gap=shares["knowledge"] - shares["task"])
    if result.get("expert_load"):
        metrics["final_load_max"] = result["expert_load"][-1][1]
    return metrics


def gather(work: Path, stamp: dict) -> dict:
    """results.json's content: the stamp, the settings, the base model's numbers and, per configuration, the
    finished seeds with their metrics and expert load curves."""
    settings = json.loads((work / "experiment.json").read_text()) if (work / "experiment.json").is_file() else None
    base_file = work / "data" / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    configs = {}
    for conf in CONFIGS:
        seeds = []
        for path in sorted((work / "units" / conf.name).glob("seed*/results.json")):
            result = json.loads(path.read_text())
            seeds.append({"seed": result["seed"], "trainable": result["trainable"], "metrics": unit_metrics(result),
                          "expert_load": result.get("expert_load", [])})
        if seeds:
            configs[conf.name] = {"knob": base["plan"][conf.name]["knob"] if base else None,
                                  "seeds": sorted(seeds, key=lambda s: s["seed"])}
    return {"stamp": stamp, "settings": settings, "base": base and {k: base[k] for k in ("metrics", "data", "plan")},
            "configs": configs}


def _cell(values: list[float], digits: int) -> str:
    """mean ± sample standard deviation over the seeds (the mean alone for one seed; a dash for none)."""
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _label(name: str, knob) -> str:
    conf = BY_NAME[name]
    return f"{conf.label} ({conf.knob} {knob})" if conf.knob and knob is not None else conf.label


def _table(results: dict, block: str, columns: list) -> str:
    base = results["base"]
    head = ["configuration", "trainable params", "seeds", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        cells = [_cell([base["metrics"][key]] if key in base["metrics"] else [], digits) for key, _, digits in columns]
        lines.append("| " + " | ".join(["base model, untrained", "0", "—", *cells]) + " |")
    for conf in CONFIGS:
        entry = results["configs"].get(conf.name)
        if conf.block != block or entry is None:
            continue
        seeds = entry["seeds"]
        counts = sorted({s["trainable"] for s in seeds})
        cells = [_cell([s["metrics"][key] for s in seeds if key in s["metrics"]], digits) for key, _, digits in columns]
        lines.append("| " + " | ".join([_label(conf.name, entry["knob"]), " / ".join(f"{c:,}" for c in counts),
                                        ", ".join(str(s["seed"]) for s in seeds), *cells]) + " |")
    return "\n".join(lines)


def _setup_line(results: dict) -> str:
    settings, base = results["settings"], results["base"]
    data = base["data"]
    return (
        f"{settings['model_label']} (float32), "
        f"{settings['steps']} steps × {settings['micro_batch_size']} rows "
        f"(packed, ≤ {settings['sequence_len']} tokens), "
        f"lr {settings['learning_rate']:g}; training mix of {data['train_rows']} rows, "
        f"{data['knowledge_rows']} of them knowledge rows; {data['facts_kept']} of {data['facts_probed']} facts "
        f"answered by the base model ({data['facts_seen']} seen in training, {data['facts_heldout']} held out); "
        f"{data['task_questions']} held-out downstream questions."
    )


def render(results: dict, figure: str | None = None) -> str:
    """The Markdown of the report (results.md, and the docs block between the markers)."""
    stamp = results["stamp"]
    lines = [f"Generated by `{stamp['command']}` at commit `{stamp['commit']}`.", ""]
    if not results["configs"]:
        lines.append("**Not yet run**: no (configuration, seed) unit has finished. Run "
                     "`python examples/forgetting/run.py`, then "
                     "`python examples/forgetting/run.py --report-only --update-docs`.")
        return "\n".join(lines) + "\n"
    lines += [_setup_line(results), "",
              ("**LoRAMoE's claim**: knowledge kept after fine-tuning, and where the routers send each kind of row "
               "(share of router mass on the knowledge experts 0–2, mean over sites and layers)."), "",
              _table(results, "loramoe", LORAMOE_COLUMNS), "",
              "**PESC's claim**: instruction tuning at matched trainable parameters.", "",
              _table(results, "pesc", PESC_COLUMNS), "",
              "Mean ± standard deviation over the seeds listed."]
    if figure:
        lines += ["", f"![every seed of every configuration]({figure})"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Six panels, a dot per seed: LoRAMoE's block (held-out knowledge, downstream, knowledge-group share of
    knowledge vs task rows), PESC's block (held-out task loss, downstream, and the busiest expert over training)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    base = results["base"]["metrics"]
    blocks = {block: [c for c in CONFIGS if c.block == block and c.name in results["configs"]]
              for block in ("loramoe", "pesc")}

    def dots(ax, block, key, title, base_value=True):
        confs = blocks[block]
        for x, conf in enumerate(confs):
            values = [s["metrics"][key] for s in results["configs"][conf.name]["seeds"] if key in s["metrics"]]
            ax.scatter([x] * len(values), values, color=f"C{x}", zorder=3)
            if values:
                ax.hlines(sum(values) / len(values), x - 0.25, x + 0.25, color=f"C{x}")
        if base_value and key in base:
            ax.axhline(base[key], color="grey", linestyle="--", label="base model")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(confs)), [c.label for c in confs], rotation=20, ha="right", fontsize=8)
        ax.set_title(title)

    dots(axes[0, 0], "loramoe", "heldout_knowledge", "held-out knowledge accuracy")
    dots(axes[0, 1], "loramoe", "downstream", "downstream accuracy")
    ax = axes[0, 2]
    for x, conf in enumerate(blocks["loramoe"]):  # the same x and colour as the panels beside it
        for s in results["configs"][conf.name]["seeds"]:
            m = s["metrics"]
            if "share_knowledge_rows" in m:
                ax.plot([x - 0.15, x + 0.15], [m["share_knowledge_rows"], m["share_task_rows"]], color=f"C{x}",
                        marker="o")
    ax.axhline(0.5, color="grey", linestyle=":", label="even (3 of 6 experts)")
    ax.set_xticks(range(len(blocks["loramoe"])), [c.label for c in blocks["loramoe"]], rotation=20, ha="right",
                  fontsize=8)
    ax.set_title("router mass on the knowledge experts:\nknowledge rows (left), task rows (right)")
    ax.legend(loc="best", fontsize=8)
    # the base model's loss (about 4) as a line would flatten the trained models' differences into one row
    dots(axes[1, 0], "pesc", "task_loss", f"held-out task loss (base model: {base['task_loss']:.2f})",
         base_value=False)
    dots(axes[1, 1], "pesc", "downstream", "downstream accuracy")
    ax = axes[1, 2]
    for x, conf in enumerate(blocks["pesc"]):
        for i, s in enumerate(results["configs"][conf.name]["seeds"]):
            if s["expert_load"]:
                steps, loads = zip(*s["expert_load"])
                ax.plot(steps, loads, color=f"C{x}", alpha=0.8, label=conf.label if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_title("busiest expert × E (1 = even), mean over sites")
    ax.legend(loc="best", fontsize=8)
    figure.savefig(path, format="png")


def replace_block(document: str, block: str, where: str) -> str:
    """The document with the text between the markers replaced by `block`."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise PescError(f"{where} has no {BEGIN} ... {END} block to regenerate")
    return document[: start + len(BEGIN)] + "\n" + block + document[end:]


def read_block(document: str) -> str:
    """The text between the markers."""
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return document[start:end].removeprefix("\n")
