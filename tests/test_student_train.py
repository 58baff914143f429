"""Student training step and forward: layout invariance, transformers parity, batch helpers.

One 4-rank launch runs two Adam steps (clip 1.0, weight decay, warm-up + cosine) of the
tiny MoE student at DP4, TP2+SP, PP2 (1F1B), EP2 and TP2×EP2, each with a different
micro-batch count (one ragged). Every layout must give the loss, grad norm and updated
weights of the others, every replica of every weight must agree (expert copies under
TP2+SP with ETP=1 drift apart when their gradients skip the expert data-parallel group),
and forward_logprobs must equal transformers' log-softmax at the targets.
"""

import pytest
import torch
from dist_scripts import train_common as tc
from multirank import run_torchrun

REFERENCE = "dp4"


@pytest.fixture(scope="module")
def layouts(tiny_moe_dir):
    reports = run_torchrun("train_layouts.py", 4, "--hf", str(tiny_moe_dir),
                           "--layouts", ",".join(tc.LAYOUTS))
    return reports


@pytest.fixture(scope="module")
def hf_ref(tiny_moe_dir):
    return tc.hf_reference(tiny_moe_dir, tc.toy_batch())


def _steps(result, key):
    return torch.tensor([step[key] for step in result["steps"]], dtype=torch.float64)


@pytest.mark.parametrize("name", [n for n in tc.LAYOUTS if n != REFERENCE])
def test_step_is_layout_invariant(layouts, name):
    ref, got = layouts[0][REFERENCE], layouts[0][name]
    for key in ("loss", "grad_norm", "entropy_sum"):
        torch.testing.assert_close(_steps(got, key), _steps(ref, key), rtol=1e-5, atol=1e-5)
    for key in ("lr", "num_units", "tokens", "update_successful"):
        assert _steps(got, key).tolist() == _steps(ref, key).tolist(), key
    torch.testing.assert_close(torch.tensor(got["weights"]), torch.tensor(ref["weights"]),
                               rtol=0, atol=1e-5)


def test_no_replica_drifts(layouts):
    assert {name: r["replica_max_diff"] for name, r in layouts[0].items()} == dict.fromkeys(
        tc.LAYOUTS, 0.0
    )


def test_metrics_reach_every_rank(layouts):
    for rank_report in layouts[1:]:
        for name, result in rank_report.items():
            for key in ("loss", "grad_norm", "num_units", "tokens", "lr"):
                assert _steps(result, key).tolist() == _steps(layouts[0][name], key).tolist()


def test_loss_and_schedule_by_hand(layouts, hf_ref):
    first = layouts[0][REFERENCE]["steps"][0]
    assert first["loss"] == pytest.approx(float(hf_ref["loss"]), rel=1e-5)
    assert first["num_units"] == 7 and first["tokens"] == tc.toy_batch()["loss_mask"].sum()
    # warm-up of 1 step from lr/2, then cosine from 1e-3 towards 1e-4 over 10 steps
    assert _steps(layouts[0][REFERENCE], "lr").tolist() == pytest.approx([5e-4, 1e-3])


@pytest.mark.parametrize("name", list(tc.LAYOUTS))
def test_forward_logprobs_match_transformers(layouts, hf_ref, name):
    for rank_report in layouts:
        for key in ("logprob", "entropy"):
            got = torch.tensor(rank_report[name][key])
            torch.testing.assert_close(got, hf_ref[key], rtol=0, atol=1e-4)


def test_targets_and_padding():
    from mopd_megatron.student.forward import next_token_targets, pad_sequence

    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    assert next_token_targets(tokens).tolist() == [[6, 7, 0], [9, 0, 0]]
    batch = {"tokens": tokens, "topk": torch.ones(2, 3, 4), "per_seq": torch.ones(2)}
    padded = pad_sequence(batch, 4)
    assert padded["tokens"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert padded["topk"].shape == (2, 4, 4) and padded["topk"][:, 3].eq(0).all()
    assert padded["per_seq"] is batch["per_seq"]
    assert pad_sequence(batch, 3) is batch
