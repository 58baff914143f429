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
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
