"""Baselines, piece by piece: merge math and folders, cascade stages, SFT loss and batches,
RFT's verified sampling, curves and the table documents (no training runs here)."""

import asyncio
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf_model

from experiments import merge
from experiments.cascade import cascade_stages
from experiments.curves import Segment, mean_curve, normalized_curve
from experiments.docs import write_docs
from experiments.evaluation import normalized
from experiments.methods import Budget
from mopd_megatron.cli import run_reporting_errors
from mopd_megatron.config import AlgorithmConfig
from mopd_megatron.data import PromptRecord
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.rollout.types import Generation, SamplingParams
from mopd_megatron.teacher_samples import EpochBatches, sample_verified
from mopd_megatron.trajectory import Trajectory


def test_merge_weights_average_and_task_arithmetic():
    s, a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, 5.0])
    assert torch.equal(merge.merge_weights([a, b], [0.5, 0.5], None), torch.tensor([2.0, 3.0]))
    ta = merge.merge_weights([a, b], [1.0, 0.5], s)  # s + (a - s) + 0.5 (b - s)
    assert torch.equal(ta, torch.tensor([3.0, 3.0]))
    half = merge.merge_weights([a.bfloat16()], [0.5], s.bfloat16())
    assert half.dtype == torch.bfloat16


def test_merge_folders(tmp_path):
    paths = [make_tiny_hf_model(tmp_path / f"m{i}", "qwen3_moe", seed=i) for i in range(3)]
    student, teachers = paths[0], paths[1:]
    weights = [load_file(p / "model.safetensors") for p in paths]
    avg = merge.average(tmp_path / "avg", teachers)
    got = load_file(avg / "model.safetensors")
    assert (avg / "config.json").is_file() and (avg / "tokenizer.json").is_file()
    for name, tensor in got.items():
        assert torch.allclose(tensor, (weights[1][name] + weights[2][name]) / 2), name
    same = load_file(
        merge.task_arithmetic(tmp_path / "ta0", student, teachers, 0.0) / "model.safetensors"
    )
    assert all(torch.equal(same[n], weights[0][n]) for n in same)
    one = load_file(
        merge.task_arithmetic(tmp_path / "ta1", student, teachers, [1.0, 0.0]) / "model.safetensors"
    )
    assert all(torch.allclose(one[n], weights[1][n], atol=1e-6) for n in one)


def test_merge_from_the_command_line(tmp_path):
    teachers = [make_tiny_hf_model(tmp_path / f"t{i}", "qwen3_moe", seed=i) for i in range(2)]
    out = tmp_path / "avg"
    argv = ["--out", str(out), "--teachers", *map(str, teachers)]
    merge.main(argv)
    a, b = (load_file(t / "model.safetensors") for t in teachers)
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2), name
    bad = ["--out", str(out), "--teachers", str(tmp_path / "missing")]
    assert run_reporting_errors("merge", merge.main, bad) == 2  # one line, not a traceback


def test_merge_rejects_different_architectures(tmp_path):
    moe = make_tiny_hf_model(tmp_path / "moe", "qwen3_moe")
    dense = make_tiny_hf_model(tmp_path / "dense", "qwen3")
    with pytest.raises(ValueError, match="tensor names differ"):
        merge.average(tmp_path / "bad", [moe, dense])


def test_cascade_stages_split_the_steps():
    assert cascade_stages(["a", "b", "c"], 10) == [("a", 4), ("b", 3), ("c", 3)]
    assert sum(n for _, n in cascade_stages(["a", "b"], 7)) == 7


def _trajectory(prompt, response, domain="add"):
    return Trajectory.single_turn(prompt, response, [0.0] * len(response), domain=domain, group=0)


def test_sft_loss_is_token_mean_cross_entropy():
    trajs = [_trajectory([1, 5, 6], [7, 2]), _trajectory([1, 8], [9, 10, 2])]
    batch = build_batch(trajs, pad_id=0, domains=["add"])
    logits = torch.randn(2, batch["tokens"].shape[1], 42, requires_grad=True)
    sft = build_objective(AlgorithmConfig(loss="sft"), LossContext(vocab_size=42, temperature=0.7))
    loss_sum, units, metrics = sft(logits, batch)
    mask = batch["loss_mask"].bool()
    reference = torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])
    assert units.item() == 5 and metrics["tokens"].item() == 5
    assert torch.allclose(loss_sum / units, reference, atol=1e-5)
    loss_sum.backward()
    assert logits.grad.abs().sum() > 0


def test_epoch_batches_cover_every_item_each_epoch():
    batches = EpochBatches(list(range(10)), 4, seed=0)
    drawn = [x for _ in range(5) for x in batches.next_batch()]
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))
    assert drawn == [
        x for b in [EpochBatches(list(range(10)), 4, 0)] for _ in range(5) for x in b.next_batch()
    ]


