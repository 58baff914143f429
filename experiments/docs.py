"""Table documents: per-seed results -> Markdown table in the paper's format, plots.

Consumes `<out>/seed<s>/{reference,<method>}.json` (written by `baselines.table`) and
produces, in the docs folder, `toy_table.md` (the paper's Table 2 layout with mean ± std over
seeds next to the paper's numbers, per-domain normalized scores, cost, the ordering,
samples to reach given scores, the learning-rate search when one ran, and the command and
machine), `toy_curves.png` (normalized dev score vs training samples), `toy_figure.png` (the
paper's figure: MOPD, Mix-RL and off-policy finetuning only) and `toy_bars.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from experiments.curves import mean_curve, plot_curves
from experiments.methods import Budget

LABELS = {
    "mix_rl": "Mix-RL (GRPO, mixed domains)",
    "cascade_rl": "Cascade RL",
    "rft": "Off-policy finetune (RFT)",
    "merge_avg": "Param-Merge (Avg.)",
    "merge_ta": "Param-Merge (Task Arithmetic)",
    "mopd": "**MOPD** (pg, α = 0)",
    "mopd_topk": "MOPD teacher top-k",
    "mopd_full_rkl": "MOPD full-vocab reverse KL",
    "mopd_orm": "MOPD + ORM (α > 0, GRPO groups)",
    "mopd_round2": "MOPD round 2",
}
PAPER = {
    "mix_rl": 0.882,
    "cascade_rl": 0.775,
    "rft": 0.824,
    "merge_avg": 0.328,
    "merge_ta": 0.857,
    "mopd": 0.937,
    "mopd_topk": 0.909,
    "mopd_round2": 0.986,
}
"""Normalized scores of the MOPD paper (Qwen3-30B-A3B, Table 2 and §4.4)."""
ROW_ORDER = [
    "mix_rl",
    "cascade_rl",
    "rft",
    "merge_avg",
    "merge_ta",
    "mopd",
    "mopd_topk",
    "mopd_full_rkl",
    "mopd_orm",
    "mopd_round2",
]
FIGURE = ("mopd", "mix_rl", "rft")
"""The methods of the paper's sample-efficiency figure."""
THRESHOLDS = (0.5, 0.8)
"""Normalized dev scores whose first crossing the sample-efficiency table reports."""


