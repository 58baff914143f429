"""Rollout routing replay (R3): the student's routers use the engine's experts.

The "engine" is the tiny MoE student with slightly perturbed routers (transformers), so it
routes some tokens to other experts than the trainer would. One 4-rank launch replays its
routes at TP1 (DP4), TP2+SP, PP2 (1F1B, full recompute), EP2 and TP2×EP2; every layout
must give the log-probs, loss and gradient norm of a direct transformers forward with the
routes forced (weights from the live router at the forced experts), replay only where routes
exist (−1 falls back to the live router and is counted), and report the agreement the live
router had with the engine before replay.
"""

import pytest
import torch
from dist_scripts import train_common as tc
from multirank import run_torchrun
from routes_reference import engine_routes, forced_forward

LENGTHS = torch.tensor([11, 9, 7, 11, 5, 10, 8, 6])
NOISE = 0.5
"""Router perturbation of the engine (relative to the mean |router weight|)."""


def _engine(hf_dir):
    """The toy batch's routes as SGLang returns them (none for the last token), one prompt
    route knocked out, and the engine's log-probs."""
    batch = tc.toy_batch()
    routes, logprob = engine_routes(hf_dir, batch["tokens"], NOISE)
    positions = torch.arange(tc.LENGTH)
    routes[positions[None, :] >= LENGTHS[:, None] - 1] = -1
    routes[0, 1] = -1  # a missing route inside a sequence: live router, counted
    return batch, routes, logprob


@pytest.fixture(scope="module")
def engine(tiny_moe_dir):
    return _engine(tiny_moe_dir)


@pytest.fixture(scope="module")
def layouts(tiny_moe_dir, engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("routes") / "routes.pt"
    torch.save(engine[1], path)
    return run_torchrun("routing_replay.py", 4, "--hf", str(tiny_moe_dir), "--routes",
                        str(path), "--layouts", ",".join(tc.LAYOUTS))[0]


@pytest.fixture(scope="module")
def forced(tiny_moe_dir, engine):
    batch, routes, _ = engine
    model, logprob = forced_forward(tiny_moe_dir, batch["tokens"], routes)
    per_seq, units = tc.sequence_losses(logprob, batch)
    loss = per_seq.sum() / units
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()
                           if p.grad is not None]).norm()
    return {"logprob": logprob.detach(), "loss": float(loss), "grad_norm": float(grad_norm)}


@pytest.mark.parametrize("name", list(tc.LAYOUTS))
def test_replay_equals_forced_routes(layouts, forced, name):
    torch.testing.assert_close(torch.tensor(layouts[name]["replayed"]), forced["logprob"],
                               rtol=0, atol=1e-4)
    step = layouts[name]["step"]
    assert step["loss"] == pytest.approx(forced["loss"], rel=1e-5)
    assert step["grad_norm"] == pytest.approx(forced["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("name", list(tc.LAYOUTS))
def test_routes_are_counted(layouts, engine, name):
    batch, routes, _ = engine
    positions = torch.arange(tc.LENGTH)
    last = torch.where(batch["loss_mask"] > 0, positions, -1).max(1).values
    counted = positions[None, :] <= last[:, None]
    layers = routes.shape[2]
    step = layouts[name]["step"]
    assert step["routes"] == counted.sum() * layers
    assert step["routes_replayed"] == step["routes"] - layers  # the knocked-out position
    assert 0.5 < step["routes_agreed"] / step["routes_replayed"] < 1.0  # the engine disagrees
    assert layouts[name]["live_after_step"]


@pytest.mark.parametrize("name", list(tc.LAYOUTS))
def test_a_layer_or_topk_mismatch_names_both(layouts, name):
    assert "4 layers x top-1, the trainer's student has 4 layers x top-2" in (
        layouts[name]["mismatch_error"])


def test_teachers_never_replay(layouts):
    """A local teacher built beside the replaying student routes live: its log-probs are the
    student's without routes (same weights)."""
    result = layouts["dp4"]
    assert result["teacher_replays"] is False
    torch.testing.assert_close(torch.tensor(result["teacher"]), torch.tensor(result["live"]),
                               rtol=0, atol=1e-5)


def test_replay_shrinks_the_logprob_gap(layouts, engine):
    batch, _, engine_logprob = engine
    mask = batch["loss_mask"] > 0
    for result in layouts.values():
        gap = {key: (torch.tensor(result[key]) - engine_logprob)[mask].abs().mean()
               for key in ("live", "replayed")}
        assert gap["replayed"] < 0.8 * gap["live"], gap  # the weights still differ


def test_missing_routes_fall_back_to_the_live_router():
    from megatron.core.transformer.moe.router_replay import (
        RouterReplay,
        RouterReplayAction,
    )

    from mopd_megatron.student.routing_replay import ReplayRoutes

    replay = ReplayRoutes()
    assert replay not in RouterReplay.global_router_replay_instances
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.7, 0.1, 0.3, 0.6]], requires_grad=True)
    replay.set_target_indices(torch.tensor([[-1, -1], [2, 1]], dtype=torch.int8))

    def topk(scores, k, num_groups=None, group_topk=None):
        return torch.topk(scores, k, dim=1)

    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs, indices = replay.get_replay_topk(scores, 2, None, None, topk)
    assert indices.tolist() == [[1, 2], [2, 1]]  # live top-2 where the engine has none
    probs.sum().backward()  # the router keeps its gradient at the replayed experts
    assert scores.grad.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    assert replay.get_replay_topk(scores, 2, None, None, topk)[1].tolist() == indices.tolist()


def test_trajectory_routes_reach_the_batch_compactly():
    from mopd_megatron.mopd.batch import build_batch
    from mopd_megatron.student.forward import pad_sequence
    from mopd_megatron.trajectory import Trajectory, route_dtype

    assert [route_dtype(n) for n in (4, 128, 129, 40000)] == [
        torch.int8, torch.int8, torch.int16, torch.int32]
    routes = torch.tensor([[[0, 1]], [[3, 2]], [[-1, -1]]], dtype=torch.int8)  # [3, 1 layer, 2]
    with_routes = Trajectory.single_turn([5, 6], [7], [-0.1], domain="a", group=0,
                                         routed_experts=routes)
    without = Trajectory.single_turn([5, 6, 7], [8], [-0.2], domain="a", group=1)
    assert Trajectory.from_json(with_routes.to_json()).routed_experts.equal(routes)
    batch = build_batch([with_routes, without], pad_id=0, domains=["a"])
    got = batch["routed_experts"]
    assert got.dtype == torch.int8 and got.shape == (2, 4, 1, 2)
    assert got[0, :3].equal(routes) and (got[0, 3] == -1).all() and (got[1] == -1).all()
    padded = pad_sequence(batch, 3)
    assert (padded["routed_experts"][:, 4:] == -1).all() and (padded["tokens"][:, 4:] == 0).all()


def test_only_the_rollout_engine_is_asked_for_routes():
    from mopd_megatron.config import RolloutConfig, TeacherConfig
    from mopd_megatron.rollout.sglang import launch_command

    flag = "--enable-return-routed-experts"
    assert flag in launch_command(RolloutConfig(engine="sglang"), "m", 1)
    assert flag not in launch_command(RolloutConfig(engine="sglang", routing_replay=False), "m", 1)
    assert flag not in launch_command(TeacherConfig(engine="sglang"), "m", 1)