class _FakeClient:
    """Answers `1+1=` with '2' or '3' alternately (tokens: '2' = 5, '3' = 6, <eos> = 2)."""

    def __init__(self):
        self.calls = 0

    async def agenerate(self, prompts, sampling):
        out = []
        for prompt in prompts:
            token = 5 if self.calls % 2 == 0 else 6
            self.calls += 1
            out.append(Generation(list(prompt), [token, 2], [-0.1, -0.1], "stop"))
        return out


class _FakePool:
    def __init__(self):
        self.fake = _FakeClient()

    def route(self, domain):
        return f"{domain}-teacher"

    def client(self, name):
        return self.fake


class _Tokenizer:
    def batch_decode(self, rows, skip_special_tokens=True):
        chars = {5: "2", 6: "3", 2: ""}
        return ["".join(chars[t] for t in row) for row in rows]


def test_rft_keeps_distinct_verified_samples():
    records = [
        PromptRecord(
            domain="add", prompt="1+1=", answer="2", verifier="exact", prompt_ids=[1, 9, 10]
        )
    ]
    kept, stats = asyncio.run(
        sample_verified(_FakePool(), _Tokenizer(), records, 4, SamplingParams(max_new_tokens=4))
    )
    assert stats == {"add": {"prompts": 1, "drawn": 4, "correct": 2, "kept": 1}}
    assert [t.token_ids for t in kept] == [[1, 9, 10, 5, 2]]


def _write_run(run_dir, before, evals):
    run_dir.mkdir(parents=True)
    (run_dir / "scores.json").write_text(json.dumps({"scores": {"student before": before}}))
    rows = [{"step": s, **{f"eval/{d}": a for d, a in acc.items()}} for s, acc in evals]
    (run_dir / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_curves_normalize_and_chain_segments(tmp_path):
    start, teachers = {"add": 0.2, "rev": 0.4}, {"add": 0.6, "rev": 0.8}
    _write_run(tmp_path / "a", start, [(2, {"add": 0.4, "rev": 0.6})])
    _write_run(tmp_path / "b", {"add": 0.4, "rev": 0.6}, [(1, {"add": 0.6, "rev": 0.8})])
    curve = normalized_curve(
        [Segment(str(tmp_path / "a"), 10), Segment(str(tmp_path / "b"), 5, offset=20)],
        start,
        teachers,
    )
    assert curve == [(0, 0.0), (20, pytest.approx(0.5)), (25, pytest.approx(1.0))]
    assert mean_curve([[(0, 0.0), (10, 1.0)], [(0, 0.0), (10, 0.5), (20, 1.0)]]) == [
        (0, 0.0, 0.0),
        (10, 0.75, pytest.approx(math.sqrt(0.125))),
    ]
    scores = normalized({"add": 0.6, "rev": 0.4}, start, teachers)
    assert scores == {"add": pytest.approx(1.0), "rev": 0.0, "mean": pytest.approx(0.5)}


def test_docs_from_results(tmp_path):
    domains = ["add", "rev"]
    acc = {"greedy": {"add": 0.5, "rev": 0.5}, "sampled": {"add": 0.4, "rev": 0.4}}
    for seed in (0, 1):
        seed_dir = tmp_path / f"seed{seed}"
        seed_dir.mkdir()
        ref = {"base": acc, "teachers": {m: {d: 0.9 for d in domains} for m in acc}}
        (seed_dir / "reference.json").write_text(json.dumps(ref))
        world = tmp_path / f"world{seed}"
        world.mkdir()
        models = {"base": {"test": acc["greedy"]}, **{d: {"test": {d: 0.9}} for d in domains}}
        (world / "world.json").write_text(
            json.dumps({"domains": domains, "models": models, "build_seconds": 60.0})
        )
        for method, score in (("mopd", 0.9), ("merge_avg", 0.1 * seed)):
            norm = {m: {"add": score, "rev": score, "mean": score} for m in acc}
            curve = [[0, 0.0], [256, score]] if method == "mopd" else []
            (seed_dir / f"{method}.json").write_text(
                json.dumps(
                    {
                        "test": acc,
                        "normalized": norm,
                        "curve": curve,
                        "samples": 256 * (method == "mopd"),
                        "seconds": 60.0,
                        "notes": "",
                    }
                )
            )
    invocation = {
        "command": "python -m experiments.table",
        "date": "today",
        "minutes": 2.0,
        "threads": 1,
        "load_start": [1.0] * 3,
        "load_end": [2.0] * 3,
        "machine": "cpu",
    }
    (tmp_path / "invocations.jsonl").write_text(json.dumps(invocation) + "\n")
    path = write_docs(tmp_path, tmp_path / "docs", [0, 1], ["mopd", "merge_avg"], Budget())
    text = path.read_text()
    assert "| **MOPD** (pg, α = 0) | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.900 ± 0.000" in text
    assert "| Param-Merge (Avg.) |" in text and "0.050 ± 0.071" in text and "0.328" in text
    assert "MOPD (the paper's default loss) ranks 1 of 2" in text
    assert "`python -m experiments.table` (today, 2.0 min" in text
    assert (tmp_path / "docs" / "toy_curves.png").stat().st_size > 0
    assert (tmp_path / "docs" / "toy_bars.png").stat().st_size > 0
