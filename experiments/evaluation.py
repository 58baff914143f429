"""Table evaluation: an HF folder + held-out prompts -> per-domain accuracy and normalized score.

Accuracy is the verifier's mean score per domain with the toy world's evaluator
(`demo.evaluate`): greedy decoding, and sampling at temperature 1 averaged over `draws`
independent draws (the paper's avg@k). The normalized score is the MOPD paper's: per
domain (method − student) / (teacher − student), the starting student at 0 and that
domain's teacher at 1, then the mean over domains.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd_megatron.data import PromptRecord, tokenize_records
from mopd_megatron.demo.evaluate import evaluate
from mopd_megatron.report import normalized_scores


def evaluate_folder(
    path: str | Path,
    records: list[PromptRecord],
    *,
    draws: int = 1,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 512,
) -> dict[str, dict[str, float]]:
    """Greedy and sampled accuracy per domain of the model in an HF folder.

    Args:
        path: the HF folder (weights, config, tokenizer).
        records: held-out prompts with their answers.
        draws: sampled responses per prompt (accuracy averaged over them); 0 = greedy only.
        seed: seed of the first draw (draw i uses seed + i).
        max_new_tokens: response length limit.
        batch_size: prompts decoded together.

    Returns:
        {"greedy": {domain: acc}, "sampled": {domain: acc}} ("sampled" only when draws > 0).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    records = tokenize_records(records, tokenizer)
    kw = {"tokenizer": tokenizer, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    out = {"greedy": evaluate(model, records, greedy=True, **kw)}
    if draws:
        runs = [evaluate(model, records, greedy=False, seed=seed + i, **kw) for i in range(draws)]
        out["sampled"] = {d: sum(r[d] for r in runs) / draws for d in runs[0]}
    return out


def normalized(
    accuracy: dict[str, float], start: dict[str, float], teachers: dict[str, float]
) -> dict[str, float]:
    """Per-domain normalized scores and their mean under the key "mean".

    Args:
        accuracy: the method's accuracy per domain.
        start: the starting student's accuracy per domain (score 0).
        teachers: each domain's teacher on its own domain (score 1).

    Returns:
        {domain: score, ..., "mean": mean over the domains with a finite score}.
    """
    scores = normalized_scores(start, teachers, accuracy)
    finite = [v for v in scores.values() if math.isfinite(v)]
    scores["mean"] = sum(finite) / len(finite) if finite else float("nan")
    return scores
