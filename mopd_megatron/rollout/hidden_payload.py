"""Teacher stage, hidden-state payload: SGLang's `meta_info["hidden_states"]` -> a tensor.

A prefill-scoring request with `return_hidden_states` gets back, per sequence, one element
per forward (`scheduler.batch_result_processor._append_prefill_hidden_states`): the prefill's
[uncached positions][H] rows as JSON floats, computed in the server's dtype. With
`logprob_start_len = j` no position from j on comes from the prefix cache, so the rows cover
positions `cached_tokens .. len-1` and include every position a response token is predicted
from. The state is after the final norm (what the LM head multiplies), so the trainer's
teacher logits are `hidden @ W_lm_head.T`.

`parse_hidden` keeps the rows of positions r-1 .. len-2 (those that predict the response
tokens r .. len-1, aligned with `Scores.token_logprobs`) and stores them in the recipe's dtype
(bf16 by default: exact for a bf16 server), the form in which they travel on to the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mopd_megatron.rollout.types import ResponseError, Scores


def parse_hidden(meta: dict[str, Any], length: int, start: int, dtype: torch.dtype,
                 where: str) -> torch.Tensor:
    """[length - start, H] final hidden states of positions start-1 .. length-2.

    Args:
        meta: One result's `meta_info`.
        length: Tokens in the scored sequence.
        start: The response start r (>= 1).
        dtype: The dtype to keep them in.
        where: Names the result in errors.

    Raises:
        ResponseError: The rows are missing, ragged, or do not cover the scored positions.
    """
    chunks = meta.get("hidden_states")
    if not isinstance(chunks, list) or not chunks or not isinstance(chunks[0], list):
        raise ResponseError(f"{where}: hidden_states missing ({chunks!r:.80}); was the server "
                            "started with --enable-return-hidden-states?")
    cached = meta.get("cached_tokens", 0)
    try:
        rows = torch.tensor(chunks[0], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ResponseError(f"{where}: hidden_states[0] is not a [positions][H] array: "
                            f"{err}") from None
    if rows.dim() != 2 or rows.shape[0] != length - cached:
        raise ResponseError(f"{where}: hidden_states[0] has shape {tuple(rows.shape)}, expected "
                            f"[{length - cached}, H] (positions {cached}..{length - 1})")
    if cached > start - 1:
        raise ResponseError(f"{where}: {cached} cached tokens leave no hidden state for "
                            f"position {start - 1}")
    return rows[start - 1 - cached:length - 1 - cached].to(dtype)


def attach_hidden(scores: list[Scores], resp: list[dict], sequences: Sequence[Sequence[int]],
                  response_starts: Sequence[int], dtype: torch.dtype) -> list[Scores]:
    """Set each `Scores.hidden_states` from its result of a parsed scoring response."""
    for i, (s, item, seq, r) in enumerate(zip(scores, resp, sequences, response_starts)):
        s.hidden_states = parse_hidden(item["meta_info"], len(seq), r, dtype, f"result {i}")
    return scores
