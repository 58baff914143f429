"""Data stage, tokenisation: `PromptRecord` -> prompt text -> prompt token ids.

With `apply_chat_template`, the tokenizer's chat template renders the messages (a plain
`prompt` becomes one user message) and adds the generation prompt. Without it, the prompt
text is used as is (a record with `messages` is then an error). The ids start with the
tokenizer's bos token when it has one and the rendered text does not already carry it.
"""

from __future__ import annotations

import dataclasses
import logging

from mopd_megatron.data.records import PromptDataError, PromptRecord

logger = logging.getLogger(__name__)


def render_prompt(record: PromptRecord, tokenizer, apply_chat_template: bool = False) -> str:
    """The text the model sees before its response.

    Args:
        record: the prompt.
        tokenizer: a transformers tokenizer (needs a chat template if `apply_chat_template`).
        apply_chat_template: render chat messages with the tokenizer's template.

    Returns:
        The prompt text.
    """
    if not apply_chat_template:
        if record.prompt is None:
            raise PromptDataError(
                f"{record.id}: field 'messages': chat messages need data.apply_chat_template: true"
            )
        return record.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise PromptDataError(
            f"{record.id}: data.apply_chat_template is set but the tokenizer has no chat template"
        )
    messages = record.messages or [{"role": "user", "content": record.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(record: PromptRecord, tokenizer, apply_chat_template: bool = False) -> list[int]:
    """Token ids of the rendered prompt, with bos in front when the tokenizer has one."""
    return encode_text(render_prompt(record, tokenizer, apply_chat_template), tokenizer)


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, with bos in front when the tokenizer has one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def tokenize_records(
    records: list[PromptRecord],
    tokenizer,
    apply_chat_template: bool = False,
    max_prompt_tokens: int | None = None,
) -> list[PromptRecord]:
    """Copies of `records` with `prompt_ids` set; prompts over the limit are dropped.

    Args:
        records: prompts as loaded.
        tokenizer: a transformers tokenizer.
        apply_chat_template: see `render_prompt`.
        max_prompt_tokens: drop (and count in a warning) prompts longer than this.

    Returns:
        The kept records, in order.
    """
    kept = []
    for record in records:
        ids = encode_prompt(record, tokenizer, apply_chat_template)
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            kept.append(dataclasses.replace(record, prompt_ids=ids))
    if not kept:
        raise PromptDataError(f"every prompt is longer than max_prompt_tokens={max_prompt_tokens}")
    if len(kept) < len(records):
        logger.warning(
            "dropped %d of %d prompts longer than %s tokens",
            len(records) - len(kept),
            len(records),
            max_prompt_tokens,
        )
    return kept
