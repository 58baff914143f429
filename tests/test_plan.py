"""The planner: parameter counts against Megatron's own modules and against published figures,
memory arithmetic against Megatron's documented rules, and each kind of job that cannot run.

Megatron's per-rank counts at real multi-rank layouts are checked in test_reshard.py (the
ranks of its torchrun launches report them); here the tiny models are built in this process,
at TP1 for real and at other layouts on the meta device.
"""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mopd_megatron.config import ModelConfig, ParallelConfig, load_recipe
from mopd_megatron.hf.layout import padded_vocab_size
from mopd_megatron.hf.spec import read_hf_config, spec_from_dict
from mopd_megatron.plan.cli import configure, main
from mopd_megatron.plan.memory import in_flight, student_memory
from mopd_megatron.plan.meta import count_params, meta_rank_params
from mopd_megatron.plan.params import RankParams, model_params, rank_params
from mopd_megatron.plan.planner import make_plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QWEN3_30B = RECIPES / "models" / "qwen3_30b_a3b"
GIB = 1 << 30


def _tiny(path) -> tuple:
    spec = read_hf_config(path)
    return spec, padded_vocab_size(spec.vocab_size, 128, 1)


@pytest.mark.parametrize("model", ["tiny_moe_dir", "tiny_dense_dir"])
def test_counts_equal_megatron_modules_built_on_cpu(model, request):
    """TP1 for real; TP2 / PP2 / EP2 / VPP2 on meta (tied embeddings: the dense model)."""
    from mopd_megatron.student.model import build_model
    from mopd_megatron.student.parallel import init_parallel, teardown_parallel

    spec, padded = _tiny(request.getfixturevalue(model))
    init_parallel(ParallelConfig(), seed=0, spec=spec)
    try:
        built = count_params(build_model(spec, ModelConfig(), ParallelConfig()))
        assert RankParams(*built) == rank_params(spec, ParallelConfig(), padded, 0)
        layouts = [{"tp": 2}, {"pp": 2}, {"pp": 2, "vpp": 2}, {"tp": 2, "pp": 2}]
        if spec.is_moe:
            layouts += [{"ep": 2}, {"tp": 2, "ep": 2, "etp": 2}, {"ep": 4, "pp": 2}]
        for fields in layouts:
            parallel = ParallelConfig(**fields)
            padded_tp = padded_vocab_size(spec.vocab_size, 128, parallel.tp)
            meta = meta_rank_params(spec, ModelConfig(), parallel, parallel.nproc, padded_tp)
            planned = [rank_params(spec, parallel, padded_tp, s) for s in range(parallel.pp)]
            assert meta == planned, fields
    finally:
        teardown_parallel()


def test_qwen3_30b_a3b_against_published_figures_and_transformers():
    """Qwen3-30B-A3B model card: "30.5B in total and 3.3B activated", "Non-Embedding: 29.9B",
    48 layers, 32 query / 4 KV heads, 128 experts, 8 activated."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = read_hf_config(QWEN3_30B)
    assert (spec.num_layers, spec.num_attention_heads, spec.num_key_value_heads) == (48, 32, 4)
    assert (spec.num_experts, spec.num_experts_per_tok) == (128, 8)
    counts = model_params(spec)
    assert round(counts.total / 1e9, 1) == 30.5
    assert round(counts.non_embedding / 1e9, 1) == 29.9
    assert 3.3e9 <= counts.active < 3.4e9  # 3.353B: the card truncates to one decimal
    with torch.device("meta"):
        config = Qwen3MoeConfig(**json.loads((QWEN3_30B / "config.json").read_text()))
        hf = Qwen3MoeForCausalLM(config)
    assert sum(p.numel() for p in hf.parameters()) == counts.total == 30_532_122_624


def test_mimo_shaped_student_against_the_real_architecture():
    """MiMo-V2-Flash: published 309B total / 15B active. The real architecture (transformers'
    MiMoV2FlashConfig defaults) has 308.8B; the Qwen3-MoE-shaped student is 2.2% larger."""
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    config = MiMoV2FlashConfig()
    with torch.device("meta"):
        real = MiMoV2FlashForCausalLM(config)
    total = sum(p.numel() for p in real.parameters())
    experts = real.model.layers[1].mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // len(
        experts.gate_up_proj)
    moe_layers = config.mlp_layer_types.count("sparse")
    unused = config.n_routed_experts - config.num_experts_per_tok
    active = total - moe_layers * unused * per_expert
    assert round(total / 1e9) == 309 and round(active / 1e9) == 15
    shaped = read_hf_config(RECIPES / "models" / "mimo_v2_flash_shaped")
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "moe_intermediate_size", "num_experts_per_tok", "rms_norm_eps"):
        assert getattr(shaped, key) == getattr(config, key), key
    assert (shaped.num_layers, shaped.num_experts) == (48, config.n_routed_experts)
    assert 1.0 < model_params(shaped).total / total < 1.025


def _recipe(tmp_path, text: str, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path, list(overrides))


BASE = f"""
model: {{hf_path: {QWEN3_30B}, dtype: bfloat16, recompute_activations: true}}
parallel: {{tp: 4, ep: 16, micro_batch_size: 1, world_size: 32}}
rollout: {{engine: sglang, tp: 4, dp: 2, max_new_tokens: 28672, sync_mode: disk}}
teachers:
  teachers:
    - {{name: math, domains: [math], engine: sglang, model_path: /absent/math, tp: 4}}
    - {{name: code, domains: [code], engine: sglang, model_path: /absent/code, tp: 4}}
