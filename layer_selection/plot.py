"""The chart of a HALO sweep: per-layer recall drop, general drop and score, the chosen (sparse) layers marked."""

from __future__ import annotations

import os
from pathlib import Path


def plot_scores(
    path: str | os.PathLike,
    recall_drop: list[float],
    general_drop: list[float],
    scores: list[float],
    chosen: list[int],
    *,
    title: str = "HALO layer selection",
) -> Path:
    """Write a PNG with three bar panels over the layers (recall drop, general drop, score); bars of the chosen
    layers are drawn in a second colour and marked with "S" on the score panel."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the selection chart needs matplotlib: pip install matplotlib") from err

    layers = list(range(len(scores)))
    colors = ["tab:red" if i in chosen else "tab:blue" for i in layers]
    # A Figure with its own Agg canvas, not pyplot: no global backend or state, safe in any process.
    figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2.0), 7.0), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(3, 1, sharex=True)
    rows = [(recall_drop, "recall drop\nmax R - R(i)"), (general_drop, "general drop\nmax C - C(i)"),
            (scores, "score s(i)")]
    for axes, (values, label) in zip(panels, rows):
        axes.bar(layers, values, color=colors)
        axes.set_ylabel(label)
        axes.grid(axis="y", alpha=0.3)
    top = max(scores) if scores and max(scores) > 0 else 1.0
    for i in chosen:
        panels[2].annotate("S", (i, scores[i]), xytext=(0, 2), textcoords="offset points", ha="center",
                           va="bottom", color="tab:red", fontweight="bold")
    panels[2].set_ylim(0, top * 1.15)
    panels[2].set_xlabel("layer (red, S: kept as sparse attention)")
    panels[2].set_xticks(layers)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    return path
