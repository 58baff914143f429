"""The frontier recipes: they load, the planner says they fit, one rank of every pipeline stage
built on the meta device at the recipe's layout has the planned parameter count, and their
SLURM dry runs give every node its command."""

import argparse
from pathlib import Path

import pytest

from mopd_megatron.config import load_recipe
from mopd_megatron.launch import cli
from mopd_megatron.plan.meta import meta_rank_params
from mopd_megatron.plan.planner import make_plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CASES = {
    "qwen3_30b_a3b_mopd.yaml": RECIPES / "models" / "qwen3_30b_a3b",
    "mimo_v2_flash_mopd.yaml": RECIPES / "models" / "mimo_v2_flash_shaped",
}


@pytest.fixture(scope="module", params=sorted(CASES))
def planned(request):
    recipe = load_recipe(RECIPES / request.param)
    return request.param, make_plan(recipe, str(CASES[request.param]))


def test_plan_fits_and_meta_build_agrees(planned):
    _, plan = planned
    assert plan.ok, plan.problems
    for stage in plan.stages:
        assert stage.total <= plan.usable_bytes
    p = plan.recipe.parallel
    built = meta_rank_params(plan.spec, plan.recipe.model, p, plan.shape.world_size,
                             plan.padded_vocab)
    assert built == [stage.params for stage in plan.stages]


def test_qwen3_recipe_is_the_papers_setting():
    recipe = load_recipe(RECIPES / "qwen3_30b_a3b_mopd.yaml")
    assert recipe.data.prompts_per_step == 2048 and recipe.rollout.n_samples_per_prompt == 1
    assert recipe.data.domain_weights == {"math": 0.35, "instruction_following": 0.35,
                                          "code": 0.30}
    assert [t.name for t in recipe.teachers.teachers] == ["math", "instruction_following", "code"]
    assert (recipe.algorithm.loss, recipe.algorithm.adv_clip) == ("pg", 5.0)
    assert recipe.data.max_prompt_tokens + recipe.rollout.max_new_tokens == 32768


@pytest.mark.parametrize("name, nodes, student_nodes", [
    ("qwen3_30b_a3b_mopd.yaml", 7, 4), ("mimo_v2_flash_mopd.yaml", 23, 16)])
def test_slurm_dry_run(name, nodes, student_nodes, capsys):
    parser = cli.configure(argparse.ArgumentParser())
    args = parser.parse_args([str(RECIPES / name), "--model-config", str(CASES[name]),
                              "--slurm", "--dry-run"])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("  student:  env ") == student_nodes
    assert f"--nnodes={student_nodes} --node-rank={student_nodes - 1} " in out
    assert f"[node {nodes - 1}: node-{nodes - 1}, teachers group]" in out
    assert "-m sglang.launch_server" in out and "engine url http://node-" in out
