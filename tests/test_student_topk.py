"""The `student_topk` teacher payload end to end on the embedded engines, against transformers.

The rollout engine returns its top-k at each sampled position (`top_logprobs_num`); the
teacher is asked, in its one scoring prefill, for `token_ids_logprob` = the union of each
sequence's student top-k ids; the trajectory carries the student's top-k ids and the teacher's
log-probs at exactly those; the `topk` loss then runs over them unchanged. Then the strict
response checks of the new fields.
"""

import pytest
import torch
from tiny_models import make_tiny_hf_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd_megatron.collect import RolloutSettings, collect_trajectories
from mopd_megatron.config import AlgorithmConfig, EngineConfig
from mopd_megatron.data import PromptRecord
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.rollout import start_engine
from mopd_megatron.rollout.transport import run_sync
from mopd_megatron.rollout.types import (
    ResponseError,
    SamplingParams,
    parse_generations,
    parse_scores,
)
from mopd_megatron.teachers.pool import TeacherPool

K, TEMPERATURE = 5, 0.7
PROMPTS = [[1, 5, 9, 13], [20, 7, 3], [11, 30, 12, 4, 8]]


def hf_logits(path, tokens):
    """[B, S, V] the HF model's fp32 logits on right-padded tokens (causal: pads come last)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module")
def collected(tiny_moe_dir, tmp_path_factory):
    """(trajectories, their `topk` batch, HF student logits, HF teacher logits): 3 prompts x
    2 samples through `collect_trajectories` with the `student_topk` settings, over HTTP."""
    logs = tmp_path_factory.mktemp("logs")
    teacher_dir = make_tiny_hf_model(tmp_path_factory.mktemp("teacher"), "qwen3_moe", seed=1)
    records = [PromptRecord(domain="toy", prompt="", answer="x", verifier="exact",
                            prompt_ids=p) for p in PROMPTS]
    settings = RolloutSettings(
        SamplingParams(TEMPERATURE, max_new_tokens=5, sampling_seed=7), n_samples_per_prompt=2,
        chunk_size=3, teacher_top_k=0, student_top_k=K)
    cfg = EngineConfig(engine="local")
    with start_engine(cfg, str(tiny_moe_dir), logs, "rollout", wait=False) as rollout, \
            start_engine(cfg, str(teacher_dir), logs, "teacher", wait=False) as teacher:
        rollout.wait_healthy(300)
        teacher.wait_healthy(300)
        pool = TeacherPool({"t": teacher.client}, {"toy": "t"})
        trajectories = run_sync(collect_trajectories(
            rollout.client, pool, AutoTokenizer.from_pretrained(tiny_moe_dir), records,
            settings))
    batch = build_batch(trajectories, pad_id=0, domains=["toy"], topk=K)
    tokens = batch["tokens"]
    return trajectories, batch, hf_logits(tiny_moe_dir, tokens), hf_logits(teacher_dir, tokens)


def test_student_topk_ids_and_teacher_logprobs_equal_transformers(collected):
    """At every response position: the ids are the student's HF top-k under the sampling
    temperature (best first), the values the HF teacher's log-softmax at exactly those ids."""
    trajectories, _, student, teacher = collected
    assert len(trajectories) == 2 * len(PROMPTS)
    for traj, student_logits, teacher_logits in zip(trajectories, student, teacher):
        start, seq = traj.response_start, traj.token_ids
        assert len(seq) > start
        student_logp = torch.log_softmax(student_logits / TEMPERATURE, -1)
        teacher_logp = torch.log_softmax(teacher_logits, -1)
        assert traj.teacher_topk_ids[:start] == [[]] * start
        for t in range(start, len(seq)):
            ids = traj.teacher_topk_ids[t]
            assert ids == student_logp[t - 1].topk(K).indices.tolist(), (traj.group, t)
            torch.testing.assert_close(torch.tensor(traj.teacher_topk_logprobs[t]),
                                       teacher_logp[t - 1, ids], atol=1e-4, rtol=1e-4)


