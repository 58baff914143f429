"""Distributed checkpoints of the student: bit-exact resume, keep_last, resharding.

Launch 1 (TP2+SP, MoE) trains 4 steps and saves after steps 1-3 with keep_last=2.
Launch 2, a fresh process, loads step 2 and must reproduce steps 3 and 4 bit for bit (loss,
grad norm, lr, and the Python / torch RNG streams), then loads the same checkpoint at EP2
and PP2: the model's log-probs match, and the resharded optimizer reproduces steps 3-4.
"""

import pytest
import torch
from multirank import run_torchrun

RESHARD = ("ep2", "pp2")


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    common = ("--hf", str(tiny_moe_dir), "--ckpt", str(ckpt))
    first = run_torchrun("ckpt_resume.py", 2, *common, "--phase", "train")
    second = run_torchrun("ckpt_resume.py", 2, *common, "--phase", "resume",
                          "--reshard", ",".join(RESHARD))
    return first, second


def _without_time(step: dict) -> dict:
    return {key: value for key, value in step.items() if key != "seconds"}


def test_resume_is_bit_exact(runs):
    first, second = runs
    for rank in range(2):
        for number in ("3", "4"):
            assert _without_time(second[rank]["steps"][number]) == _without_time(
                first[rank]["steps"][number]
            )
        assert second[rank]["extra"] == {"step": 2, "sampler": {"epoch": 0, "position": 16}}


def test_keep_last_and_latest_marker(runs):
    first, _ = runs
    assert first[0]["listing"] == ["iter_0000002", "iter_0000003", "latest"]


@pytest.mark.parametrize("layout", RESHARD)
def test_load_at_another_layout(runs, layout):
    first, second = runs
    resharded = second[0]["reshard"][layout]
    torch.testing.assert_close(torch.tensor(resharded["probe"]), torch.tensor(first[0]["probe"]),
                               rtol=0, atol=1e-5)
    for number in ("3", "4"):
        want, got = first[0]["steps"][number], resharded["steps"][number]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == want["lr"]
