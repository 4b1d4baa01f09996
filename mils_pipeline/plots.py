"""The dataset's pictures, drawn with matplotlib: the card's score histogram and the HTML report's
plots. Every function returns the picture's bytes (SVG, or PNG where a raster suits better), so
callers write them wherever the dataset lives.

matplotlib is imported lazily with the Agg backend (no display here, ever); SVG text stays text
(smaller files, selectable in the browser) and SVG ids are salted with a constant, so the same
data gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mils_pipeline.errors import ConfigError

COLOR = "#3b6ea8"
QUARTILES = "#9dbbe0"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a ConfigError naming the extra to install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(
            f"drawing the dataset's plots needs matplotlib: pip install 'mils-pipeline[report]' ({exc})"
        ) from exc
    matplotlib.use("Agg")
    matplotlib.rcParams.update(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "mils",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, fmt: str, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None  # no timestamp: same data, same bytes
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    fig.clf()
    pyplot().close(fig)
    return buffer.getvalue()


def score_histogram(scores: np.ndarray, fmt: str = "svg") -> bytes:
    """Histogram of the best caption's score per item."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    if scores.size:
        ax.hist(scores, bins=min(40, max(5, int(np.sqrt(scores.size)))), color=COLOR)
        ax.axvline(float(np.median(scores)), color="black", linewidth=1, linestyle="--", label="median")
        ax.legend(frameon=False)
    ax.set_xlabel("score of the final caption")
    ax.set_ylabel("items")
    ax.set_title(f"Score of the final caption ({scores.size} items)")
    return _save(fig, fmt)


def best_score_by_round(trajectories: Sequence[Sequence[float]]) -> bytes:
    """Mean and quartiles over items of the best score after each round. An item that stopped
    early keeps its last best score in the later rounds (it can no longer change)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    rounds = max((len(t) for t in trajectories), default=0)
    if rounds:
        grid = np.array([[*t, *[t[-1]] * (rounds - len(t))] for t in trajectories if len(t)], dtype=float)
        x = np.arange(rounds)
        q1, median, q3 = np.quantile(grid, [0.25, 0.5, 0.75], axis=0)
        ax.fill_between(x, q1, q3, color=QUARTILES, alpha=0.6, label="quartiles (25-75%)")
        ax.plot(x, median, color=COLOR, linestyle="--", linewidth=1, label="median")
        ax.plot(x, grid.mean(axis=0), color=COLOR, marker="o", markersize=3, label="mean")
        ax.set_xticks(x)
        ax.legend(frameon=False)
    ax.set_xlabel("round (0 = best seed)")
    ax.set_ylabel("best score so far")
    ax.set_title("Best score by round")
    return _save(fig, "svg")


def counts_bar(counts: Mapping[str, int], title: str, xlabel: str) -> bytes:
    """A bar per category (stop reasons, rounds used), labelled with its count."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    names = list(counts)
    bars = ax.bar(names, [counts[n] for n in names], color=COLOR)
    ax.bar_label(bars)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    ax.set_title(title)
    return _save(fig, "svg")


def cost_per_item(panels: Mapping[str, np.ndarray]) -> bytes:
    """One histogram per cost figure of an item (tokens, encodes, seconds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels.items(), strict=True):
        if values.size:
            ax.hist(values, bins=min(30, max(5, int(np.sqrt(values.size)))), color=COLOR)
            ax.set_title(f"mean {values.mean():.3g}", fontsize=9)
        ax.set_xlabel(label)
    axes[0][0].set_ylabel("items")
    fig.suptitle("Cost per item", y=1.08)
    return _save(fig, "svg")


class TrajectoryCharts:
    """Small line charts of items' trajectories (best score and mean of the kept candidates, round
    by round). One figure is redrawn for every item: a report draws hundreds of them."""

    def __init__(self) -> None:
        plt = pyplot()
        self.fig, self.ax = plt.subplots(figsize=(3.6, 1.9))
        (self.best,) = self.ax.plot([], [], color=COLOR, marker="o", markersize=3, label="best")
        (self.kept,) = self.ax.plot([], [], color="#d9822b", marker="s", markersize=3, label="mean of kept")
        self.ax.set_xlabel("round")
        self.ax.set_ylabel("score")
        self.ax.legend(frameon=False, fontsize=7, loc="lower right")
        self.fig.subplots_adjust(left=0.2, right=0.97, top=0.95, bottom=0.24)

    def draw(self, rounds: Sequence[int], best: Sequence[float], mean_top_k: Sequence[float]) -> bytes:
        self.best.set_data(rounds, best)
        self.kept.set_data(rounds, mean_top_k)
        self.ax.set_xticks(list(rounds))
        self.ax.relim()
        self.ax.autoscale_view()
        buffer = io.BytesIO()
        self.fig.savefig(buffer, format="svg", metadata={"Date": None})
        return buffer.getvalue()

    def close(self) -> None:
        pyplot().close(self.fig)


def spectrogram(samples: np.ndarray, sample_rate: int) -> bytes:
    """A small spectrogram picture of a waveform (PNG: a raster suits it, and stays small)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.4, 1.4))
    if samples.size >= 256:
        ax.specgram(samples, NFFT=256, Fs=sample_rate, noverlap=128, cmap="magma")
    ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return buffer.getvalue()
