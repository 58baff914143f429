"""Toy world, settings: every knob that decides the built world (and so its cache key).

The defaults follow `shared/reference/toy-world.md` (SFT at lr 1e-3, batch 128, 20 warm-up
steps; base band [0.15, 0.5] on dev; teachers stop at dev >= 0.85), except the base's mix
controller: checks every 5 steps with a hold zone [0.2, 0.45] instead of every 10 steps with
one threshold at 0.3, which oscillated for some seeds (see `demo.curriculum`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from mopd_megatron.demo.tasks import DOMAINS

FORMAT_VERSION = 1
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
    eval_batch_size: int = 512

    def key(self) -> str:
        """A short hash of the settings and the world format."""
        blob = json.dumps([FORMAT_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
