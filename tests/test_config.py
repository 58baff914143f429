"""Recipe loading: overrides, and a clear error for each kind of bad input."""

import pytest

from mopd_megatron.config import RecipeError, load_recipe
from mopd_megatron.student.layout import validate_layout

GOOD = """
model: {hf_path: /models/student}
parallel: {tp: 2, micro_batch_size: 4}
optimizer: {lr: 3e-4}
data: {train_files: [train.jsonl], domain_weights: {add: 0.5, rev: 0.5}}
teachers:
  teachers:
    - {name: arithmetic, domains: [add], model_path: /models/add}
    - {name: strings, domains: [rev], url: "http://127.0.0.1:30001", engine: url}
"""


@pytest.fixture
def recipe_file(tmp_path):
    def write(text=GOOD):
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
        return path

    return write


def test_good_recipe_and_overrides(recipe_file):
    recipe = load_recipe(
        recipe_file(), ["parallel.ep=2", "algorithm.loss=topk", "optimizer.lr=1e-4"]
    )
    assert recipe.parallel.tp == 2 and recipe.parallel.ep == 2
    assert recipe.optimizer.lr == pytest.approx(1e-4) and isinstance(recipe.optimizer.lr, float)
    assert recipe.algorithm.loss == "topk"
    assert [t.name for t in recipe.teachers.teachers] == ["arithmetic", "strings"]
    assert recipe.parallel.use_sequence_parallel  # on by default when tp > 1


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("parallel: {tp: 2,", "parallel: {tpp: 2,"),
            "unknown key 'parallel.tpp'; did you mean 'tp'?",
        ),
        (("{lr: 3e-4}", "{lr: fast}"), "'optimizer.lr' must be float, got 'fast'"),
        (
            ("micro_batch_size: 4", "micro_batch_size: 4.5"),
            "'parallel.micro_batch_size' must be int",
        ),
        (
            ("model: {hf_path: /models/student}", "model: {}"),
            "missing required value 'model.hf_path'",
        ),
        (
            ('url: "http://127.0.0.1:30001", ', ""),
            "missing required value 'teachers.teachers[1].url'",
        ),
        (("domains: [rev]", "domains: [add]"), "domain 'add' is served by both"),
        (("  teachers:\n", "  top_k: 8\n  teachers:\n"), "unknown key 'teachers.top_k'"),
    ],
)
def test_bad_recipes_name_the_file_and_key(recipe_file, change, message):
    path = recipe_file(GOOD.replace(*change))
    if message is None:
        load_recipe(path)
        return
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_outcome_only_loss_needs_several_samples_per_prompt(recipe_file):
    with pytest.raises(RecipeError, match="'grpo' needs rollout.n_samples_per_prompt >= 2"):
        load_recipe(recipe_file(), ["algorithm.loss=grpo"])
    load_recipe(recipe_file(), ["algorithm.loss=grpo", "rollout.n_samples_per_prompt=4"])


def test_missing_file_and_bad_override(tmp_path, recipe_file):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        load_recipe(recipe_file(), ["parallel.tp"])


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(tp=3), 3, "4 attention heads are not divisible by tp = 3"),
        (dict(tp=2), 3, "world size 3 is not divisible by tp*pp*cp = 2"),
        (dict(ep=3), 3, "4 experts are not divisible by ep = 3"),
        (
            dict(tp=2, sequence_parallel=False),
            2,
            "MoE with tp > 1 needs parallel.sequence_parallel",
        ),
        (dict(pp=3), 3, "4 layers are not divisible by pp = 3"),
    ],
)
def test_impossible_layouts(recipe_file, layout, world, message):
    recipe = load_recipe(recipe_file(), [f"parallel.{k}={v}" for k, v in layout.items()])
    with pytest.raises(RecipeError, match="impossible parallel layout") as err:
        validate_layout(
            recipe.parallel,
            world,
            num_layers=4,
            num_attention_heads=4,
            num_query_groups=2,
            num_experts=4,
            source=recipe.source,
        )
    assert message in str(err.value)


def test_typed_edits_and_saved_recipes_round_trip(recipe_file, tmp_path):
    """Experiments and the demo build runs with `edit_recipe` and save them: the saved file
    loads back to the same recipe, and a misspelt field is an error, not a silent no-op."""
    from mopd_megatron.config import edit_recipe, save_recipe

    recipe = edit_recipe(load_recipe(recipe_file()), algorithm={"loss": "sft"},
                         rollout={"source": "teacher_samples", "teacher_sample_prompts": 8})
    assert load_recipe(save_recipe(recipe, tmp_path / "saved.yaml")) == recipe
    with pytest.raises(TypeError):
        edit_recipe(recipe, optimizer={"learning_rate": 1e-4})
    with pytest.raises(RecipeError, match="teacher_samples"):
        edit_recipe(recipe, algorithm={"loss": "pg"})  # validated again after the edit
