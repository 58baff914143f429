"""The end-of-run report: per-domain scores as Markdown and as plots a person can read.

Normalized score per domain, as in the MOPD paper: (student − start) / (teacher − start),
so the starting student is 0 and its domain teacher is 1.
"""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn (the
    training loop itself never needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def normalized_scores(
    start: dict[str, float], teacher: dict[str, float], final: dict[str, float]
) -> dict[str, float]:
    """(final − start) / (teacher − start) per domain (nan where the teacher is no better)."""
    out = {}
    for d in start:
        gap = teacher[d] - start[d]
        out[d] = (final[d] - start[d]) / gap if gap > 1e-9 else float("nan")
    return out


def plot_domain_scores(scores: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars: one group per domain, one bar per row of `scores` (label -> domain -> acc)."""
    domains = list(next(iter(scores.values())))
    width = 0.8 / len(scores)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(domains), 3.6))
    for i, (label, by_domain) in enumerate(scores.items()):
        xs = [j + i * width for j in range(len(domains))]
        bars = ax.bar(xs, [by_domain[d] for d in domains], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(scores) - 1) / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MISMATCH_KEYS = ["routing/agreement", "routing/replayed", "icepop/gated", "logprob_gap"]
"""Engine/trainer mismatch per step: routes agreeing before replay, routes replayed, tokens
IcePop gated, mean |log π_θ − log μ_θ| on trained tokens."""


def plot_history(history_file: Path, keys: list[str], path: Path, evals: bool = True) -> None:
    """Curves of the named scalars (a name ending in "/": every scalar under it; and every
    held-out `eval/` score) against the step; nothing when none was logged."""
    rows = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
    logged = sorted({k for r in rows for k in r})
    keys = [k for key in keys + (["eval/"] if evals else [])
            for k in ([k for k in logged if k.startswith(key)] if key.endswith("/")
                      else [key] if key in logged else [])]
    if not keys:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker=".", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    run_dir: Path,
    *,
    title: str,
    scores: dict[str, dict[str, float]],
    normalized: dict[str, float] | None,
    facts: dict[str, str],
) -> Path:
    """Write report.md + domain_scores.png (+ training_curves.png) into `run_dir`."""
    run_dir = Path(run_dir)
    plot_domain_scores(scores, run_dir / "domain_scores.png", title)
    history = run_dir / "history.jsonl"
    if history.exists():
        plot_history(history, ["loss", "kl/mean", "reward/mean"], run_dir / "training_curves.png")
        plot_history(history, MISMATCH_KEYS, run_dir / "engine_mismatch.png", evals=False)
        plot_history(history, ["agent/"], run_dir / "agent_episodes.png", evals=False)
    domains = list(next(iter(scores.values())))
    lines = [f"# {title}", "", "| | " + " | ".join(domains) + " |",
             "|---|" + "---:|" * len(domains)]
    for label, by_domain in scores.items():
        lines.append(f"| {label} | " + " | ".join(f"{by_domain[d]:.3f}" for d in domains) + " |")
    if normalized is not None:
        lines.append("| **normalized** (start 0, teacher 1) | "
                     + " | ".join(f"**{normalized[d]:.3f}**" for d in domains) + " |")
    lines += ["", "![per-domain scores](domain_scores.png)", ""]
    if (run_dir / "training_curves.png").exists():
        lines += ["![training curves](training_curves.png)", ""]
    for name, caption in (("engine_mismatch.png", "engine/trainer mismatch"),
                          ("agent_episodes.png", "multi-turn episodes")):
        if (run_dir / name).exists():
            lines += [f"![{caption}]({name})", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
