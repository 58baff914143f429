"""Training progress: a step log with rate and ETA, TensorBoard scalars, a JSONL history.

Only the logging rank (global rank 0) writes. Scalars are named `group/name` so that
TensorBoard groups them (loss/, kl/, reward/, time/, ...).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunTracker:
    """Step log + TensorBoard + history.jsonl for one run directory."""

    def __init__(self, run_dir: str | Path, total_steps: int, *, tensorboard: bool = True,
                 enabled: bool = True, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_step = start_step
        self.start_time = time.monotonic()
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history = (self.run_dir / "history.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], line_keys: tuple[str, ...] = ()) -> None:
        """Record `scalars` for `step` (1-based) and print one progress line."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)
        self.history.write(json.dumps({"step": step, **scalars}) + "\n")
        self.history.flush()
        done = step - self.start_step
        elapsed = time.monotonic() - self.start_time
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k}={scalars[k]:.4g}" for k in line_keys if k in scalars)
        print(
            f"[step {step}/{self.total_steps}] {shown} | {rate * 60:.1f} steps/min, "
            f"elapsed {_format_seconds(elapsed)}, ETA {_format_seconds(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            self.history.close()
            if self.writer is not None:
                self.writer.close()