def test_topk_loss_on_student_topk_equals_direct_formula(collected):
    """The `topk` loss on the batch equals Σ_b mean_t w·Σ_{v∈TopK(μθ)} [p log(p/q) − p + q]
    computed in torch from the HF student's logits (p at the rollout temperature, q the
    teacher's probabilities at the student's ids, w the IcePop weight)."""
    trajectories, batch, logits, _ = collected
    algorithm = AlgorithmConfig(loss="topk", topk=K, orm_coef=0.0)
    ctx = LossContext(vocab_size=42, temperature=TEMPERATURE, teacher_payload="student_topk")
    objective = build_objective(algorithm, ctx)
    assert objective.needs.topk_width == K
    loss, sequences, metrics = objective(logits, batch)

    logp = torch.log_softmax(logits / TEMPERATURE, -1)
    ids, mask = batch["teacher_topk_ids"], batch["loss_mask"]
    p = logp.gather(-1, ids.clamp(min=0)).exp()
    q = batch["teacher_topk_logprobs"].exp()
    kl = torch.where(ids >= 0, p * (p.log() - q.log()) - p + q, 0.0).sum(-1)
    ratio = (logp.gather(-1, batch["targets"][..., None])[..., 0]
             - batch["behaviour_logprobs"]).exp()
    w = torch.where((ratio >= algorithm.icepop_low) & (ratio <= algorithm.icepop_high),
                    ratio, 0.0)
    expected = ((w * kl * mask).sum(-1) / mask.sum(-1)).sum()
    assert (ids[mask.bool()] >= 0).all() and ids.shape[-1] == K
    assert float(expected) > 1e-3  # two different random models: a real divergence
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metrics["kl_sum"], (kl * mask).sum(), atol=1e-5, rtol=1e-4)
    assert int(sequences) == len(trajectories)


# -- strict checks of the new response fields -----------------------------------------------

def entry(logprob, token):
    return [logprob, token, None]


def generation(top_rows):
    return [{"output_ids": [4, 9], "meta_info": {
        "output_token_logprobs": [entry(-0.1, 4), entry(-0.2, 9)],
        "output_top_logprobs": top_rows, "finish_reason": {"type": "length"}}}]


def scored(rows):
    return [{"meta_info": {"input_token_logprobs": [entry(None, 3), entry(-0.5, 4),
                                                    entry(-0.6, 9)],
                           "input_token_ids_logprobs": rows}}]


def test_engine_top_ids_are_parsed_and_checked():
    sampling = SamplingParams(max_new_tokens=2)
    good = [[entry(-0.1, 4), entry(-2.0, 7)], [entry(-0.2, 9), entry(-1.0, 4)]]
    (gen,) = parse_generations(generation(good), [[1, 2]], sampling, top_k=2)
    assert gen.top_ids == [[4, 7], [9, 4]]
    for rows, message in [
        (None, "output_top_logprobs: expected 2 rows"),
        (good[:1], "output_top_logprobs: expected 2 rows"),
        ([good[0], good[1][:1]], r"output_top_logprobs\[1\]: expected 2 entries"),
        ([good[0], [entry(-0.2, 9), entry(float("nan"), 4)]], "non-finite log-prob"),
        ([good[0], [entry(-0.2, 9), entry(-1.0, -4)]], "is not a token id"),
    ]:
        with pytest.raises(ResponseError, match=message):
            parse_generations(generation(rows), [[1, 2]], sampling, top_k=2)


def test_teacher_token_ids_logprobs_are_parsed_and_checked():
    seq, ids = [[1, 3, 4, 9]], [[9, 4]]
    row = [entry(-0.3, 9), entry(-0.4, 4)]
    (scores,) = parse_scores(scored([None, row, row]), seq, [2], 0, ids)
    assert scores.token_ids_logprobs == [[-0.3, -0.4], [-0.3, -0.4]]
    (empty,) = parse_scores(scored(None), seq, [2], 0, [[]])
    assert empty.token_ids_logprobs == [[], []]
    for rows, message in [
        (None, "input_token_ids_logprobs missing"),
        ([None, row], "expected 2 rows"),
        ([None, row, row[::-1]], "log-prob is for token 4, expected 9"),
        ([None, row, [entry(-0.3, 9), entry(None, 4)]], "missing log-prob"),
    ]:
        with pytest.raises(ResponseError, match=message):
            parse_scores(scored(rows), seq, [2], 0, ids)
