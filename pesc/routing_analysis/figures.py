"""The PNGs of `pesc routes`, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state).

Sizes are fixed by the numbers drawn (DPI 100), so a picture never depends on the screen; a panel is
3.5 inches wide (one printed column) and no text is under 8 pt (matplotlib's "small" is 8.3):
- `heatmap_<site>.png`: a panel per task, layers (rows) x experts (columns), one colour scale shared
  by every heatmap of the run: (1.5 + 3.5 * tasks) x (2 + 0.3 * layers) inches;
- `balance_<site>.png`: every layer's balance in one picture: a panel per task, layers x experts, each
  expert's load x E (1 = its even share) on a diverging scale centred on 1: same size as the heatmap;
- `balance/<site>_layer<N>.png`: each expert's load in that layer, a bar per task, the even share
  1/E dashed: (6 + 0.3 * experts) x 4 inches;
- `entropy.png`: router entropy per layer, a line per task, ln E (a uniform router) dotted, the axis
  around ln E (at least ln E ± 5%, never from 0 unless the data go there), a panel per site: (0.5 + 3.5 * sites) x 3.5;
- `expert_groups.png`: per task, the share of router mass on each expert group (mean over layers),
  stacked, a panel per site: (0.5 + 3.5 * sites) x 3.5.
An encoder-decoder's entropy and group panels are in a row per part (encoder, cross-attention, decoder):
(0.5 + 3.5 * the most sites of a part) x (3.5 * parts).
"""

import math
from pathlib import Path

from pesc.plot_limits import reference_limits
from pesc.routing_analysis.records import SITE_PARTS, site_part
from pesc.routing_analysis.tally import SiteStats

DPI = 100
ENTROPY_HALF_SPAN = 0.05  # x ln E


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _site_panels(sites: list[str]):
    """(figure, [(site, axes)]): a panel per site, 3.5 x 3.5 inches; an encoder-decoder's in a row per part (encoder,
    cross-attention, decoder, in SITE_PARTS' order), so the stacks never share a row; a decoder-only model's in one."""
    order = [part for _, part in SITE_PARTS] + [None]
    rows: dict = {}
    for site in sorted(sites, key=lambda site: order.index(site_part(site))):
        rows.setdefault(site_part(site), []).append(site)
    columns = max(len(row) for row in rows.values())
    figure = _figure(0.5 + 3.5 * columns, 3.5 * len(rows))
    panels = []
    for axes_row, row in zip(figure.subplots(len(rows), columns, squeeze=False), rows.values()):
        for axes in axes_row[len(row):]:
            axes.set_axis_off()
        panels += list(zip(row, axes_row))
    return figure, panels


def _row_label(site: str, label: str) -> str:
    """The y label of a site's panel, led by its part for an encoder-decoder's site."""
    return label if site_part(site) is None else f"{site_part(site)}: {label}"


def expert_ticks(num_experts: int) -> range:
    """Every expert labelled up to 16, else every n-th (64 labels would overlap)."""
    return range(0, num_experts, max(1, num_experts // 16))


def load_label(stats: SiteStats) -> str:
    return "load (mean router probability)" if stats.top_k is None else f"load (share of top-{stats.top_k} assignments)"


def plot_heatmap(site: str, stats: SiteStats, vmax: float, path: Path) -> None:
    """Experts x layers per task, colour scale 0..vmax (shared by all heatmaps of the run)."""
    tasks = list(stats.load)
    figure = _figure(1.5 + 3.5 * len(tasks), 2 + 0.3 * len(stats.layers))
    panels = figure.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for axes, task in zip(panels, tasks):
        image = axes.imshow(stats.load[task], vmin=0, vmax=vmax, cmap="viridis", aspect="auto", origin="lower",
                            interpolation="nearest")
        axes.set_title(f"{task} ({stats.tokens[task]} tokens)", fontsize="medium")
        axes.set_xlabel("expert")
        axes.set_xticks(expert_ticks(stats.num_experts))
        axes.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers])
    panels[0].set_ylabel("layer")
    figure.colorbar(image, ax=list(panels), label=load_label(stats))
    figure.suptitle(f"expert load: {site}")
    figure.savefig(path)


def balance_ratios(stats: SiteStats) -> dict[str, list[list[float]]]:
    """{task: [layer][expert] load x E}: 1 is the even share, as `max_load_ratio` counts it."""
    return {task: [[value * stats.num_experts for value in row] for row in load] for task, load in stats.load.items()}


def plot_balance(site: str, stats: SiteStats, path: Path) -> None:
    """All layers' balance at once: load x E per task, white at 1 (even), red above, blue below; one scale."""
    from matplotlib.colors import TwoSlopeNorm

    ratios = balance_ratios(stats)
    tasks = list(ratios)
    # 0 is an expert never used; the top is at least 2 (twice its share) so a near-even run stays pale
    top = max(2.0, max(value for rows in ratios.values() for row in rows for value in row))
    figure = _figure(1.5 + 3.5 * len(tasks), 2 + 0.3 * len(stats.layers))
    panels = figure.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for axes, task in zip(panels, tasks):
        image = axes.imshow(ratios[task], norm=TwoSlopeNorm(vcenter=1, vmin=0, vmax=top), cmap="RdBu_r",
                            aspect="auto", origin="lower", interpolation="nearest")
        axes.set_title(f"{task} ({stats.tokens[task]} tokens)", fontsize="medium")
        axes.set_xlabel("expert")
        axes.set_xticks(expert_ticks(stats.num_experts))
        axes.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers])
    panels[0].set_ylabel("layer")
    figure.colorbar(image, ax=list(panels), label="load x E (1 = even share)")
    figure.suptitle(f"load balance: {site}")
    figure.savefig(path)


def plot_layer_balance(site: str, stats: SiteStats, index: int, path: Path) -> None:
    """Each expert's load in layer `stats.layers[index]`, a bar per task, against the even share."""
    tasks = list(stats.load)
    figure = _figure(6 + 0.3 * stats.num_experts, 4)
    axes = figure.subplots()
    width = 0.8 / len(tasks)
    for t, task in enumerate(tasks):
        positions = [e - 0.4 + width * (t + 0.5) for e in range(stats.num_experts)]
        axes.bar(positions, stats.load[task][index], width=width, label=task)
    axes.axhline(1 / stats.num_experts, color="grey", linestyle="--", linewidth=1, label="even share")
    axes.set_xticks(expert_ticks(stats.num_experts))
    axes.set_xlabel("expert")
    axes.set_ylabel(load_label(stats))
    axes.set_title(f"load balance: {site}, layer {stats.layers[index]}")
    axes.legend(fontsize="small")
    figure.savefig(path)


def plot_entropy(stats: dict[str, SiteStats], path: Path) -> None:
    """Router entropy per layer, a line per task, with ln(E) (a uniform router) dotted, the axis around ln(E)."""
    from matplotlib.ticker import MaxNLocator

    figure, panels = _site_panels(list(stats))
    for site, axes in panels:
        site_stats = stats[site]
        for task, values in site_stats.entropy.items():
            axes.plot(site_stats.layers, values, marker="o", markersize=3, label=task)
        uniform = math.log(site_stats.num_experts)
        axes.axhline(uniform, color="grey", linestyle=":", linewidth=1, label=f"uniform (ln {site_stats.num_experts})")
        values = [value for entropy in site_stats.entropy.values() for value in entropy]
        axes.set_ylim(*reference_limits(values, uniform, ENTROPY_HALF_SPAN * uniform))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("layer")
        axes.set_ylabel(_row_label(site, "router entropy (nats)"))
        axes.set_title(f"router entropy: {site}")
        axes.legend(fontsize="small")
    figure.savefig(path)


def plot_group_shares(shares: dict[str, dict[str, dict[str, list[float]]]], path: Path) -> None:
    """Per task, the mean-over-layers share of router mass on each expert group, stacked; a panel per site."""
    figure, panels = _site_panels(list(shares))
    for site, axes in panels:
        per_task = shares[site]
        tasks = list(per_task)
        bottom = [0.0] * len(tasks)
        for group in per_task[tasks[0]]:
            means = [sum(per_task[task][group]) / len(per_task[task][group]) for task in tasks]
            axes.bar(tasks, means, bottom=bottom, label=group)
            bottom = [b + m for b, m in zip(bottom, means)]
        axes.set_ylim(0, 1)
        axes.set_xlabel("task")
        axes.set_ylabel(_row_label(site, "share of router mass (mean over layers)"))
        axes.set_title(f"expert groups: {site}")
        axes.legend(fontsize="small")
    figure.savefig(path)
