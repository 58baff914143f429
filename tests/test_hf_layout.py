"""HF layout helpers and name maps, exact (torch.equal), with independent statements of rules."""

import pytest
import torch

from mopd_megatron.hf.layout import (
    local_experts,
    merge_qkv,
    merge_tp,
    pad_vocab,
    padded_vocab_size,
    split_qkv,
    split_tp,
    truncate_vocab,
)
from mopd_megatron.hf.names import global_param_name, hf_param_map
from mopd_megatron.hf.spec import HFModelSpec

QKV_SHAPES = [(4, 2, 2, 8), (8, 1, 4, 16), (4, 4, 3, 5), (32, 4, 128, 256)]


@pytest.mark.parametrize(("heads", "groups", "head_dim", "hidden"), QKV_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_merge_split_round_trip_and_rule(heads, groups, head_dim, hidden, bias):
    shape = () if bias else (hidden,)
    q = torch.randn(heads * head_dim, *shape)
    k = torch.randn(groups * head_dim, *shape)
    v = torch.randn(groups * head_dim, *shape)
    qkv = merge_qkv(q, k, v, groups)
    assert qkv.shape == ((heads + 2 * groups) * head_dim, *shape)
    # Independent statement: in group g's block, rows [0, npg*hn) are q heads g*npg + r // hn,
    # then hn rows of k head g, then hn rows of v head g.
    npg, block = heads // groups, (heads // groups + 2) * head_dim
    for row in range(qkv.shape[0]):
        g, r = divmod(row, block)
        if r < npg * head_dim:
            expected = q[(g * npg + r // head_dim) * head_dim + r % head_dim]
        elif r < (npg + 1) * head_dim:
            expected = k[g * head_dim + r - npg * head_dim]
        else:
            expected = v[g * head_dim + r - (npg + 1) * head_dim]
        assert torch.equal(qkv[row], expected)
    for got, want in zip(split_qkv(qkv, groups, heads), (q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gate_up_chunked_per_tp_rank(tp):
    ffn, hidden = 16, 6
    gate, up = torch.randn(ffn, hidden), torch.randn(ffn, hidden)
    full = torch.cat([gate, up])
    rows = ffn // tp
    shards = [split_tp(full, 0, rank, tp, gated=True) for rank in range(tp)]
    for rank, shard in enumerate(shards):
        want = torch.cat(
            [gate[rank * rows : (rank + 1) * rows], up[rank * rows : (rank + 1) * rows]]
        )
        assert torch.equal(shard, want)
    assert torch.equal(merge_tp(shards, 0, gated=True), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_column_row_replicated_split_round_trip(tp, dim):
    full = torch.randn(8, 12)
    shards = [split_tp(full, dim, rank, tp) for rank in range(tp)]
    if dim is not None:
        size = full.shape[dim] // tp
        assert torch.equal(shards[-1], full.narrow(dim, (tp - 1) * size, size))
    else:
        assert all(s is full for s in shards)
    assert torch.equal(merge_tp(shards, dim), full)


def test_split_rejects_uneven():
    with pytest.raises(ValueError, match="not divisible"):
        split_tp(torch.zeros(6, 4), 0, 0, 4)


def test_vocab_pad_truncate():
    assert padded_vocab_size(42, 128, 1) == 128
    assert padded_vocab_size(42, 128, 2) == 256
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 8) == 152576
    weight = torch.randn(42, 5)
    padded = pad_vocab(weight, 128)
    assert padded.shape == (128, 5) and torch.equal(padded[42:], torch.zeros(86, 5))
    assert torch.equal(truncate_vocab(padded, 42), weight)
    with pytest.raises(ValueError, match="exceeds"):
        pad_vocab(weight, 40)


def moe_spec(**kw):
    base = {
        "model_type": "qwen3_moe",
        "vocab_size": 42,
        "hidden_size": 48,
        "num_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    }
    return HFModelSpec(**{**base, **kw})


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_renaming_over_ep(ep):
    spec, seen = moe_spec(), []
    for ep_rank in range(ep):
        owned = local_experts(ep_rank, ep, spec.num_experts)
        assert len(owned) == spec.num_experts // ep
        for local, global_id in enumerate(owned):
            seen.append(global_id)
            for local_name in (
                f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc1.weight",
                f"decoder.layers.1.mlp.experts.linear_fc1.weight{local}",
            ):
                name = global_param_name(local_name, [3, 4], owned.start)
                assert hf_param_map(name, spec).hf_names == (
                    f"model.layers.3.mlp.experts.{global_id}.gate_proj.weight",
                    f"model.layers.3.mlp.experts.{global_id}.up_proj.weight",
                )
            down = global_param_name(
                f"decoder.layers.0.mlp.experts.local_experts.{local}.linear_fc2.weight",
                [3, 4],
                owned.start,
            )
            assert hf_param_map(down, spec).hf_names == (
                f"model.layers.2.mlp.experts.{global_id}.down_proj.weight",
            )
    assert seen == list(range(spec.num_experts))


def test_local_and_te_spec_names_agree():
    spec = moe_spec()
    pairs = [
        ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
        ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
        ("mlp.experts.local_experts.5.linear_fc2.weight", "mlp.experts.linear_fc2.weight5"),
    ]
    for local, te in pairs:
        assert hf_param_map(f"decoder.layers.2.{local}", spec) == hf_param_map(
            f"decoder.layers.2.{te}", spec
        )
    with pytest.raises(KeyError, match="no HF mapping"):
        hf_param_map("decoder.layers.2.mlp.router.expert_bias", spec)


def test_tied_output_layer_reads_the_embedding():
    assert hf_param_map("output_layer.weight", moe_spec()).hf_names == ("lm_head.weight",)
    tied = moe_spec(tie_word_embeddings=True)
    assert hf_param_map("output_layer.weight", tied).hf_names == ("model.embed_tokens.weight",)