def _stats(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def machine() -> str:
    """CPU model, usable cores, OS, Python and torch versions of this machine."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores usable, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _invocations(out: Path) -> list[str]:
    """One line per invocation of the table command that wrote into `out`."""
    path = out / "invocations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [
        f"  - `{r['command']}` ({r['date']}, {r['minutes']:.1f} min, {r['threads']} torch "
        f"thread(s) per process, load average 1/5/15 min "
        f"{' / '.join(f'{x:.1f}' for x in r['load_start'])} at start, "
        f"{' / '.join(f'{x:.1f}' for x in r['load_end'])} at the end) on {r['machine']}"
        for r in rows
    ]


def _first_crossing(curve: list[tuple[int, float, float]], level: float) -> str:
    return next((f"{x:,}" for x, y, _ in curve if y >= level), "not reached")


def _load(out: Path, seeds: list[int], methods: list[str]):
    refs = {s: json.loads((out / f"seed{s}" / "reference.json").read_text()) for s in seeds}
    results = {
        m: [json.loads((out / f"seed{s}" / f"{m}.json").read_text()) for s in seeds]
        for m in methods
    }
    return refs, results


def _main_table(refs, results, domains, rows) -> list[str]:
    lines = [
        "| Method | " + " | ".join(domains) + " | Normalized (greedy) | "
        "Normalized (sampled) | Paper (Qwen3-30B-A3B) |",
        "|---|" + "---:|" * (len(domains) + 3),
    ]
    base = [_stats([r["base"]["greedy"][d] for r in refs.values()]) for d in domains]
    teach = [_stats([r["teachers"]["greedy"][d] for r in refs.values()]) for d in domains]
    lines.append("| Student (start) | " + " | ".join(base) + " | 0.000 | 0.000 | 0.000 |")
    lines.append("| Domain teacher | " + " | ".join(teach) + " | 1.000 | 1.000 | 1.000 |")
    for m in rows:
        acc = [_stats([r["test"]["greedy"][d] for r in results[m]]) for d in domains]
        norm = [
            _stats([r["normalized"][k]["mean"] for r in results[m]]) for k in ("greedy", "sampled")
        ]
        paper = f"{PAPER[m]:.3f}" if m in PAPER else "—"
        lines.append(f"| {LABELS[m]} | " + " | ".join(acc + norm) + f" | {paper} |")
    return lines


def _domain_table(results, domains, rows) -> list[str]:
    lines = [
        "| Method | " + " | ".join(domains) + " | min | max |",
        "|---|" + "---:|" * (len(domains) + 2),
    ]
    for m in rows:
        per = {
            d: statistics.fmean(r["normalized"]["greedy"][d] for r in results[m]) for d in domains
        }
        cells = [_stats([r["normalized"]["greedy"][d] for r in results[m]]) for d in domains]
        lines.append(
            f"| {LABELS[m]} | "
            + " | ".join(cells)
            + f" | {min(per.values()):.3f} | {max(per.values()):.3f} |"
        )
    return lines


def _cost_table(results, rows, curves) -> list[str]:
    lines = [
        "| Method | training samples | minutes per seed | "
        + " | ".join(f"samples to {t:g} (dev)" for t in THRESHOLDS)
        + " | notes (first seed) |",
        "|---|---:|---:|" + "---:|" * len(THRESHOLDS) + "---|",
    ]
    for m in rows:
        minutes = statistics.fmean(r["seconds"] for r in results[m]) / 60
        reach = [_first_crossing(curves[m], t) if curves.get(m) else "—" for t in THRESHOLDS]
        lines.append(
            f"| {LABELS[m]} | {results[m][0]['samples']:,} | {minutes:.1f} | "
            + " | ".join(reach)
            + f" | {results[m][0]['notes'] or ''} |"
        )
    return lines


def _ordering(results, rows) -> list[str]:
    toy = sorted(
        (m for m in rows),
        key=lambda m: -statistics.fmean(r["normalized"]["greedy"]["mean"] for r in results[m]),
    )
    paper = sorted((m for m in rows if m in PAPER), key=lambda m: -PAPER[m])
    mopd_rank = toy.index("mopd") + 1 if "mopd" in toy else None
    lines = [
        "- Toy (greedy normalized, mean over seeds): "
        + " > ".join(LABELS[m].replace("**", "") for m in toy),
        "- Paper: " + " > ".join(LABELS[m].replace("**", "") for m in paper),
    ]
    if mopd_rank is not None:
        lines.append(f"- MOPD (the paper's default loss) ranks {mopd_rank} of {len(toy)} here.")
    return lines


def _plot_bars(results, rows, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = range(len(rows))
    means = [statistics.fmean(r["normalized"]["greedy"]["mean"] for r in results[m]) for m in rows]
    sds = [
        statistics.stdev([r["normalized"]["greedy"]["mean"] for r in results[m]])
        if len(results[m]) > 1
        else 0.0
        for m in rows
    ]
    ax.bar([x - 0.2 for x in xs], means, 0.4, yerr=sds, capsize=3, label="toy (CPU, mean ± std)")
    ax.bar(
        [x + 0.2 for x in xs],
        [PAPER.get(m, float("nan")) for m in rows],
        0.4,
        label="paper (Qwen3-30B-A3B)",
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(
        list(xs), [LABELS[m].replace("**", "") for m in rows], rotation=35, ha="right", fontsize=7
    )
    ax.set_ylabel("normalized score (test, greedy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(
    out: Path,
    docs: Path,
    seeds: list[int],
    methods: list[str],
    budget: Budget,
) -> Path:
    """Write toy_table.md, toy_curves.png and toy_bars.png into `docs` (see the docstring)."""
    docs.mkdir(parents=True, exist_ok=True)
    refs, results = _load(out, seeds, methods)
    domains = list(next(iter(refs.values()))["base"]["greedy"])
    rows = [m for m in ROW_ORDER if m in methods]
    curves = {m: mean_curve([r["curve"] for r in results[m]]) for m in rows}
    trained = {LABELS[m].replace("**", ""): c for m, c in curves.items() if c}
    levels = {
        LABELS[m].replace("**", ""): statistics.fmean(
            r["normalized"]["greedy"]["mean"] for r in results[m]
        )
        for m in rows
        if not curves[m]
    }
    plot_curves(
        trained,
        levels,
        docs / "toy_curves.png",
        f"Normalized dev score vs training samples (mean ± std over {len(seeds)} seeds)",
        highlight=LABELS["mopd"].replace("**", ""),
    )
    plot_curves(
        {LABELS[m].replace("**", ""): curves[m] for m in FIGURE if curves.get(m)},
        {},
        docs / "toy_figure.png",
        f"MOPD vs Mix-RL vs off-policy finetuning (dev, mean ± std over {len(seeds)} seeds)",
        highlight=LABELS["mopd"].replace("**", ""),
    )
    _plot_bars(results, rows, docs / "toy_bars.png")
    worlds = [json.loads((out / f"world{s}" / "world.json").read_text()) for s in seeds]
    method_minutes = sum(r["seconds"] for rs in results.values() for r in rs) / 60
    build_minutes = sum(w["build_seconds"] for w in worlds) / 60
    search = out / "lr_search.json"
    trials = json.loads(search.read_text())["trials"] if search.is_file() else []
    search_minutes = sum(t.get("seconds", 0.0) for t in trials) / 60
    lines = [
        "# MOPD comparison table at toy scale (CPU)",
        "",
        (
            "Generated by `python -m experiments.table`; the analysis is "
            "in [toy_table_notes.md](toy_table_notes.md)."
        ),
        "",
        (
            "- **Commands** that produced these results (in order; a later invocation reuses the "
            "results whose world and budget are unchanged):"
        ),
        *_invocations(out),
        (
            f"- **Time**: methods {method_minutes:.1f} min in total, toy worlds "
            f"{build_minutes:.1f} min to build"
            + (f", learning-rate search {search_minutes:.1f} min" if trials else "")
        ),
        (
            f"- **Seeds**: {', '.join(map(str, seeds))}; each seed builds its own toy world (data, "
            "base student, teachers) and seeds its runs"
        ),
        (
            f"- **Budget** (every on-policy method): {budget.steps} steps × "
            f"{budget.samples_per_step} rollout samples; GRPO groups of {budget.group_size}; "
            f"learning rates {budget.lr}; top-k k = {budget.topk}; α = {budget.orm_coef} for "
            f"MOPD + ORM; RFT {budget.rft_samples_per_prompt} teacher samples per prompt"
        ),
        f"- **Budget, full**: `{json.dumps(dataclasses.asdict(budget))}`",
        "",
        "## Table (the paper's format)",
        "",
        (
            "Per-domain cells: greedy accuracy on the held-out test prompts. Normalized: "
            "(method − start) / (teacher − start) per domain, then the mean over domains; sampled "
            f"= temperature 1, averaged over {budget.eval_draws} draws. Mean ± std over seeds."
        ),
        "",
        *_main_table(refs, results, domains, rows),
        "",
        "## Normalized score per domain (greedy)",
        "",
        *_domain_table(results, domains, rows),
        "",
        "## Ordering",
        "",
        *_ordering(results, rows),
        "",
        "## Cost and sample efficiency",
        "",
        *_cost_table(results, rows, curves),
        "",
        "![normalized dev score vs training samples](toy_curves.png)",
        "",
        "![the paper's figure: MOPD, Mix-RL, off-policy finetuning](toy_figure.png)",
        "",
        "![normalized test score, toy vs paper](toy_bars.png)",
        "",
    ]
    if trials:
        found = json.loads(search.read_text())
        lines += [
            "## Learning-rate search (seed 0's world, final dev score)",
            "",
            "| family | method | lr | dev normalized | minutes |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {t['family']} | {t['method']} | {t['lr']:g} | {t['dev']:.3f} | "
            f"{t.get('seconds', float('nan')) / 60:.1f} |"
            for t in trials
        ]
        lines += ["", f"Chosen: {found['chosen']}", ""]
    lines += [
        "## Worlds",
        "",
        (
            "| seed | base (test, greedy) | teachers on own domain | teachers off their domain "
            "| teacher recipe | build min |"
        ),
        "|---|---|---|---|---|---:|",
    ]
    for s, w in zip(seeds, worlds):
        base = " ".join(f"{d} {a:.2f}" for d, a in w["models"]["base"]["test"].items())
        own = " ".join(f"{d} {w['models'][d]['test'][d]:.2f}" for d in w["domains"])
        off = "; ".join(
            f"{t}: " + " ".join(f"{d} {a:.2f}" for d, a in w["models"][t]["test"].items() if d != t)
            for t in w["domains"]
        )
        recipe = w.get("settings", {}).get("teacher_recipe", "sft")
        lines.append(
            f"| {s} | {base} | {own} | {off} | {recipe} | {w['build_seconds'] / 60:.1f} |"
        )
    path = docs / "toy_table.md"
    path.write_text("\n".join(lines) + "\n")
    return path
