"""MOPD advantages, IcePop, batch alignment and losses against hand-computed values and torch."""

import math

import pytest
import torch
import torch.nn.functional as F

from mopd_megatron.config import AlgorithmConfig
from mopd_megatron.mopd.advantages import grpo_advantages, teacher_advantages
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.mopd.icepop import icepop_weights
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.trajectory import Trajectory


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3]), torch.tensor([0, 0, 1, 1, 2]))
    s = 1 / math.sqrt(2)  # group 0: mean 0.5, unbiased std sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([s, -s, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_teacher_advantage_is_clipped_and_detached():
    student = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = teacher_advantages(torch.tensor([-10.0, -1.0, 9.0]), student, clip=5.0)
    assert torch.equal(adv, torch.tensor([-5.0, 1.0, 5.0]))
    assert not adv.requires_grad


def test_icepop_gate_by_hand():
    behaviour = torch.zeros(4)
    train = torch.log(torch.tensor([0.4, 1.0, 1.9, 3.0]))
    w, gated = icepop_weights(train, behaviour, low=0.5, high=2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 1.9, 0.0]))
    assert gated.tolist() == [True, False, False, True]


def _trajectories(vocab: int, k: int = 0):
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for i, (n_prompt, n_resp) in enumerate([(3, 4), (2, 2), (4, 3)]):
        ids = torch.randint(3, vocab, (n_prompt + n_resp,), generator=gen).tolist()
        traj = Trajectory.single_turn(
            ids[:n_prompt],
            ids[n_prompt:],
            (-torch.rand(n_resp, generator=gen)).tolist(),
            domain=["add", "rev"][i % 2],
            group=i // 2,
            reward=float(i % 2),
        )
        traj.teacher_logprobs = (-3 * torch.rand(len(ids), generator=gen)).tolist()
        if k:
            traj.teacher_topk_ids = [torch.randperm(vocab, generator=gen)[:k].tolist() for _ in ids]
            traj.teacher_topk_logprobs = [
                F.log_softmax(torch.randn(vocab, generator=gen), -1)[row].tolist()
                for row in traj.teacher_topk_ids
            ]
        trajs.append(traj)
    return trajs


def test_build_batch_aligns_every_field_with_the_next_token():
    trajs = _trajectories(vocab=20, k=3)
    batch = build_batch(trajs, pad_id=0, domains=["add", "rev"], topk=3)
    b = 0
    traj = trajs[b]
    for t in range(len(traj.token_ids) - 1):
        assert batch["targets"][b, t] == traj.token_ids[t + 1]
        assert batch["loss_mask"][b, t] == traj.loss_mask[t + 1]
        assert batch["behaviour_logprobs"][b, t] == pytest.approx(traj.behaviour_logprobs[t + 1])
        assert batch["teacher_logprobs"][b, t] == pytest.approx(traj.teacher_logprobs[t + 1])
        assert batch["teacher_topk_ids"][b, t].tolist() == traj.teacher_topk_ids[t + 1]
    assert batch["loss_mask"][b].sum() == traj.num_generated
    assert batch["domain_ids"].tolist() == [0, 1, 0]
    assert batch["loss_mask"][1, len(trajs[1].token_ids) - 1 :].sum() == 0  # padding


def _torch_pg_loss(logits, batch, cfg):
    """The MOPD policy-gradient loss written directly with autograd, one sequence at a time."""
    logprob = torch.gather(F.log_softmax(logits, -1), -1, batch["targets"][..., None])[..., 0]
    total = 0.0
    for b in range(logits.shape[0]):
        mask = batch["loss_mask"][b]
        ratio = torch.exp(logprob[b].detach() - batch["behaviour_logprobs"][b])
        w = torch.where((ratio >= cfg.icepop_low) & (ratio <= cfg.icepop_high), ratio, 0.0)
        adv = batch["teacher_logprobs"][b] - logprob[b].detach()
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
        adv = adv + cfg.orm_coef * batch["orm_advantages"][b]
        total = total - (w * adv * logprob[b] * mask).sum() / mask.sum()
    return total


