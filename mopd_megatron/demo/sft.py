"""Toy world, supervised fine-tuning: (prompt, answer) pairs -> AdamW steps on a HF model.

A training sequence is `<bos> prompt answer <eos>`, right-padded; the loss is the mean
cross-entropy over the answer and <eos> tokens only (the prompt and the padding carry
label -100). The learning rate warms up linearly, then stays constant.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

IGNORE = -100


def sft_tensors(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and labels [B, T] (-100 outside the answer) for (prompt, answer) pairs."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [([bos] + p, a + [eos]) for p, a in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


class SFTTrainer:
    """AdamW on one model with a linear warm-up, plus a rate and ETA for progress logs.

    Args:
        model: a transformers causal LM (trained in place).
        tokenizer: its tokenizer.
        lr: peak learning rate.
        warmup_steps: steps of linear warm-up from lr/warmup_steps.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        lr: float,
        warmup_steps: int,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
        )
        self.steps = 0
        self.started = time.perf_counter()

    def step(self, pairs: list[tuple[str, str]], tensors=None) -> float:
        """One optimiser step on a batch of pairs; returns the loss. `tensors(pairs, tokenizer)
        -> (ids, labels)` renders the batch (default `sft_tensors`: loss on the answer)."""
        ids, labels = (tensors or sft_tensors)(pairs, self.tokenizer)
        self.model.train()
        logits = self.model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {self.steps + 1}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.steps += 1
        return loss.item()

    def progress(self, max_steps: int) -> str:
        """`step/max, steps/s, ETA to max` for a log line."""
        elapsed = time.perf_counter() - self.started
        rate = self.steps / max(elapsed, 1e-9)
        eta = (max_steps - self.steps) / max(rate, 1e-9)
        return f"step {self.steps}/{max_steps} {rate:.1f} it/s, {elapsed:.0f}s (max ETA {eta:.0f}s)"
