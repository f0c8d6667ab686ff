"""Training curves as a picture: `OUTPUT_DIR/curves.png`, redrawn at every save and at the end.

Drawn from the Trainer's own log history (which a resumed run restores from its checkpoint, so the
picture covers the whole run): the language-model loss with the eval loss, every auxiliary loss the
model logs (any `*_loss` key), and the busiest expert's load. `aux_loss` (E·Σf·P) is 1 for a perfectly
balanced router: its panel draws that line and spans at least 1 ± 0.05, so noise does not read as a trend.
A panel is 3.5 inches wide (one printed column), text at least 8 pt. Uses matplotlib's object API with the
Agg canvas, so no display and no global pyplot state are involved.
"""

from pathlib import Path

from transformers import TrainerCallback

from pesc.plot_limits import reference_limits

CURVES_FILE = "curves.png"
_NOT_AUX = {"loss", "eval_loss", "train_loss"}
AUX_HALF_SPAN = 0.05


def curve_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} for every curve drawn, in the order of the panels."""
    keys = ["loss", "eval_loss"]
    keys += sorted({k for entry in log_history for k in entry if k.endswith("_loss") and k not in _NOT_AUX})
    keys.append("expert_load_max")
    series = {}
    for key in keys:
        points = [(entry["step"], float(entry[key])) for entry in log_history if key in entry and "step" in entry]
        if points:
            series[key] = ([step for step, _ in points], [value for _, value in points])
    return series


def plot_training_curves(log_history: list[dict], path: str | Path):
    """Write the curves of `log_history` to `path` (PNG); returns the matplotlib Figure, or None with nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = curve_series(log_history)
    if not series:
        return None
    panels = [[k for k in ("loss", "eval_loss") if k in series]]
    panels += [[k] for k in series if k not in ("loss", "eval_loss")]
    panels = [panel for panel in panels if panel]
    figure = Figure(figsize=(3.5 * len(panels), 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in panel:
            steps, values = series[key]
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if panel == ["expert_load_max"]:
            axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="even load")
            axes.set_title("busiest expert's load (x even share)")
        elif panel == ["aux_loss"]:
            axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="even load")
            axes.set_ylim(*reference_limits(series["aux_loss"][1], 1.0, AUX_HALF_SPAN))
            axes.set_title("aux_loss")
        else:
            axes.set_title(" and ".join(panel))
        axes.set_xlabel("optimizer step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path)
    return figure


class TrainingCurvesCallback(TrainerCallback):
    """Redraws OUTPUT_DIR/curves.png on the main process at each checkpoint and when training ends."""

    def _draw(self, args, state):
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            plot_training_curves(state.log_history, Path(args.output_dir) / CURVES_FILE)

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
