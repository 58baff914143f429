"""Data stage: prompt files -> validated records -> token ids -> mixed-domain batches."""

from mopd_megatron.data.records import (
    PromptDataError,
    PromptRecord,
    load_prompts,
    save_prompts,
)
from mopd_megatron.data.sampler import DomainMixSampler
from mopd_megatron.data.tokenize import encode_prompt, render_prompt, tokenize_records

__all__ = [
    "DomainMixSampler",
    "PromptDataError",
    "PromptRecord",
    "encode_prompt",
    "load_prompts",
    "render_prompt",
    "save_prompts",
    "tokenize_records",
]
