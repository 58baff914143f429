"""Teacher payloads on the embedded engine over real HTTP, against transformers.

`return_hidden_states` (post-norm final hidden states, SGLang's layout: the prefill as one
[positions][H] element, then one row per decode step) and `token_ids_logprob` (the requested
ids' log-probs at every position, beside `input_top_logprobs`), and the client's
hidden-state scoring as the trainer receives it (the refusal without
--enable-return-hidden-states is in test_engine_sglang_parity.py); then the trainer side, the
recipe checks and the planner.
"""

import json
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd_megatron.config import EngineConfig
from mopd_megatron.rollout import start_engine

SEQ = [1, 5, 9, 13, 20, 7, 3, 11, 30, 12]


@pytest.fixture(scope="module")
def served(tiny_moe_dir, tmp_path_factory):
    cfg = EngineConfig(engine="local", extra_args=["--enable-return-hidden-states"])
    with start_engine(cfg, str(tiny_moe_dir), tmp_path_factory.mktemp("logs"), "payloads") as h:
        yield h


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()


def post(url, body):
    request = urllib.request.Request(url + "/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def hf_forward(model, seq):
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_hidden_states=True)
    return out.hidden_states[-1][0], torch.log_softmax(out.logits[0].float(), -1)


def test_hidden_states_equal_transformers_final_hidden_state(served, reference):
    """Prefill rows = HF's last `output_hidden_states` entry (after the final norm, the LM
    head's input); the decode rows are the states of the fed-back tokens."""
    status, res = post(served.url, {"input_ids": SEQ, "return_hidden_states": True,
                                    "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200, res
    hidden, out = res["meta_info"]["hidden_states"], res["output_ids"]
    assert len(hidden) == 1 + len(out) - 1 and len(hidden[0]) == len(SEQ)
    expected, _ = hf_forward(reference, SEQ + out)
    got = torch.tensor(hidden[0] + hidden[1:])
    torch.testing.assert_close(got, expected[:len(SEQ) + len(out) - 1], atol=1e-4, rtol=1e-4)
    logits = got @ reference.lm_head.weight.detach().T
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(torch.tensor([SEQ + out])).logits[0, :-1],
                                   atol=1e-4, rtol=1e-4)


def test_token_ids_logprob_equals_transformers_logprobs(served, reference):
    ids = [7, 0, 33, 7]
    status, res = post(served.url, {
        "input_ids": SEQ, "return_logprob": True, "logprob_start_len": 2, "token_ids_logprob": ids,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert status == 200, res
    meta = res["meta_info"]
    rows = meta["input_token_ids_logprobs"]
    assert rows[0] is None and len(rows) == len(SEQ) - 2
    _, logp = hf_forward(reference, SEQ)
    for t, row in enumerate(rows[1:], start=2):
        assert [e[1] for e in row] == ids
        torch.testing.assert_close(torch.tensor([e[0] for e in row]), logp[t, ids],
                                   atol=1e-4, rtol=1e-4)
    assert [len(r) for r in meta["output_token_ids_logprobs"]] == [len(ids)] * 2


def test_client_scores_carry_hidden_states_of_the_response_positions(served, reference):
    """`ascore(hidden_dtype=...)`: rows of positions r-1..len-2, i.e. those whose logits give
    `token_logprobs`, in the requested dtype."""
    start = 6
    (scores,) = served.client.score([SEQ], [start], hidden_dtype=torch.bfloat16)
    assert scores.hidden_states.dtype == torch.bfloat16
    assert scores.hidden_states.shape[0] == len(scores.token_logprobs) == len(SEQ) - start
    expected, _ = hf_forward(reference, SEQ)
    torch.testing.assert_close(scores.hidden_states, expected[start - 1:-1].bfloat16())
    from_hidden = torch.log_softmax(
        scores.hidden_states.float() @ reference.lm_head.weight.detach().T, -1)
    picked = from_hidden.gather(1, torch.tensor(SEQ[start:])[:, None])[:, 0]
    torch.testing.assert_close(picked, torch.tensor(scores.token_logprobs), atol=0.05, rtol=0)


@pytest.mark.parametrize("body, message", [
    ({"token_ids_logprob": [3, 99]}, "out-of-vocabulary token id 99"),
    ({"token_ids_logprob": [[3], [4]]}, "token_ids_logprob has 2 entries for 1 sequences"),
    ({"return_hidden_states": [True, False]}, "equal to the batch size"),
])
def test_bad_payload_requests_get_sglangs_400(served, body, message):
    status, reply = post(served.url, {"input_ids": SEQ, **body})
    assert status == 400 and message in reply["error"]["message"]


# -- the trainer side: served hidden states -> LM-head shards -> the fused KL ---------------

def served_batch(client, student_dir, teacher_dir) -> dict:
    """The loss batch of 6 toy rollouts scored by the served teacher (hidden states in fp32),
    through `Trajectory` and `build_batch` as in training; μθ is the student's own log-prob."""
    from mopd_megatron.mopd.batch import build_batch
    from mopd_megatron.trajectory import Trajectory

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 42, (n,), generator=gen).tolist() for n in (3, 5, 2, 4, 6, 3)]
    outputs = [torch.randint(3, 42, (n,), generator=gen).tolist() for n in (6, 4, 7, 5, 3, 6)]
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    trajs = []
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        with torch.no_grad():
            logp = torch.log_softmax(student(torch.tensor([p + o])).logits[0, :-1], -1)
        mu = logp.gather(1, torch.tensor(p + o)[1:, None])[:, 0].tolist()
        trajs.append(Trajectory.single_turn(p, o, mu[len(p) - 1:], domain="toy", group=i))
    scores = client.score([t.token_ids for t in trajs], [len(p) for p in prompts],
                          hidden_dtype=torch.float32)
    for traj, s in zip(trajs, scores):
        traj.teacher_logprobs = [0.0] * traj.response_start + s.token_logprobs
        traj.teacher_hidden = s.hidden_states
    return build_batch(trajs, pad_id=0, domains=["toy"])


def test_full_vocab_kl_from_served_hidden_states_equals_local_teachers(tiny_moe_dir, tmp_path):
    """Same teacher, same rollouts: one training step with `full_rkl` from the served teacher's
    hidden states through its LM-head shard equals the step with the teacher model run in the
    trainer, at TP1 and TP2+SP (and `forward_kl` at TP2+SP), in loss, KL and updated weights
    (fp32 tolerance)."""
    from multirank import run_torchrun
    from tiny_models import make_tiny_hf_model

    teacher_dir = make_tiny_hf_model(tmp_path / "teacher", "qwen3_moe", seed=1)
    cfg = EngineConfig(engine="local", extra_args=["--enable-return-hidden-states"])
    with start_engine(cfg, str(teacher_dir), tmp_path, "teacher") as handle:
        batch = served_batch(handle.client, tiny_moe_dir, teacher_dir)
    torch.save(batch, tmp_path / "batch.pt")
    ranks = run_torchrun("served_teacher_kl.py", 2, "--student", str(tiny_moe_dir),
                         "--teacher", str(teacher_dir), "--batch", str(tmp_path / "batch.pt"))
    for rank in ranks:
        for layout, r in rank.items():
            assert r["served_loss"] == pytest.approx(r["local_loss"], rel=1e-5), layout
            assert r["served_kl"] == pytest.approx(r["local_kl"], rel=1e-5), layout
            assert r["local_loss"] > 0.1 and r["update"] > 1e-4, (layout, r)  # a real step
            assert r["weight_diff"] < 1e-3 * r["update"], (layout, r)
    # the head shard: [V_padded / tp, H] fp32 (42 tokens padded to 128 * tp, H = 48)
    assert {case: r["head_bytes"] for case, r in ranks[0].items()} == dict.fromkeys(
        ["full_rkl/tp1", "full_rkl/tp2sp", "forward_kl/tp2sp"], 128 * 48 * 4)


def test_teacher_with_another_vocabulary_is_refused(tiny_moe_dir, tmp_path):
    from mopd_megatron.student.teacher_heads import load_head_shard

    with pytest.raises(ValueError, match=r"teacher 'big' .* vocabulary of 42 tokens, the "
                                         r"student 50"):
        load_head_shard("big", tiny_moe_dir, vocab_size=50, padded_vocab=128, rank=0, size=1)


# -- the recipe and the planner -------------------------------------------------------------

RECIPE = """
model: {{hf_path: {student}}}
parallel: {{tp: 2, world_size: 2, micro_batch_size: 2}}
teachers:
  teachers:
    - {{name: t, domains: [toy], model_path: {teacher}, payload: {payload}}}
algorithm: {{loss: {loss}, topk: 8}}
data: {{train_files: [t.jsonl], prompts_per_step: 4}}
rollout: {{max_new_tokens: 10}}
"""


def recipe(tmp_path, student, teacher="", payload="hidden_states", loss="full_rkl"):
    from mopd_megatron.config import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(student=student, teacher=teacher or student, payload=payload,
                                  loss=loss))
    return load_recipe(path)


