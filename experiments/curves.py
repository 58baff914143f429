"""Sample-efficiency curves: training histories -> normalized score vs training samples.

A trained method is one or more segments (a `mopd-megatron train` run, an RFT run; Cascade
RL has one per domain). Each segment's `history.jsonl` holds held-out greedy accuracy
`eval/<domain>` every `logging.eval_interval` steps and its `scores.json` the accuracy
before the first step; a point's x is the number of training samples seen so far (earlier
segments' samples + step × samples per step). Points are normalized per domain (start 0,
teacher 1) and averaged over domains; curves of several seeds are averaged point by point.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.evaluation import normalized


@dataclass
class Segment:
    """One training run of a method."""

    run_dir: str
    samples_per_step: int
    """Training samples per step (rollouts per step; SFT sequences per step for RFT)."""
    offset: int = 0
    """Training samples the method had used before this run."""


def segment_points(segment: Segment) -> list[tuple[int, dict[str, float]]]:
    """(samples, {domain: accuracy}) at the run's start and at each evaluation.

    A resumed run appends to its history; the last row of a step wins.
    """
    run = Path(segment.run_dir)
    points = {}
    scores = run / "scores.json"
    if scores.is_file():
        before = json.loads(scores.read_text())["scores"].get("student before")
        if before:
            points[0] = before
    for line in (run / "history.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        accuracy = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")}
        if accuracy:
            points[row["step"]] = accuracy
    return [
        (segment.offset + step * segment.samples_per_step, acc)
        for step, acc in sorted(points.items())
    ]


def normalized_curve(
    segments: list[Segment], start: dict[str, float], teachers: dict[str, float]
) -> list[tuple[int, float]]:
    """(samples, mean normalized score) over a method's segments, in order."""
    curve = {}
    for segment in segments:
        for samples, accuracy in segment_points(segment):
            curve[samples] = normalized(accuracy, start, teachers)["mean"]
    return sorted(curve.items())


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(samples, mean, std) at the sample counts every curve has (std 0 for one curve)."""
    shared = set.intersection(*({x for x, _ in c} for c in curves)) if curves else set()
    out = []
    for x in sorted(shared):
        ys = [dict(c)[x] for c in curves]
        ys = [y for y in ys if math.isfinite(y)]
        if ys:
            out.append((x, statistics.fmean(ys), statistics.stdev(ys) if len(ys) > 1 else 0.0))
    return out


def plot_curves(
    curves: dict[str, list[tuple[int, float, float]]],
    levels: dict[str, float],
    path: str | Path,
    title: str,
    highlight: str | None = None,
) -> None:
    """Mean ± std curves per method, plus horizontal lines for untrained methods.

    Args:
        curves: {label: [(samples, mean, std)]}.
        levels: {label: normalized score} of methods without training (merges).
        path: the PNG to write.
        title: the figure title.
        highlight: the label drawn bold and on top (e.g. the paper's default method).
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.axhline(1.0, color="black", linewidth=1, label="teacher (1.0)")
    ax.axhline(0.0, color="grey", linewidth=1, linestyle=":", label="start (0.0)")
    for label, points in curves.items():
        if not points:
            continue
        xs, ys, sd = zip(*points)
        bold = label == highlight
        (line,) = ax.plot(
            xs, ys, marker=".", linewidth=2.6 if bold else 1.3, label=label, zorder=5 if bold else 2
        )
        low, high = [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    for i, (label, level) in enumerate(levels.items()):
        ax.axhline(level, linestyle="--", linewidth=1, color=f"C{len(curves) + i}", label=label)
    ax.set_xlabel("training samples")
    ax.set_ylabel("normalized score (dev, greedy)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
