"""`mopd-megatron demo --quick`: the whole path (toy world, EP2 student, engines over HTTP,
report) in a few steps. The full demo is a benchmark, not a test (README)."""

import json
import os
import subprocess
import sys


def test_quick_demo_runs_the_whole_loop(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mopd_megatron.cli", "demo", "--quick", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    assert "toy world ready" in done.stdout and "MOPD: held-out accuracy" in done.stdout
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    scores = json.loads((run / "scores.json").read_text())["scores"]
    assert set(scores) == {"student before", "domain teacher", "student after"}
    assert set(scores["student after"]) == {"add", "rev", "sort"}
    for name in ("report.md", "domain_scores.png", "training_curves.png"):
        assert (run / name).stat().st_size > 0
    assert not (run / "agent_episodes.png").exists()  # single-turn: no episode metrics
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "hf" / "config.json").is_file()
