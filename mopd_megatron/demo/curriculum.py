"""Toy world, training schedules: the closed-loop base SFT and the per-domain teacher SFT.

- `train_base`: mixed SFT from scratch. Every `check_every` steps the model is evaluated
  greedily on dev; a domain's mix weight is then 1 below `boost_below`, `hold_weight` up to
  `rest_above` and 0 above it, so the easy domains (rev, sort) hover in the band, drifting
  back down by forgetting when they overshoot, while the slow one (add) catches up. It
  stops at the first check where every domain lies in [`base_low`, `base_high`]; past
  `base_max_steps` it keeps the checked state nearest that band. At lr 1e-3 ten steps
  move a domain's accuracy by up to 0.4, hence the short check interval and the hold zone.
- `train_teacher`: a copy of the base, SFT on one domain only, checked every
  `teacher_check_every` steps, stopped at dev >= `teacher_target`; the best check is kept.

Both consume fresh examples from an `ExampleStream` (never a held-out prompt) and a
`score(model, records) -> {domain: accuracy}` callback.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mopd_megatron.data import PromptRecord
from mopd_megatron.demo.settings import WorldSettings
from mopd_megatron.demo.sft import SFTTrainer
from mopd_megatron.demo.tasks import ExampleStream

logger = logging.getLogger(__name__)

Scorer = Callable[[PreTrainedModel, list[PromptRecord]], dict[str, float]]


def train_base(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    stream: ExampleStream,
    score: Scorer,
    dev: list[PromptRecord],
    s: WorldSettings,
) -> int:
    """Closed-loop mixed SFT of `model` (in place) into the mediocre band.

    Returns:
        The step whose state the model holds on return.
    """
    trainer = SFTTrainer(model, tokenizer, s.lr, s.warmup_steps)
    weights = dict.fromkeys(s.domains, 1.0)
    best: tuple[float, int, dict] = (float("inf"), 0, {})
    while trainer.steps < s.base_max_steps:
        loss = trainer.step(stream.draw(weights, s.batch_size))
        if trainer.steps % s.check_every:
            continue
        acc = score(model, dev)
        logger.info("base %s loss %.3f dev %s", trainer.progress(s.base_max_steps), loss, fmt(acc))
        miss = sum(max(0.0, s.base_low - a, a - s.base_high) for a in acc.values())
        if miss == 0:
            return trainer.steps
        if miss < best[0]:
            best = (miss, trainer.steps, copy.deepcopy(model.state_dict()))
        weights = {d: _mix_weight(acc[d], s) for d in s.domains}
        if not any(weights.values()):
            weights = {min(acc, key=acc.get): 1.0}
    if not best[2]:
        logger.warning("base: no dev check within %d steps; keeping the last state", trainer.steps)
        return trainer.steps
    logger.warning(
        "base: no check had every domain in [%.2f, %.2f] within %d steps; keeping step %d",
        s.base_low,
        s.base_high,
        s.base_max_steps,
        best[1],
    )
    model.load_state_dict(best[2])
    return best[1]


def train_teacher(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    stream: ExampleStream,
    score: Scorer,
    dev: list[PromptRecord],
    domain: str,
    s: WorldSettings,
) -> tuple[PreTrainedModel, int]:
    """SFT a copy of `base` on `domain` until its dev accuracy reaches the target.

    Returns:
        (the teacher at its best check, that check's step).
    """
    model = copy.deepcopy(base)
    own = [r for r in dev if r.domain == domain]
    trainer = SFTTrainer(model, tokenizer, s.lr, s.warmup_steps)
    best = BestCheckpoint(model)
    while trainer.steps < s.teacher_max_steps:
        loss = trainer.step(stream.draw({domain: 1.0}, s.batch_size))
        if trainer.steps % s.teacher_check_every and trainer.steps < s.teacher_max_steps:
            continue
        acc = score(model, own)[domain]
        progress = trainer.progress(s.teacher_max_steps)
        logger.info("teacher %s %s loss %.3f dev %.3f", domain, progress, loss, acc)
        best.offer(model, acc, trainer.steps)
        if acc >= s.teacher_target:
            break
    if best.accuracy < s.teacher_target:
        logger.warning("teacher %s: best dev %.3f < target %.2f", domain, best.accuracy,
                       s.teacher_target)
    return model, best.restore(model)


class BestCheckpoint:
    """The best dev accuracy a teacher reached while training, its step, and its weights then
    (teachers end at their best check, whichever way they are trained)."""

    def __init__(self, model: PreTrainedModel, accuracy: float = -1.0, step: int = 0):
        self.accuracy, self.step = accuracy, step
        self.state = copy.deepcopy(model.state_dict())

    def offer(self, model: PreTrainedModel, accuracy: float, step: int) -> None:
        """Keep `model`'s weights if `accuracy` beats the best so far."""
        if accuracy > self.accuracy:
            self.accuracy, self.step = accuracy, step
            self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: PreTrainedModel) -> int:
        """Load the best weights into `model`; returns their step."""
        model.load_state_dict(self.state)
        return self.step


def fmt(accuracy: dict[str, float]) -> str:
    """`add=0.15 rev=0.23 ...` for log lines."""
    return " ".join(f"{d}={a:.2f}" for d, a in accuracy.items())


def _mix_weight(accuracy: float, s: WorldSettings) -> float:
    if accuracy < s.boost_below:
        return 1.0
    return 0.0 if accuracy > s.rest_above else s.hold_weight
