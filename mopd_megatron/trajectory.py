"""The sample that flows between stages: a trajectory, not a (prompt, response) pair.

Every per-token list has the length L of `token_ids` and is indexed by token position:
entry t describes token t given tokens[:t]. The first position has no log-prob (0.0).

- `loss_mask[t]` is 1 where the student generated token t, 0 for prompt, tool output or
  environment text. Single-turn is the case of one generated segment at the end; a
  multi-turn rollout with tool calls interleaves segments and needs no other change:
  teachers score the whole sequence and the mask decides which tokens train.
- `behaviour_logprobs[t]` is the rollout engine's log-prob μθ of token t (0 where masked).
- `teacher_logprobs[t]` is the domain teacher's log-prob of token t; `teacher_topk_*[t]`
  its top-k ids and log-probs at position t (k entries; ids -1 / log-probs -inf pad).
- `routed_experts` [L, layers, k] (routing replay, MoE students): the top-k expert ids the
  rollout engine used for token t in each decoder layer, in the smallest integer type that
  holds the expert count (`route_dtype`), −1 where none was recorded (SGLang records no route
  for the last token, which is never run through the model).
- `teacher_hidden` [L - response_start, H] (the `hidden_states` teacher payload): the domain
  teacher's final hidden state that predicts each token from the response start on (row j
  is the state at position response_start + j - 1), in the recipe's dtype (bf16 default).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

ROUTES_KEY = "routed_experts"
"""The name of the routes in a trajectory, a batch and SGLang's `meta_info`."""
HIDDEN_KEY = "teacher_hidden"
"""The name of the teacher's hidden states in a trajectory and a batch."""


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed integer type holding expert ids and the −1 sentinel."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if num_experts - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{num_experts} experts do not fit int32 expert ids")


@dataclass
class Trajectory:
    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    domain: str
    group: int
    """Index of the prompt this trajectory answers (GRPO groups the n samples of a prompt)."""
    reward: float = 0.0
    """The verifier's outcome reward in [0, 1]."""
    teacher_logprobs: list[float] = field(default_factory=list)
    teacher_topk_ids: list[list[int]] = field(default_factory=list)
    teacher_topk_logprobs: list[list[float]] = field(default_factory=list)
    finish_reason: str = ""
    routed_experts: torch.Tensor | None = None
    """[L, layers, k] expert ids per token and layer (see the module docstring), or None."""
    teacher_hidden: torch.Tensor | None = None
    """[L - response_start, H] the teacher's final hidden states (module docstring), or None."""
    environment: str = ""
    """The multi-turn environment the trajectory ran in ("" = single-turn)."""
    turns: int = 1
    """Assistant turns (generations) in the sequence."""
    tool_calls: int = 0
    tool_errors: int = 0
    """Tool calls that came back as error observations (crash, time-out, flood, bad call)."""
    weight_version: int | None = None
    """The rollout engine's weight version (optimizer steps) that sampled it, as the engine
    reported it; None where unrecorded (`async_rollout.py`)."""

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    @classmethod
    def single_turn(
        cls, prompt_ids: list[int], output_ids: list[int], output_logprobs: list[float], **kw
    ) -> Trajectory:
        """A prompt followed by one generated response."""
        n_prompt = len(prompt_ids)
        return cls(
            token_ids=list(prompt_ids) + list(output_ids),
            loss_mask=[0] * n_prompt + [1] * len(output_ids),
            behaviour_logprobs=[0.0] * n_prompt + list(output_logprobs),
            **kw,
        )

    @property
    def response_start(self) -> int:
        """Position of the first generated token."""
        return self.loss_mask.index(1) if 1 in self.loss_mask else len(self.loss_mask)

    def to_json(self) -> dict:
        """A JSON-ready dict (the tensors as base64 bytes with their dtype and shape)."""
        out = dataclasses.asdict(dataclasses.replace(self, routed_experts=None,
                                                     teacher_hidden=None))
        for key in (ROUTES_KEY, HIDDEN_KEY):
            if getattr(self, key) is not None:
                out[key] = _tensor_json(getattr(self, key))
        return out

    @classmethod
    def from_json(cls, data: dict) -> Trajectory:
        """The inverse of `to_json`."""
        tensors = {key: _tensor_from_json(data[key]) for key in (ROUTES_KEY, HIDDEN_KEY)
                   if data.get(key) is not None}
        return cls(**{**data, **tensors})


def _tensor_json(tensor: torch.Tensor) -> dict:
    """{dtype, shape, base64 data}; bf16 (which numpy lacks) travels as its int16 bits."""
    tensor = tensor.contiguous()
    bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "data": base64.b64encode(bits.numpy().tobytes()).decode()}


def _tensor_from_json(data: dict) -> torch.Tensor:
    bf16 = data["dtype"] == "bfloat16"
    array = np.frombuffer(base64.b64decode(data["data"]), dtype="int16" if bf16 else data["dtype"])
    tensor = torch.from_numpy(array.copy()).view(data["shape"])
    return tensor.view(torch.bfloat16) if bf16 else tensor
