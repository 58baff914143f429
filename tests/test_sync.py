"""Weight sync into the embedded engine by disk, by tensor and by a gloo process group.

The source is the tiny HF model's own checkpoint (HF names: per-expert MoE weights, as the
Megatron exporter will produce), perturbed. After a push, the engine's log-probs on a fixed
probe must equal those of transformers loading the same new weights (gap <= 1e-4, fp32).
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mopd_megatron.config import EngineConfig, RolloutConfig
from mopd_megatron.rollout import EngineError, start_engine
from mopd_megatron.rollout.local_engine import LocalModel, SeqRequest
from mopd_megatron.rollout.sglang import free_port
from mopd_megatron.sync import (
    DiskSync,
    DistributedSync,
    TensorSync,
    make_weight_sync,
    probe_gap,
    write_hf_checkpoint,
)

TOL = 1e-4
PROBE = [[1, 5, 9, 13, 20, 7, 3], [1, 30, 31, 32], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]


@pytest.fixture(scope="module")
def engine(tiny_moe_dir, tmp_path_factory):
    cfg = EngineConfig(engine="local")
    with start_engine(cfg, str(tiny_moe_dir), tmp_path_factory.mktemp("logs"), "rollout") as h:
        yield h


def perturbed(model_dir, seed):
    """The checkpoint's tensors (HF names), each changed by a seeded random amount."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(model_dir / "model.safetensors"))
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())}


def buckets(state, size=7):
    items = list(state.items())
    return [items[i:i + size] for i in range(0, len(items), size)]


def reference_logprobs(model_dir, state, tmp_path):
    """What transformers computes on PROBE with `state` written as an HF folder."""
    folder = write_hf_checkpoint(buckets(state), tmp_path / "reference", model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in PROBE:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1], dim=-1)
            out.append(logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist())
    return out


@pytest.mark.parametrize("mode", ["disk", "tensor", "distributed"])
def test_sync_matches_transformers_with_the_new_weights(engine, tiny_moe_dir, tmp_path, mode):
    state = perturbed(tiny_moe_dir, seed=["disk", "tensor", "distributed"].index(mode))
    reference = reference_logprobs(tiny_moe_dir, state, tmp_path)
    assert probe_gap(engine.client, PROBE, reference) > 1e-2  # not synced yet
    cfg = RolloutConfig(engine="local", sync_mode=mode)
    sync = make_weight_sync(cfg, engine.client, template_dir=tiny_moe_dir, work_dir=tmp_path)
    assert type(sync) is {"disk": DiskSync, "tensor": TensorSync,
                          "distributed": DistributedSync}[mode]
    sync.push(buckets(state), weight_version=f"v-{mode}")
    if mode == "distributed":
        sync.push(buckets(state), weight_version=f"v-{mode}")  # the group is reused
        sync.close()
    assert probe_gap(engine.client, PROBE, reference) <= TOL
    assert engine.client.model_info()["weight_version"] == f"v-{mode}"


def test_bad_updates_are_refused_and_change_nothing(engine, tiny_moe_dir, tmp_path):
    state = perturbed(tiny_moe_dir, seed=5)
    reference = reference_logprobs(tiny_moe_dir, state, tmp_path)
    TensorSync(engine.client).push(buckets(state))
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    wrong = [(name, state[name]), ("model.layers.0.mlp.experts.9.up_proj.weight", state[name])]
    with pytest.raises(EngineError, match="HTTP 400.*unknown weight names"):
        engine.client.update_weights_from_tensor(wrong)
    with pytest.raises(EngineError, match=f"HTTP 400.*{name}: shape"):
        engine.client.update_weights_from_tensor([(name, state[name].T)])
    partial = dict(list(state.items())[:-3])
    with pytest.raises(EngineError, match="HTTP 400.*3 weights missing"):
        DiskSync(engine.client, tmp_path / "partial", tiny_moe_dir).push(buckets(partial))
    assert probe_gap(engine.client, PROBE, reference) <= TOL


def test_nccl_group_is_refused_by_the_cpu_engine(engine):
    sync = DistributedSync(engine.client, "127.0.0.1", free_port(), backend="nccl")
    with pytest.raises(EngineError, match="HTTP 400.*not supported on the CPU engine"):
        sync.connect()  # refused at once, not after the rendezvous timeout


def test_tied_embeddings_update_through_either_name(tiny_dense_dir, tmp_path):
    """The engine core's name map: a tied model stores only the embedding; lm_head aliases it."""
    state = load_file(str(tiny_dense_dir / "model.safetensors"))
    assert "lm_head.weight" not in state
    new = dict(state, **{"model.embed_tokens.weight": state["model.embed_tokens.weight"] * 1.5})
    reference = reference_logprobs(tiny_dense_dir, new, tmp_path)
    engine = LocalModel(str(tiny_dense_dir))
    engine.load_tensors({"lm_head.weight": new["model.embed_tokens.weight"]})
    results = engine.run([SeqRequest(seq, max_new_tokens=0, return_logprob=True,
                                     logprob_start_len=0) for seq in PROBE])
    for res, ref in zip(results, reference):
        got = [entry[0] for entry in res["meta_info"]["input_token_logprobs"][1:]]
        assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=TOL, rtol=0)
