"""HF config reading, safetensors folders (sharded, fused experts) and the errors for bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mopd_megatron.config import ParallelConfig, RecipeError
from mopd_megatron.hf.safetensors_io import (
    HFCheckpointError,
    HFCheckpointReader,
    write_hf_folder,
)
from mopd_megatron.hf.spec import HFConfigError, read_hf_config, spec_from_dict
from mopd_megatron.student.parallel import init_parallel


def test_reads_both_tiny_configs(tiny_moe_dir, tiny_dense_dir):
    moe, dense = read_hf_config(tiny_moe_dir), read_hf_config(tiny_dense_dir)
    assert (moe.model_type, moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (
        "qwen3_moe",
        4,
        2,
        True,
    )
    assert (moe.head_dim, moe.num_key_value_heads, moe.rope_theta, moe.tie_word_embeddings) == (
        16,
        2,
        10000.0,
        False,
    )
    assert (dense.model_type, dense.is_moe, dense.tie_word_embeddings) == ("qwen3", False, True)


def test_transformers_4_and_5_key_names_agree(tiny_moe_dir):
    cfg5 = json.loads((tiny_moe_dir / "config.json").read_text())
    cfg4 = dict(cfg5, num_experts=cfg5["num_local_experts"], rope_theta=1e4, torch_dtype="float32")
    for key in ("num_local_experts", "rope_parameters", "dtype"):
        del cfg4[key]
    assert spec_from_dict(cfg4) == spec_from_dict(cfg5)


def test_config_errors_name_file_and_key(tiny_moe_dir, tmp_path):
    with pytest.raises(HFConfigError, match="folder not found"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(HFConfigError, match=r"config\.json not found"):
        read_hf_config(tmp_path)
    cfg = json.loads((tiny_moe_dir / "config.json").read_text())
    cases = [
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
        ({"hidden_size": None}, "missing key 'hidden_size'"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "rope_type"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ]
    for change, message in cases:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(HFConfigError, match=message) as err:
            read_hf_config(tmp_path)
        assert str(tmp_path / "config.json") in str(err.value)


def test_reader_errors(tiny_moe_dir, tmp_path):
    with pytest.raises(HFCheckpointError, match="folder not found"):
        HFCheckpointReader(tmp_path / "nope")
    with pytest.raises(HFCheckpointError, match="neither"):
        HFCheckpointReader(tmp_path)
    reader = HFCheckpointReader(tiny_moe_dir)
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: tensor 'model.layers.9"):
        reader.get("model.layers.9.mlp.gate.weight")
    mixed = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 4, 3),
        "model.layers.1.mlp.experts.0.up_proj.weight": torch.zeros(2, 3),
    }
    save_file(mixed, tmp_path / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="mixes per-expert keys"):
        HFCheckpointReader(tmp_path)


def test_fused_expert_layout_slices(tmp_path):
    gate_up, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.down_proj": down,
        },
        tmp_path / "model.safetensors",
    )
    reader = HFCheckpointReader(tmp_path)
    prefix = "model.layers.0.mlp.experts.2."
    assert torch.equal(reader.get(prefix + "gate_proj.weight"), gate_up[2, :4])
    assert torch.equal(reader.get(prefix + "up_proj.weight"), gate_up[2, 4:])
    assert torch.equal(reader.get(prefix + "down_proj.weight"), down[2])
    with pytest.raises(HFCheckpointError, match="no expert 3"):
        reader.get("model.layers.0.mlp.experts.3.down_proj.weight")


def test_sharded_write_and_read_back(tiny_moe_dir, tmp_path):
    source = HFCheckpointReader(tiny_moe_dir)
    names = sorted(source.files)
    buckets = ([(n, source.get(n))] for n in names)
    out = write_hf_folder(buckets, tmp_path / "out", tiny_moe_dir, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = HFCheckpointReader(out)
    assert all(torch.equal(back.get(n), source.get(n)) for n in names)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    shutil.rmtree(out)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"tp": 3}, "4 attention heads are not divisible by tp = 3"),
        ({"ep": 3}, "4 experts are not divisible by ep = 3"),
        ({"tp": 2, "sequence_parallel": False}, "MoE with tp > 1 needs parallel.sequence_parallel"),
        ({"pp": 3}, "4 layers are not divisible by pp = 3"),
    ],
)
def test_impossible_layouts_fail_before_initialising(tiny_moe_dir, monkeypatch, layout, message):
    monkeypatch.setenv("WORLD_SIZE", "12")
    with pytest.raises(RecipeError, match=message):
        init_parallel(ParallelConfig(**layout), seed=0, spec=read_hf_config(tiny_moe_dir))


def test_conversion_validates_the_target_layout(tiny_moe_dir, tmp_path):
    from mopd_megatron.hf.convert import hf_to_megatron

    with pytest.raises(RecipeError, match="not divisible by ep = 3"):
        hf_to_megatron(tiny_moe_dir, tmp_path / "ckpt", ParallelConfig(ep=3))
