"""Resume a distributed checkpoint at another layout and another world size.

Launch 1 (2 ranks) trains the tiny MoE student at TP2 x EP2 (sequence parallel, experts split
over the two TP ranks), saves step 2 and runs step 3 as the reference. Launch 2 (4 ranks)
loads step 2 at PP2 (dp 2) and at EP4 (dp 4): the model's log-probs are those saved,
and step 3, which needs the resharded Adam moments and the scheduler, matches the reference.
Every rank of both launches also reports its parameter count, which the planner must predict.
"""

import pytest
import torch
from multirank import run_torchrun

from mopd_megatron.config import ParallelConfig
from mopd_megatron.hf.layout import padded_vocab_size
from mopd_megatron.hf.spec import read_hf_config
from mopd_megatron.plan.params import rank_params

LAYOUTS = {"tp2ep2": {"tp": 2, "ep": 2}, "pp2": {"pp": 2}, "ep4": {"ep": 4}}
RESUMED = ("pp2", "ep4")


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory):
    common = ("--hf", str(tiny_moe_dir), "--ckpt", str(tmp_path_factory.mktemp("ckpt")))
    saved = run_torchrun("reshard_resume.py", 2, *common, "--phase", "save")
    resumed = run_torchrun("reshard_resume.py", 4, *common, "--phase", "resume",
                           "--layouts", ",".join(RESUMED))
    return saved, resumed


@pytest.mark.parametrize("layout", RESUMED)
def test_resume_at_another_layout_and_world_size(runs, layout):
    saved, resumed = runs
    reference = saved[0]
    for rank in resumed:
        got = rank[layout]
        assert got["extra"] == {"step": 2}
        torch.testing.assert_close(torch.tensor(got["probe"]), torch.tensor(reference["probe"]),
                                   rtol=0, atol=1e-5)
        assert got["step3"]["loss"] == pytest.approx(reference["step3"]["loss"], rel=1e-5)
        assert got["step3"]["grad_norm"] == pytest.approx(reference["step3"]["grad_norm"],
                                                          rel=1e-5)
        assert got["step3"]["lr"] == reference["step3"]["lr"]


def test_planner_counts_every_rank(runs, tiny_moe_dir):
    saved, resumed = runs
    spec = read_hf_config(tiny_moe_dir)
    reports = [("tp2ep2", rank["params"]) for rank in saved]
    reports += [(layout, rank[layout]["params"]) for rank in resumed for layout in RESUMED]
    for layout, got in reports:
        parallel = ParallelConfig(**LAYOUTS[layout])
        padded = padded_vocab_size(spec.vocab_size, 128, parallel.tp)
        planned = rank_params(spec, parallel, padded, got["stage"])
        assert (planned.dense, planned.expert) == (got["dense"], got["expert"]), layout