data: {{train_files: [t.jsonl], prompts_per_step: 2048, max_prompt_tokens: 4096}}
launch: {{gpus_per_node: 8, gpu_memory_gib: 79.6}}
"""


def test_memory_follows_megatrons_bytes_per_parameter(tmp_path):
    """bf16 params + fp32 grads: 18 B/param replicated, 6 + 12/d with the distributed
    optimizer (Megatron docs, Distributed Optimizer); fp32: 16, or 8 + 8/d."""
    spec = read_hf_config(QWEN3_30B)
    for dtype, replicated, sharded in (("bfloat16", 18, 12), ("float32", 16, 8)):
        for distributed in (False, True):
            overrides = [f"model.dtype={dtype}",
                         f"optimizer.use_distributed_optimizer={distributed}"]
            recipe = _recipe(tmp_path, BASE, overrides)
            shape, (stage,) = student_memory(spec, recipe, 32, 152064)
            p = stage.params
            fixed = replicated - sharded
            dense_d, expert_d = (shape.dp, shape.expert_dp) if distributed else (1, 1)
            expect = fixed * p.total + sharded * (p.dense / dense_d + p.expert / expert_d)
            held = stage.weights + stage.gradients + stage.optimizer
            assert held == pytest.approx(expect, abs=2)
    assert (shape.dp, shape.expert_dp, shape.micro_batches, shape.seq_len) == (8, 2, 256, 32768)


def test_in_flight_micro_batches_follow_megatrons_schedules(tmp_path):
    """Warm-up + 1 micro-batches per Megatron's own `get_pp_rank_microbatches`."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from mopd_megatron.plan.meta import StandInGroup

    for pp, vpp, micro_batches in ((4, None, 16), (4, None, 2), (4, 2, 16), (3, 4, 6)):
        recipe = SimpleNamespace(parallel=ParallelConfig(pp=pp, vpp=vpp))
        for stage in range(pp):
            comm = SimpleNamespace(pp_group=StandInGroup(pp, stage),
                                   virtual_pipeline_model_parallel_size=vpp)
            _, _, warmup, _ = get_pp_rank_microbatches(
                micro_batches, vpp or 1, pp, p2p_communicator=comm)
            chunks = min(warmup + 1, micro_batches * (vpp or 1))
            assert in_flight(recipe, micro_batches, stage) == pytest.approx(chunks / (vpp or 1))