@pytest.mark.parametrize("payload, loss, message", [
    ("hidden_states", "pg", (r"payload 'hidden_states' \(teacher 't'\) does not feed "
                             r"algorithm.loss 'pg', which takes \['sampled'\]")),
    ("topk", "full_rkl", r"takes \['local', 'hidden_states'\]"),
    ("student_topk", "full_rkl", (r"teachers.teachers\[0\].payload 'student_topk' \(teacher "
                                  r"'t'\) does not feed algorithm.loss 'full_rkl'")),
])
def test_payload_the_loss_cannot_use_is_refused(tiny_moe_dir, tmp_path, payload, loss, message):
    from mopd_megatron.config import RecipeError

    with pytest.raises(RecipeError, match=message):
        recipe(tmp_path, tiny_moe_dir, payload=payload, loss=loss)


def test_launcher_flag_and_objective_needs_follow_the_payload(tiny_moe_dir, tmp_path):
    from mopd_megatron.mopd.objectives import LossContext, build_objective
    from mopd_megatron.rollout.sglang import launch_command

    r = recipe(tmp_path, tiny_moe_dir)
    (teacher,) = r.teachers.teachers
    assert "--enable-return-hidden-states" in launch_command(teacher, str(tiny_moe_dir), 1)
    ctx = LossContext(vocab_size=42, teacher_payload="hidden_states")
    needs = build_objective(r.algorithm, ctx).needs
    assert needs.teacher_hidden_states and needs.queries_teachers
    assert not needs.local_teacher_logits
    local = build_objective(r.algorithm, LossContext(vocab_size=42)).needs
    assert local.local_teacher_logits and not local.queries_teachers