def _loss(logits, batch, cfg, vocab):
    return build_objective(cfg, LossContext(vocab_size=vocab, num_domains=2))(logits, batch)


@pytest.mark.parametrize("orm_coef", [0.0, 0.5])
def test_pg_loss_and_gradient_match_direct_autograd(orm_coef):
    vocab = 20
    batch = build_batch(_trajectories(vocab), pad_id=0, domains=["add", "rev"])
    cfg = AlgorithmConfig(loss="pg", orm_coef=orm_coef, icepop_low=0.2, icepop_high=5.0)
    logits = torch.randn(*batch["tokens"].shape, vocab, dtype=torch.float64, requires_grad=True)
    loss_sum, n_seq, metrics = _loss(logits, batch, cfg, vocab)
    expected = _torch_pg_loss(logits, batch, cfg)
    assert n_seq == 3
    torch.testing.assert_close(loss_sum, expected)
    (grad,) = torch.autograd.grad(loss_sum, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert metrics["tokens"] == 9 and metrics["tokens/0"] + metrics["tokens/1"] == 9


def test_topk_loss_with_whole_vocabulary_is_exact_reverse_kl():
    vocab = 12
    trajs = _trajectories(vocab, k=vocab)
    batch = build_batch(trajs, pad_id=0, domains=["add", "rev"], topk=vocab)
    cfg = AlgorithmConfig(loss="topk", topk=vocab, icepop_low=1e-6, icepop_high=1e6)
    logits = torch.randn(*batch["tokens"].shape, vocab, dtype=torch.float64, requires_grad=True)
    loss_sum, _, _ = _loss(logits, batch, cfg, vocab)

    log_p = F.log_softmax(logits, -1)
    ids, lps = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"].double()
    padded = ids < 0  # positions past the end: give them a uniform teacher (they are masked)
    ids = torch.where(padded, torch.arange(vocab).expand_as(ids), ids)
    lps = torch.where(padded, torch.full_like(lps, -math.log(vocab)), lps)
    teacher = torch.empty_like(log_p).scatter(-1, ids, lps)
    rkl = (log_p.exp() * (log_p - teacher)).sum(-1)  # KL(p||q) per position
    ratio = torch.exp(
        torch.gather(log_p, -1, batch["targets"][..., None])[..., 0].detach()
        - batch["behaviour_logprobs"]
    )
    mask = batch["loss_mask"]
    expected = ((ratio * rkl * mask).sum(-1) / mask.sum(-1)).sum()
    torch.testing.assert_close(loss_sum, expected)
    (grad,) = torch.autograd.grad(loss_sum, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_grpo_loss_uses_outcome_advantages_only():
    vocab = 20
    trajs = _trajectories(vocab)
    for traj in trajs:
        traj.teacher_logprobs = []  # the RL baselines query no teacher
    batch = build_batch(trajs, pad_id=0, domains=["add", "rev"])
    cfg = AlgorithmConfig(loss="grpo", icepop_low=1e-6, icepop_high=1e6)
    logits = torch.randn(*batch["tokens"].shape, vocab, dtype=torch.float64, requires_grad=True)
    loss_sum, n_seq, metrics = _loss(logits, batch, cfg, vocab)
    logprob = torch.gather(F.log_softmax(logits, -1), -1, batch["targets"][..., None])[..., 0]
    ratio = torch.exp(logprob.detach() - batch["behaviour_logprobs"])
    mask = batch["loss_mask"]
    per_token = -ratio * batch["orm_advantages"][:, None] * logprob
    expected = ((per_token * mask).sum(-1) / mask.sum(-1)).sum()
    torch.testing.assert_close(loss_sum, expected)
    assert metrics["kl_sum"] == 0
