"""What the loop logs: per-step scalars from the step's metric sums, and the final report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import Recipe
from .report import normalized_scores, write_report
from .trajectory import Trajectory

TOKEN_MEANS = {"kl/mean": "kl_sum", "entropy": "entropy_sum", "icepop/gated": "icepop_gated",
               "adv/mean": "adv_sum", "nll": "nll_sum", "logprob_gap": "logprob_gap_sum"}
"""Scalar name -> the metric sum it is the per-token mean of."""


def _ratio(num, den) -> float:
    den = float(den)
    return float(num) / den if den else 0.0


def step_scalars(
    metrics: dict, trajectories: list[Trajectory], domains: list[str], times: dict, gap
) -> dict[str, float]:
    """TensorBoard scalars of one step (metric sums -> means; per domain and per phase)."""
    tokens = metrics["tokens"]
    out = {
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics.get("grad_norm", 0.0)),
        "lr": float(metrics.get("lr", 0.0)),
    }
    # Per-token means of the sums the objective reports (fine-tuning reports only some).
    for name, key in TOKEN_MEANS.items():
        if key in metrics:
            out[name] = _ratio(metrics[key], tokens)
    if "adv_sq_sum" in metrics:
        second = _ratio(metrics["adv_sq_sum"], tokens)
        out["adv/std"] = math.sqrt(max(second - out["adv/mean"] ** 2, 0))
    for i, domain in enumerate(domains):
        if float(metrics.get(f"tokens/{i}", 0)):
            out[f"kl/{domain}"] = _ratio(metrics[f"kl_sum/{i}"], metrics[f"tokens/{i}"])
        rewards = [t.reward for t in trajectories if t.domain == domain]
        if rewards:
            out[f"reward/{domain}"] = sum(rewards) / len(rewards)
    out["reward/mean"] = sum(t.reward for t in trajectories) / len(trajectories)
    out.update(episode_scalars(trajectories, domains))
    generated = sum(t.num_generated for t in trajectories)
    out["response_length"] = generated / len(trajectories)
    if any(t.teacher_logprobs for t in trajectories):
        out["teacher/payload_bytes_per_token"] = teacher_payload_bytes(trajectories)
    out.update({f"time/{phase}": seconds for phase, seconds in times.items()})
    out["throughput/samples_per_s"] = len(trajectories) / sum(times.values())
    out["throughput/generated_tokens_per_s"] = generated / max(times["rollout"], 1e-9)
    if gap is not None:
        out["sync/logprob_gap"] = float(gap)
    if metrics.get("routes"):  # routing replay: routes the loss depends on, over all ranks
        out["routing/replayed"] = _ratio(metrics["routes_replayed"], metrics["routes"])
        if metrics["routes_replayed"]:  # agreement is undefined when the engine sent no route
            out["routing/agreement"] = _ratio(metrics["routes_agreed"],
                                              metrics["routes_replayed"])
        out["routing/fallback"] = float(metrics["routes"] - metrics["routes_replayed"])
    return out


def teacher_payload_bytes(trajectories: list[Trajectory]) -> float:
    """Bytes per scored token the teachers' payload takes on its way to the ranks, in the
    batch's form: the sampled token's log-prob (fp32, 4), each top-k entry (int64 id + fp32
    log-prob, 12), the hidden state (H x its dtype's size, 2H for bf16)."""
    total = tokens = 0
    for t in trajectories:
        scored = len(t.token_ids) - t.response_start
        tokens += scored
        total += 4 * scored + 12 * sum(len(row) for row in t.teacher_topk_ids)
        if t.teacher_hidden is not None:
            total += t.teacher_hidden.numel() * t.teacher_hidden.element_size()
    return total / max(tokens, 1)


def episode_scalars(trajectories: list[Trajectory], domains: list[str]) -> dict[str, float]:
    """Multi-turn rollouts: turns, tool calls and tool errors per trajectory of each domain,
    and the share of the tokens after the first sampled one that no loss sees (tool outputs,
    template glue). The per-domain KL (`kl/<domain>`) already counts sampled tokens only."""
    out = {}
    for domain in domains:
        episodes = [t for t in trajectories if t.domain == domain and t.environment]
        for name in ("turns", "tool_calls", "tool_errors") if episodes else ():
            out[f"agent/{name}/{domain}"] = sum(getattr(t, name) for t in episodes) / len(episodes)
    episodes = [t for t in trajectories if t.environment]
    if episodes:
        after = sum(len(t.token_ids) - t.response_start for t in episodes)
        out["agent/masked_share"] = 1.0 - _ratio(sum(t.num_generated for t in episodes), after)
    return out


def write_final_report(
    run_dir: Path, recipe: Recipe, *, objective_name: str, before: dict | None,
    after: dict | None, teacher_scores: dict[str, dict[str, float]], hf_dir: Path | None,
    wall_seconds: float,
) -> Path | None:
    """report.md + plots + scores.json: student before/after and each domain's teacher
    (None where there is nothing to report: no held-out scores, or not the owner rank)."""
    if not after:
        return None
    teacher_row = {d: s for scores in teacher_scores.values() for d, s in scores.items()}
    scores = {"student before": before, "domain teacher": teacher_row, "student after": after}
    scores = {k: v for k, v in scores.items() if v and set(v) >= set(after)}
    normalized = None
    if before and set(teacher_row) >= set(after):
        normalized = normalized_scores(before, teacher_row, after)
    (Path(run_dir) / "scores.json").write_text(
        json.dumps({"scores": scores, "normalized": normalized}, indent=2)
    )
    p = recipe.parallel
    facts = {
        "recipe": recipe.source,
        "student": recipe.model.hf_path,
        "layout": f"tp={p.tp} pp={p.pp} ep={p.ep} (sp={p.use_sequence_parallel})",
        "loss": f"{objective_name} (orm_coef={recipe.algorithm.orm_coef})",
        "steps": f"{recipe.train.steps} x {recipe.data.prompts_per_step} prompts x "
                 f"{recipe.rollout.n_samples_per_prompt} samples",
        "wall time": f"{wall_seconds / 60:.1f} min",
        "final student (HF)": str(hf_dir),
        "TensorBoard": f"tensorboard --logdir {Path(run_dir) / 'tensorboard'}",
    }
    return write_report(run_dir, title="MOPD: held-out accuracy per domain", scores=scores,
                        normalized=normalized, facts=facts)