def test_student_topk_is_a_payload_of_the_topk_loss(tiny_moe_dir, tmp_path):
    """Accepted for `topk`: the objective asks the rollout engine for its top-k (k capped at
    the vocabulary) instead of the teacher's, and the batch carries k entries per position."""
    from mopd_megatron.mopd.objectives import LossContext, build_objective

    r = recipe(tmp_path, tiny_moe_dir, payload="student_topk", loss="topk")
    ctx = LossContext(vocab_size=42, teacher_payload="student_topk")
    needs = build_objective(r.algorithm, ctx).needs
    assert (needs.student_top_k, needs.teacher_top_k, needs.topk_width) == (8, 0, 8)
    assert needs.queries_teachers and not needs.teacher_hidden_states


def test_planner_counts_the_payload_against_topk_and_local_teachers(tiny_moe_dir, tmp_path):
    """Per scored token: hidden states H * 2 (bf16) against 4 and 12 k; in the trainer the
    fp32 head shard and a micro-batch of hidden states, against the whole local teacher."""
    from mopd_megatron.plan.planner import make_plan

    hidden = make_plan(recipe(tmp_path, tiny_moe_dir)).payload
    assert hidden.per_token == {"sampled": 4, "topk": 12 * 8, "student_topk": 12 * 8,
                                "hidden_states": 48 * 2}
    assert hidden.step_bytes == 4 * 10 * 48 * 2  # 4 sequences x 10 new tokens
    head = 256 // 2 * 48 * 4  # 42 tokens padded to 128 * tp, split over tp = 2
    seq_len = 1024 + 10  # data.max_prompt_tokens + rollout.max_new_tokens
    assert hidden.trainer_bytes == head + 2 * seq_len * 48 * 2  # a micro-batch of 2
    local = make_plan(recipe(tmp_path, tiny_moe_dir, payload="local")).payload
    assert local.step_bytes == 0 and local.trainer_bytes > hidden.trainer_bytes
