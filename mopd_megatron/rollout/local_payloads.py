"""Rollout stage, embedded CPU engine admission of the teacher payload fields of `/generate`.

Consumes a request decoded by SGLang's contract and produces, per batch item, the
`SeqRequest` fields for two payloads a teacher can send besides sampled-token log-probs,
checked as SGLang 0.5.23 checks them:

- `token_ids_logprob`: log-probs of the same chosen token ids at every position (one flat
  list for every item, or one list per item; `io_struct._normalize_token_ids_logprob`), each
  id in [0, V) (`tokenizer_manager._validate_token_ids_logprob`). Returned, with
  `return_logprob`, as meta_info `input_token_ids_logprobs` / `output_token_ids_logprobs`:
  per position a list of `[logprob, token_id, text]` in the requested order (null at the first
  input position), beside `input_top_logprobs`.
- `return_hidden_states` (true, or one bool per item): the final hidden state, after the final
  norm (what the LM head consumes; `logits_processor._get_hidden_states_to_store`), of every
  position the forward runs. SGLang refuses it unless the server was launched with
  `--enable-return-hidden-states`. meta_info `hidden_states` is then
  `[prefill rows [uncached prompt positions][H], one row per decode step...]` as JSON floats.
"""

from __future__ import annotations

from typing import Any

HIDDEN_STATES_OFF = (
    "The server is not configured to return hidden states. Please set "
    "`--return-hidden-states-mode last`, `--return-hidden-states-mode full`, or the legacy "
    "`--enable-return-hidden-states` flag.")
"""SGLang's refusal (tokenizer_manager) when the server flag is off."""


def payload_fields(req: Any, items: int, n: int, vocab_size: int,
                   hidden_states_enabled: bool) -> list[dict[str, Any]]:
    """`token_ids_logprob` and `return_hidden_states` of each batch item, as `SeqRequest`
    keyword arguments.

    Args:
        req: The contract's `GenerateRequest`.
        items: Batch items (prompts) in the request.
        n: Samples per prompt (`sampling_params.n`).
        vocab_size: Token ids must be below it.
        hidden_states_enabled: The server runs with `--enable-return-hidden-states`.

    Raises:
        ValueError: With the message of SGLang's HTTP 400 for the same request.
    """
    ids = req.token_ids_logprob
    if not ids:
        per_item = [()] * items
    elif not isinstance(ids[0], list):
        per_item = [tuple(ids)] * items
    elif n > 1:
        raise ValueError("Cannot use list token_ids_logprob with parallel_sample_num > 1")
    elif len(ids) != items:
        raise ValueError(f"token_ids_logprob has {len(ids)} entries for {items} sequences")
    else:
        per_item = [tuple(row) for row in ids]
    for row in per_item:
        for token in row:
            if not 0 <= token < vocab_size:
                raise ValueError(f"token_ids_logprob contains out-of-vocabulary token id "
                                 f"{token}; valid range is [0, {vocab_size}).")
    hidden = req.return_hidden_states
    if isinstance(hidden, list):
        if len(hidden) != items:
            raise ValueError("The length of return_hidden_states should be equal to the batch "
                             "size.")
    else:
        hidden = [bool(hidden)] * items
    if any(hidden) and not hidden_states_enabled:
        raise ValueError(HIDDEN_STATES_OFF)
    return [{"token_ids_logprob": row, "return_hidden_states": bool(h)}
            for row, h in zip(per_item, hidden)]
