"""Toy world, RL-made teachers: GRPO with the domain's verifier from the base, at a low rate.

The MOPD paper makes each teacher by domain RL from the shared SFT checkpoint, so a teacher
keeps the base's other skills and answers in the style RL sharpened out of the base's own
distribution. `train_teacher_grpo` does the same at toy scale, in plain PyTorch:

    each step: `rl_prompts` fresh prompts of the domain (never a held-out one), `rl_group`
    samples each at temperature 1 (KV-cached `generate`), reward r = verifier score,
    group advantage A = (r − mean_group) / (std_group + 1e-6) (0 for a group with one reward),
    loss = −mean_seq[ A · (1/|y|) Σ_t log π(y_t | x, y_<t) ], one AdamW step (lr `rl_lr`,
    linear warm-up, gradient clipping 1.0).

One update per batch keeps it on-policy, so GRPO's ratio is 1 and its clipping never acts.
Every `rl_check_every` steps the teacher is scored greedily on its domain's dev prompts; it
stops at `teacher_target` and keeps its best check, like the SFT teachers (`demo.curriculum`).
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mopd_megatron.data import PromptRecord, encode_prompt
from mopd_megatron.demo.curriculum import BestCheckpoint, Scorer
from mopd_megatron.demo.settings import WorldSettings
from mopd_megatron.demo.tasks import ExampleStream, max_new_tokens, toy_domain
from mopd_megatron.mopd.rewards import score

logger = logging.getLogger(__name__)


def train_teacher_grpo(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    stream: ExampleStream,
    score_dev: Scorer,
    dev: list[PromptRecord],
    domain: str,
    s: WorldSettings,
) -> tuple[PreTrainedModel, int]:
    """GRPO a copy of `base` on `domain` until its dev accuracy reaches `s.teacher_target`.

    Returns:
        (the teacher at its best check, that check's step).
    """
    model = copy.deepcopy(base)
    own = [r for r in dev if r.domain == domain]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.rl_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / 10))
    best = BestCheckpoint(model, score_dev(model, own)[domain])
    logger.info("teacher %s (grpo) step 0 dev %.3f", domain, best.accuracy)
    for step in range(1, s.rl_max_steps + 1):
        mean_reward = grpo_step(model, tokenizer, stream.draw({domain: 1.0}, s.rl_prompts),
                                domain, s.rl_group, optimizer)
        warmup.step()
        if step % s.rl_check_every and step < s.rl_max_steps:
            continue
        acc = score_dev(model, own)[domain]
        logger.info("teacher %s (grpo) step %d reward %.3f dev %.3f", domain, step, mean_reward,
                    acc)
        best.offer(model, acc, step)
        if acc >= s.teacher_target:
            break
    return model, best.restore(model)


def grpo_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    pairs: list[tuple[str, str]],
    domain: str,
    group: int,
    optimizer: torch.optim.Optimizer,
) -> float:
    """Sample `group` responses per prompt, score them, take one GRPO step; returns the mean
    reward."""
    records = [PromptRecord(domain=domain, prompt=p, verifier=toy_domain(domain).verifier)
               for p, _ in pairs for _ in range(group)]
    prompts = [encode_prompt(r, tokenizer) for r in records]
    responses = sample(model, tokenizer, prompts, max_new_tokens([domain]))
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = torch.tensor([score(r, t) for r, t in zip(records, texts)]).view(-1, group)
    advantages = group_advantages(rewards).flatten()
    loss = policy_loss(model, prompts, responses, advantages, tokenizer.pad_token_id)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return rewards.mean().item()


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, group] rewards -> GRPO advantages (0 where a group's rewards are all equal)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-6)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], limit: int) -> list[list[int]]:
    """One response per prompt at temperature 1, up to and including <eos>."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None])
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=limit,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train()
    responses = []
    for row in out[:, width:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        responses.append(row[:end])
    return responses


def policy_loss(model, prompts, responses, advantages: torch.Tensor, pad: int) -> torch.Tensor:
    """−mean over sequences of A · (mean log-prob of the response tokens)."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.zeros(len(rows), width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        mask[i, len(p) : len(p) + len(r)] = 1.0
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = mask[:, 1:]
    per_sequence = (logp * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return -(advantages * per_sequence).mean()
