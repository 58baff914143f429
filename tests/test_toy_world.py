"""Toy world at a tiny setting: folders load in transformers, evaluation scores, cache, seed."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd_megatron.data import load_prompts, tokenize_records
from mopd_megatron.demo.evaluate import accuracy_by_domain, evaluate, generate_responses
from mopd_megatron.demo.tasks import make_example, make_splits
from mopd_megatron.demo.toy_world import WorldSettings, build_world, load_world

TINY = {
    "domains": ["add", "rev"],
    "n_train": 30,
    "n_dev": 8,
    "n_test": 8,
    "batch_size": 8,
    "check_every": 2,
    "base_max_steps": 4,
    "teacher_check_every": 1,
    "teacher_max_steps": 2,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared CPU, two-thread barriers wait for time slices (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return build_world(tmp_path_factory.mktemp("world"), WorldSettings(seed=1, **TINY))


def test_examples_are_well_formed():
    rng = random.Random(0)
    assert make_example("rev", random.Random(5))[0].startswith("rev ")
    for domain in ("add", "rev", "sort"):
        for _ in range(50):
            prompt, answer = make_example(domain, rng)
            assert prompt.endswith("=") and 1 <= len(answer) <= 8
    prompt, answer = make_example("sort", random.Random(1))
    assert answer == "".join(sorted(prompt[5:-1]))


def test_splits_are_disjoint():
    splits = make_splits(["add", "sort"], seed=0, n_train=300, n_dev=50, n_test=50)
    prompts = {name: {r.prompt for r in records} for name, records in splits.items()}
    assert len(prompts["test"]) == 100 and len(prompts["dev"]) == 100
    assert not prompts["train"] & (prompts["dev"] | prompts["test"])
    assert not prompts["dev"] & prompts["test"]


def test_world_folders_load_in_transformers(world):
    info = json.loads((world.root / "world.json").read_text())
    assert world.domains == ["add", "rev"] and set(world.teacher_paths) == {"add", "rev"}
    for path in [world.base_path, *world.teacher_paths.values()]:
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "qwen3_moe" and model.config.tie_word_embeddings
        assert AutoTokenizer.from_pretrained(path).eos_token == "<eos>"
        config = json.loads((path / "config.json").read_text())
        assert config["num_experts"] == config["num_local_experts"] == 4
    for name in ("base", "add", "rev"):
        for split in ("dev", "test"):
            accuracy = world.accuracy[name][split]
            assert set(accuracy) == {"add", "rev"}
            assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert info["build_seconds"] > 0
    assert len(load_prompts(world.test_file)) == 16
    assert {r.domain for r in load_prompts(world.train_file)} == {"add", "rev"}


def test_cache_reuses_and_seed_decides(world, tmp_path):
    weights = world.base_path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = build_world(world.root, WorldSettings(seed=1, **TINY))
    assert weights.stat().st_mtime_ns == stamp and again == load_world(world.root)
    same = build_world(tmp_path / "same", WorldSettings(seed=1, **TINY))
    for name, tensor in load_file(weights).items():
        assert torch.equal(tensor, load_file(same.base_path / "model.safetensors")[name]), name


def test_evaluator_scores_answers(world):
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer_path)
    records = tokenize_records(load_prompts(world.dev_file), tokenizer)
    assert accuracy_by_domain(records, [r.answer for r in records]) == {"add": 1.0, "rev": 1.0}
    assert accuracy_by_domain(records, [r.answer + "1" for r in records]) == {
        "add": 0.0,
        "rev": 0.0,
    }
    accuracy = evaluate(world.base_path, records, batch_size=5)
    assert set(accuracy) == {"add", "rev"}
    model = AutoModelForCausalLM.from_pretrained(world.base_path)
    batched = generate_responses(model, tokenizer, records, batch_size=len(records))
    single = [generate_responses(model, tokenizer, [r], batch_size=1)[0] for r in records[:4]]
    assert batched[:4] == single
    sampled = generate_responses(model, tokenizer, records, greedy=False, seed=3)
    assert sampled == generate_responses(model, tokenizer, records, greedy=False, seed=3)
