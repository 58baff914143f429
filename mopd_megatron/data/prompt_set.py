"""Data stage, the run's prompts: training and held-out records, their domains, the sampler.

Read before any model is built, so that a missing or malformed data file fails in seconds, as
do prompts whose verifier must run code where the code sandbox cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd_megatron.config import DataConfig, RecipeError
from mopd_megatron.data.records import PromptDataError, PromptRecord, load_prompts
from mopd_megatron.data.sampler import DomainMixSampler
from mopd_megatron.data.tokenize import tokenize_records
from mopd_megatron.envs.sandbox import SandboxUnavailable
from mopd_megatron.mopd.rewards.registry import check_code_sandbox, get_verifier


@dataclass
class PromptSet:
    train: list[PromptRecord]
    held_out: list[PromptRecord]
    domains: list[str]
    """Every domain of either split, sorted (the index is the batch's `domain_ids`)."""
    sampler: DomainMixSampler
    """Draws each step's training prompts."""


def load_prompt_set(cfg: DataConfig, tokenizer, seed: int) -> PromptSet:
    """Load, validate and tokenise the recipe's prompt files."""
    def tokenized(files: list[str]) -> list[PromptRecord]:
        return tokenize_records(load_prompts(files), tokenizer, cfg.apply_chat_template,
                                cfg.max_prompt_tokens)

    train = tokenized(cfg.train_files)
    held_out = tokenized(cfg.eval_files) if cfg.eval_files else []
    for record in train + held_out:  # an unknown verifier fails now, not at the first step
        try:
            get_verifier(record)
        except KeyError as err:
            raise PromptDataError(err.args[0]) from None
    try:
        check_code_sandbox(train + held_out, cfg.allow_weak_sandbox)
    except SandboxUnavailable as err:
        raise RecipeError(f"data: prompts whose verifier runs code: {err}") from None
    domains = sorted({r.domain for r in train + held_out})
    sampler = DomainMixSampler(train, cfg.prompts_per_step, cfg.domain_weights, seed)
    return PromptSet(train, held_out, domains, sampler)
