"""The open-answer toy world: verifiers accept every valid answer and reject the rest, GRPO
teachers move toward rewarded answers, and the world builds with them."""

import itertools
import json
import random

import pytest
import torch

from mopd_megatron.data import PromptRecord, load_prompts
from mopd_megatron.demo.models import new_student
from mopd_megatron.demo.rl_teacher import group_advantages, policy_loss
from mopd_megatron.demo.settings import WORLDS, WorldSettings
from mopd_megatron.demo.tasks import make_example, max_new_tokens, toy_domain
from mopd_megatron.demo.tokenizer import build_char_tokenizer
from mopd_megatron.demo.toy_world import build_world
from mopd_megatron.mopd.rewards import score

OPEN = WORLDS["open"]["domains"]


def _score(domain: str, prompt: str, response: str) -> float:
    record = PromptRecord(domain=domain, prompt=prompt, verifier=toy_domain(domain).verifier)
    return score(record, response)


def test_every_generated_answer_passes_and_fits():
    rng = random.Random(0)
    for domain in OPEN:
        for _ in range(300):
            prompt, answer = make_example(domain, rng)
            assert _score(domain, prompt, answer) == 1.0, (prompt, answer)
            assert len(answer) + 1 <= toy_domain(domain).max_new_tokens
    assert max_new_tokens(OPEN) == 20


def test_carry_accepts_every_format_and_rejects_false_steps():
    valid = ["85", " 85 ", "7+8=15 4+3+1=8 85", "7+8=15 4+3=7 85", "15+70=85 85", "4+3+1=8 85"]
    for response in valid:
        assert _score("carry", "47+38=", response) == 1.0, response
    invalid = ["84", "", "7+8=14 4+3+1=8 85", "7+8=15 4+3+1=8", "85 7+8=15", "8 5", "85x", "=85"]
    for response in invalid:
        assert _score("carry", "47+38=", response) == 0.0, response
    assert _score("carry", "0+0=", "0+0=0 0+0+0=0 0") == 1.0


def test_spread_accepts_exactly_the_arrangements_without_equal_neighbours():
    letters = "aabbc"
    for perm in set(itertools.permutations(letters)):
        text = "".join(perm)
        ok = all(x != y for x, y in itertools.pairwise(text))
        assert _score("spread", f"spread {letters}=", text) == float(ok), text
        assert _score("spread", f"spread {letters}=", " ".join(text)) == float(ok)
    for response in ["abab", "ababcc", "ababd", ""]:
        assert _score("spread", f"spread {letters}=", response) == 0.0


def test_mix_accepts_exactly_the_interleavings():
    first, second = "ab", "xyz"
    valid = set()
    for slots in itertools.combinations(range(5), 2):
        own, rest = iter(first), iter(second)
        valid.add("".join(next(own) if i in slots else next(rest) for i in range(5)))
    assert len(valid) == 10 and {"abxyz", "xyzab", "axbyz"} <= valid
    for perm in set(itertools.permutations(first + second)):
        text = "".join(perm)
        assert _score("mix", f"mix {first} {second}=", text) == float(text in valid), text
    assert _score("mix", "mix aa ab=", "aaab") == 1.0  # repeated letters: either word may lead
    assert _score("mix", "mix ab xy=", "abxyy") == 0.0


def test_group_advantages_ignore_groups_with_one_reward():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert adv[1].abs().max() == 0.0
    assert adv[0, 0] > 0 > adv[0, 1] and abs(adv[0].sum()) < 1e-5


def test_grpo_step_raises_the_rewarded_answer_and_lowers_the_other():
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = new_student(tokenizer, seed=0)
    ids = tokenizer("spread aab=", add_special_tokens=False)["input_ids"]
    prompt = [tokenizer.bos_token_id, *ids]
    good, bad = ([*tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                 for t in ("aba", "aab"))
    prompts, responses = [prompt, prompt], [good, bad]

    def logp() -> torch.Tensor:
        with torch.no_grad():
            return -torch.stack([policy_loss(model, [p], [r], torch.ones(1), 0)
                                 for p, r in zip(prompts, responses)])

    before = logp()
    advantages = group_advantages(torch.tensor([[1.0, 0.0]])).flatten()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    policy_loss(model, prompts, responses, advantages, tokenizer.pad_token_id).backward()
    optimizer.step()
    after = logp()
    assert after[0] > before[0] and after[1] < before[1]


@pytest.fixture(scope="module")
def open_world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = {"n_train": 30, "n_dev": 8, "n_test": 8, "batch_size": 8, "check_every": 2,
            "base_max_steps": 4, "rl_max_steps": 2, "rl_check_every": 1, "rl_prompts": 2,
            "rl_group": 2, "light_max_steps": 2, "teacher_check_every": 1}
    settings = WorldSettings(**{**WORLDS["open"], **tiny})
    world = build_world(tmp_path_factory.mktemp("open"), settings)
    yield world
    torch.set_num_threads(threads)


def test_open_world_builds_with_light_sft_then_grpo_teachers(open_world):
    info = json.loads((open_world.root / "world.json").read_text())
    assert info["settings"]["teacher_recipe"] == "sft_grpo" and open_world.max_new_tokens == 20
    verifiers = {r.domain: r.verifier for r in load_prompts(open_world.test_file)}
    assert verifiers == {"carry": "worked_sum", "spread": "spread", "mix": "interleaving"}
    for domain in OPEN:
        assert set(open_world.accuracy[domain]["test"]) == set(OPEN)
        assert 1 <= info["models"][domain]["steps"] <= 2 + 2


def test_a_rebuild_with_other_teacher_settings_reuses_the_base(open_world, caplog):
    settings = json.loads((open_world.root / "world.json").read_text())["settings"]
    settings["rl_max_steps"] = 1
    with caplog.at_level("INFO"):
        build_world(open_world.root, WorldSettings(**settings))
    assert "reusing the base" in caplog.text
