"""Evaluation: (HF model, prompt records) -> responses -> verifier accuracy per domain.

Batched decoding with transformers' `generate` and its KV cache: prompts are sorted by
length, left-padded and decoded together until every row has emitted <eos> or
`max_new_tokens` tokens. Greedy by default; sampling draws at temperature 1 with no top-k
or top-p from a private RNG stream. Each response is scored by the record's verifier
(`mopd.rewards.score`) on its text decoded without special tokens.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mopd_megatron.data import PromptRecord, encode_prompt
from mopd_megatron.mopd.rewards import score


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer,
    records: list[PromptRecord],
    greedy: bool = True,
    batch_size: int = 256,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> list[str]:
    """Decode one response per record.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (pad, eos; bos if the model uses one).
        records: prompts; their `prompt_ids` are used when set, else the plain prompt text.
        greedy: argmax decoding; False samples at temperature 1.
        batch_size: prompts decoded together.
        max_new_tokens: response length limit.
        seed: the sampling seed (unused when greedy).

    Returns:
        Response texts without special tokens, in the order of `records`.
    """
    prompts = [r.prompt_ids or encode_prompt(r, tokenizer) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
            sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=not greedy,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                responses[i] = text
    model.train(was_training)
    return responses


def accuracy_by_domain(records: list[PromptRecord], responses: list[str]) -> dict[str, float]:
    """Mean verifier score per domain (domains sorted by name)."""
    totals: dict[str, list[float]] = defaultdict(list)
    for record, response in zip(records, responses, strict=True):
        totals[record.domain].append(score(record, response))
    return {d: sum(v) / len(v) for d, v in sorted(totals.items())}


def evaluate(
    model: str | Path | PreTrainedModel,
    records: list[PromptRecord],
    tokenizer=None,
    greedy: bool = True,
    batch_size: int = 256,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Verifier accuracy per domain of `model` on `records`.

    Args:
        model: an HF folder or a loaded transformers causal LM.
        records: the evaluation prompts (with `answer`/`tests` for their verifiers).
        tokenizer: needed when `model` is a module; loaded from the folder otherwise.
        greedy, batch_size, max_new_tokens, seed: see `generate_responses`.

    Returns:
        {domain: accuracy in [0, 1]}.
    """
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    if tokenizer is None:
        raise ValueError("evaluate: pass the tokenizer with a loaded model")
    responses = generate_responses(
        model, tokenizer, records, greedy, batch_size, max_new_tokens, seed
    )
    return accuracy_by_domain(records, responses)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask
