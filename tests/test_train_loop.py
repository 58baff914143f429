"""The MOPD loop end to end on CPU: Megatron student at EP2 over gloo, embedded engines over
HTTP. A killed run resumes from its last checkpoint and reproduces the uninterrupted run's
losses bit for bit; another layout with another loss path gives the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf_model
from transformers import AutoModelForCausalLM

from mopd_megatron.data import save_prompts
from mopd_megatron.demo.tasks import make_splits

RECIPE = """
model: {{hf_path: {root}/student}}
parallel: {{tp: {tp}, ep: {ep}, micro_batch_size: 4}}
rollout: {{engine: local, max_new_tokens: 6, batch_size: 8, max_concurrency: 1}}
teachers:
  teachers:
    - {{name: add-teacher, domains: [add], model_path: {root}/teacher_add, max_concurrency: 1}}
    - {{name: rev-teacher, domains: [rev], model_path: {root}/teacher_rev, max_concurrency: 1}}
algorithm: {{loss: {loss}}}
data: {{train_files: [{root}/train.jsonl], eval_files: [{root}/test.jsonl], prompts_per_step: 16}}
checkpoint: {{save_interval: 1, keep_last: 2}}
logging: {{dir: {run}}}
train: {{steps: {steps}}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_world")
    make_tiny_hf_model(root / "student", "qwen3_moe", seed=0)
    make_tiny_hf_model(root / "teacher_add", "qwen3_moe", seed=1)
    make_tiny_hf_model(root / "teacher_rev", "qwen3_moe", seed=2)
    splits = make_splits(["add", "rev"], seed=0, n_train=64, n_dev=4, n_test=8)
    save_prompts(splits["train"], root / "train.jsonl")
    save_prompts(splits["test"], root / "test.jsonl")
    return root


def _train_command(world, run, loss="topk", tp=1, ep=2, steps=4):
    recipe = run.parent / f"{run.name}.yaml"
    recipe.write_text(RECIPE.format(root=world, run=run, loss=loss, tp=tp, ep=ep, steps=steps))
    return [sys.executable, "-m", "mopd_megatron.cli", "train", str(recipe)]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _losses(run) -> dict[int, float]:
    """The last logged loss of every step (a resumed run appends to the history)."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    """Four uninterrupted steps at EP2 with the teacher top-k loss."""
    run = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_train_command(world, run), env=_env(), check=True, timeout=300)
    return run


def test_loop_writes_logs_report_and_export(reference_run):
    run = reference_run
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["sync/logprob_gap"] < 1e-4 for r in rows)  # engine == trainer after each sync
    # Routing replay (on by default for an MoE student): the engine sent every route the loss
    # depends on, and with equal weights the trainer's live routers agree with nearly all.
    assert all(r["routing/replayed"] == 1.0 and r["routing/agreement"] > 0.9 for r in rows)
    assert rows[-1]["kl/mean"] < rows[0]["kl/mean"]  # the student moves towards its teachers
    assert {"kl/add", "kl/rev", "reward/add", "time/rollout"} <= set(rows[0])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    report = (run / "report.md").read_text()
    assert "student before" in report and "student after" in report and "normalized" in report
    assert (run / "domain_scores.png").stat().st_size > 0
    exported = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "hf")
    assert torch.isfinite(exported(torch.tensor([[1, 5, 6]])).logits).all()


def test_killed_run_resumes_bit_exactly(world, reference_run, tmp_path):
    """Bit-exact needs the engines to see the same batches as the original run: one request in
    flight per engine (max_concurrency: 1), since the embedded engine merges concurrent
    requests into one padded batch and a different batch shape changes the last float bits."""
    run = tmp_path / "killed"
    assert_resumes_exactly(_train_command(world, run), run, reference_run, steps=4)


def assert_resumes_exactly(command: list[str], run, reference, steps: int) -> None:
    """SIGKILL a training command (writing to `run`) once it has saved step 2, rerun it, and
    compare the resumed steps' losses with the uninterrupted `reference` run's, bit for bit."""
    proc = subprocess.Popen(command, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.exists() and int(latest.read_text()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint to kill after"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer, its ranks and its engines
    proc.wait()
    resumed_from = int(latest.read_text())
    assert resumed_from < steps, "the run finished before it could be killed"
    subprocess.run(command, env=_env(), check=True, timeout=300)
    expected, got = _losses(reference), _losses(run)
    for step in range(resumed_from + 1, steps + 1):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_other_layout_and_exact_kl_path_give_the_same_losses(world, reference_run, tmp_path):
    """TP2+SP with the local Megatron teachers' full-vocabulary reverse KL equals EP2 with the
    served teachers' top-64 (= whole 42-token vocabulary) loss: same rollouts, same math, so
    the same losses and the same final weights."""
    run = tmp_path / "tp2"
    command = _train_command(world, run, loss="full_rkl", tp=2, ep=1)
    subprocess.run(command, env=_env(), check=True, timeout=300)
    expected, got = _losses(reference_run), _losses(run)
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    final, reference = (load_file(r / "checkpoints" / "hf" / "model.safetensors")
                        for r in (run, reference_run))
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_rollout_only_then_train_only_reproduce_the_first_step(world, reference_run, tmp_path):
    """slime-style debug switches: a rollout-only run saves what the engines sampled with the
    initial weights (seeded per step), and a train-only run on that dump, with no engines,
    trains the same first step as the full loop."""
    dump, run = tmp_path / "dump", tmp_path / "train_only"
    rollout = _train_command(world, tmp_path / "rollout_run", steps=2) + ["--rollout-only", str(dump)]
    subprocess.run(rollout, env=_env(), check=True, timeout=300)
    assert sorted(p.name for p in dump.glob("step_*.jsonl")) == [
        "step_0000001.jsonl", "step_0000002.jsonl"]
    train_only = _train_command(world, run, steps=2) + ["--train-only", str(dump)]
    subprocess.run(train_only, env=_env(), check=True, timeout=300)
    assert _losses(run)[1] == _losses(reference_run)[1]
    assert not (run / "logs").exists()  # no engine was started
