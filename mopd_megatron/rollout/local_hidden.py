"""Rollout stage, embedded CPU engine: the final hidden states SGLang's `return_hidden_states`
returns, and the `token_ids_logprob` entries.

SGLang returns the tensor its logits processor multiplies by the LM head, i.e. the state
after the model's final norm (`logits_processor._get_hidden_states_to_store`; the pre-norm
state only on speculative-decoding paths). The recorder takes exactly that: the input of
the transformers model's output embedding, caught by a forward pre-hook, so a teacher's
logits are `hidden @ lm_head.weight.T` with nothing else to apply.
"""

from __future__ import annotations

import torch


class HiddenRecorder:
    """Keeps the LM head's input [n, len, H] of the latest forward of `model`."""

    def __init__(self, model: torch.nn.Module):
        self.latest: torch.Tensor | None = None
        model.get_output_embeddings().register_forward_pre_hook(self._keep)

    def _keep(self, _module: torch.nn.Module, args: tuple) -> None:
        self.latest = args[0]

    def take(self) -> torch.Tensor:
        """The latest forward's final hidden states, fp32 [n, len, H]."""
        if self.latest is None:
            raise RuntimeError("no forward has run since the last take()")
        out, self.latest = self.latest.float(), None
        return out


def token_ids_rows(logp: torch.Tensor, ids: tuple[int, ...]) -> list[list[float]]:
    """[n, V] log-probs -> per row the log-probs of `ids`, in the requested order."""
    return logp[:, list(ids)].tolist()
