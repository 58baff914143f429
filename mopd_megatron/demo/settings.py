"""Toy world, settings: every knob that decides the built world (and so its cache key).

The defaults follow `shared/reference/toy-world.md` (SFT at lr 1e-3, batch 128, 20 warm-up
steps; base band [0.15, 0.5] on dev; teachers stop at dev >= 0.85), except the base's mix
controller: checks every 5 steps with a hold zone [0.2, 0.45] instead of every 10 steps with
one threshold at 0.3, which oscillated for some seeds (see `demo.curriculum`).

`WORLDS` names the two worlds: `exact` (add / rev / sort, one short answer each, teachers by
full-rate SFT) and `open` (carry / spread / mix, many correct answers of up to 19 characters,
teachers by a light SFT at a low rate and then GRPO, as the paper makes them; how far they
still move off their domain is measured in docs/toy_table_notes.md). GRPO alone at 3e-4
collapsed the carry teacher (dev 0.23 -> 0.01 in 20 steps: the base's sampled answers are
almost never right, so nearly every advantage is negative).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from mopd_megatron.demo.tasks import DOMAINS

FORMAT_VERSION = 2
"""Bump when the world's layout or build procedure changes (invalidates caches)."""


@dataclass
class WorldSettings:
    """Sizes, seed and SFT schedules of the toy world."""

    seed: int = 0
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    n_train: int = 5000
    """Train prompts per domain in data/train.jsonl (the MOPD prompt pool)."""
    n_dev: int = 200
    """Dev prompts per domain (the SFT loops' checks; held out)."""
    n_test: int = 500
    """Test prompts per domain (the before/after report; held out)."""
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 20
    check_every: int = 5
    """Base SFT steps between dev checks."""
    boost_below: float = 0.2
    """A domain's base mix weight is 1 while its dev accuracy is below this."""
    hold_weight: float = 0.03
    """Base mix weight of a domain with dev accuracy in [`boost_below`, `rest_above`]."""
    rest_above: float = 0.45
    """Above this dev accuracy a domain's base mix weight is 0 (it drifts back by forgetting)."""
    base_low: float = 0.15
    base_high: float = 0.5
    base_max_steps: int = 1500
    teacher_check_every: int = 25
    teacher_target: float = 0.85
    teacher_max_steps: int = 1000
    teacher_recipe: str = "sft"
    """How a teacher is made from the base: `sft` (this domain's data at `lr`, the demo's
    recipe), `grpo` (RL with the domain's verifier at `rl_lr`, `demo.rl_teacher`) or
    `sft_grpo` (a light SFT at `light_lr` up to dev `light_target`, then GRPO)."""
    light_lr: float = 3e-4
    """The light SFT's learning rate (`sft_grpo` teachers)."""
    light_target: float = 0.7
    """Dev accuracy at which the light SFT hands over to GRPO."""
    light_max_steps: int = 200
    rl_lr: float = 1e-4
    """GRPO teachers' learning rate (the base's SFT runs at `lr`)."""
    rl_prompts: int = 32
    """GRPO prompts per step (each sampled `rl_group` times)."""
    rl_group: int = 8
    rl_max_steps: int = 150
    """GRPO steps at most per teacher (it stops earlier at `teacher_target`)."""
    rl_check_every: int = 10
    """GRPO steps between dev checks."""
    eval_batch_size: int = 512

    def __post_init__(self):
        if self.teacher_recipe not in ("sft", "grpo", "sft_grpo"):
            raise ValueError(f"teacher_recipe must be sft, grpo or sft_grpo, "
                             f"not {self.teacher_recipe!r}")

    def key(self) -> str:
        """A short hash of the settings and the world format."""
        blob = json.dumps([FORMAT_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def base_key(self) -> str:
        """A short hash of the settings the base depends on (not the teachers' schedules)."""
        kept = {k: v for k, v in dataclasses.asdict(self).items()
                if not k.startswith(("teacher_", "rl_", "light_"))}
        blob = json.dumps([FORMAT_VERSION, kept], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


WORLDS: dict[str, dict] = {
    "exact": {},
    "open": {"domains": ["carry", "spread", "mix"], "teacher_recipe": "sft_grpo",
             "rl_prompts": 16, "rl_max_steps": 40, "n_dev": 100, "n_test": 300},
}
"""Named worlds: `WorldSettings` fields that differ from the defaults."""