def test_the_recipe_layout_fits_and_the_kl_buffers_scale_with_tp(tmp_path):
    plan = make_plan(_recipe(tmp_path, BASE), str(QWEN3_30B))
    assert plan.ok, plan.problems
    assert [s.gpus for s in plan.servers] == [8, 4, 4]
    assert plan.placement.group_nodes == {"student": 4, "rollout": 1, "teachers": 1}
    # logits (fp32) + one gradient (fp32) + its bf16 cast: 10 B per element of [N, V/tp]
    kl = plan.stages[-1].kl_buffers
    assert kl == pytest.approx(10 * 32768 * 152064 / 4, rel=1e-3)
    wider = make_plan(_recipe(tmp_path, BASE, ["parallel.tp=2", "parallel.ep=8"]),
                      str(QWEN3_30B))
    assert wider.stages[-1].kl_buffers > 1.9 * kl


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "32 attention heads are not divisible by tp = 3"),
    (["parallel.ep=6"], "128 experts are not divisible by ep = 6"),
    (["parallel.world_size=34"], "world size 34 is not divisible by tp*pp*cp = 4"),
    (["data.prompts_per_step=2044"], "2044 sequences per step"),
    (["parallel.pp=2", "parallel.micro_batch_size=3", "parallel.ep=8"],
     "not divisible by parallel.micro_batch_size"),
    (["parallel.pp=3", "parallel.vpp=2", "parallel.world_size=48", "data.prompts_per_step=1936"],
     "multiple of pp = 3"),
    (["parallel.pp=2", "parallel.vpp=2"], "batch_p2p_comm"),
    (["parallel.cp=2"], "context-parallel"),
    (["parallel.ep=4"], "needs"),  # 7.2B expert params per rank do not fit 71.6 GiB
    (["launch.gpu_memory_gib=16"], "weights need"),
    (["rollout.mem_fraction_static=0.185"], "less than one 32768-token sequence"),
    (["rollout.tp=3"], "rollout.tp = 3 does not divide 32 heads"),
    (["rollout.sync_mode=tensor"], "sync_mode 'tensor'"),
    (["parallel.world_size=12", "parallel.tp=4", "parallel.ep=4"], "must fill whole nodes"),
])
def test_impossible_jobs_are_flagged(tmp_path, overrides, message):
    plan = make_plan(_recipe(tmp_path, BASE, overrides), str(QWEN3_30B))
    assert not plan.ok
    assert any(message in problem for problem in plan.problems), plan.problems


def test_teacher_with_another_vocabulary_is_flagged(tmp_path):
    other = dict(json.loads((QWEN3_30B / "config.json").read_text()), vocab_size=152064)
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "config.json").write_text(json.dumps(other))
    text = BASE.replace("/absent/math", str(tmp_path / "math"))
    plan = make_plan(_recipe(tmp_path, text), str(QWEN3_30B))
    assert any("vocabulary of 152064 tokens" in problem for problem in plan.problems)


def test_cli_statuses_and_messages(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE.replace(str(QWEN3_30B), "/absent/student"))
    parser = configure(argparse.ArgumentParser())
    assert main(parser.parse_args([str(path)])) == 2
    err = capsys.readouterr().err
    assert "model.hf_path: /absent/student/config.json not found" in err
    assert "launch.model_config or pass --model-config" in err
    assert main(parser.parse_args([str(path), "--model-config", str(QWEN3_30B)])) == 0
    out = capsys.readouterr().out
    assert "verdict   fits" in out and "30.53B parameters" in out
    assert main(parser.parse_args([str(path), "parallel.ep=4", "--model-config",
                                   str(QWEN3_30B)])) == 1
    assert "cannot run" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3_30b_a3b_mopd", "mimo_v2_flash_mopd"])
def test_the_shipped_recipes_plan_as_written(name, tmp_path, monkeypatch, capsys):
    """Their checkpoints are absent: they plan with their launch.model_config, a path taken
    from the recipe's folder whatever the working folder."""
    monkeypatch.chdir(tmp_path)
    parser = configure(argparse.ArgumentParser())
    assert main(parser.parse_args([str(RECIPES / f"{name}.yaml")])) == 0
    assert "verdict   fits" in capsys.readouterr().out
    assert main(parser.parse_args([str(RECIPES / f"{name}.yaml"), "--model-config",
                                   str(tmp_path / "absent")])) == 2  # the option overrides it
    assert f"{tmp_path / 'absent'} not found" in capsys.readouterr().err


def test_a_model_the_planner_cannot_count_is_an_error():
    from mopd_megatron.plan.params import PlanError, check_countable

    spec = spec_from_dict(json.loads((QWEN3_30B / "config.json").read_text()))
    with pytest.raises(PlanError, match="model_type 'deepseek_v3'"):
        check_countable(type(spec)(**{**spec.to_dict(), "model_type": "deepseek_v3"}), "x")
