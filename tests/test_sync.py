"""Weight sync into the embedded engine by disk, by tensor and by a gloo process group.

The source is the tiny HF model's own checkpoint (HF names: per-expert MoE weights, as the
Megatron exporter will produce), perturbed. A push must follow SGLang 0.5.23's protocol (the
engine enforces it: tensor and distributed updates only inside /begin_weight_update ...
/end_weight_update), and afterwards the engine's log-probs on a fixed probe must equal those
of transformers loading the same new weights (gap <= 1e-4, fp32).
"""

import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mopd_megatron.config import EngineConfig, RolloutConfig
from mopd_megatron.rollout import EngineClient, EngineError, start_engine
from mopd_megatron.rollout.local_batch import BatchRunner
from mopd_megatron.rollout.local_engine import LocalModel
from mopd_megatron.rollout.local_requests import SeqRequest
from mopd_megatron.rollout.sglang import free_port
from mopd_megatron.rollout.tensor_payload import tensor_payload
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


class Recorder(EngineClient):
    """A real client that also keeps the path of every call it made."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths = []

    async def _http(self, method, path, body):
        self.paths.append(path)
        return await super()._http(method, path, body)


class SkipsSession(Recorder):
    """A client that breaks SGLang 0.5.23's protocol: it never opens a weight-update session."""

    def begin_weight_update(self):
        return False


def protocol(mode, n):
    """The calls of one push of n buckets (the distributed group exists), in order."""
    if mode == "disk":
        return ["/update_weights_from_disk"]
    each = {"tensor": ["/server_info", "/update_weights_from_tensor"],
            "distributed": ["/update_weights_from_distributed"]}[mode]
    return ["/begin_weight_update"] + each * n + ["/end_weight_update", "/flush_cache"]


def make_sync(mode, client, model_dir, tmp_path):
    cfg = RolloutConfig(engine="local", sync_mode=mode)
    sync = make_weight_sync(cfg, client, template_dir=model_dir, work_dir=tmp_path)
    assert type(sync) is {"disk": DiskSync, "tensor": TensorSync,
                          "distributed": DistributedSync}[mode]
    return sync


@pytest.mark.parametrize("mode", ["disk", "tensor", "distributed"])
def test_sync_follows_sglang_protocol_and_matches_transformers(engine, tiny_moe_dir, tmp_path,
                                                                mode):
    """The push sequence SGLang 0.5.23 requires, then the probe equals transformers."""
    state = perturbed(tiny_moe_dir, seed=["disk", "tensor", "distributed"].index(mode))
    reference = reference_logprobs(tiny_moe_dir, state, tmp_path)
    assert probe_gap(engine.client, PROBE, reference) > 1e-2  # not synced yet
    client = Recorder(engine.url)
    sync = make_sync(mode, client, tiny_moe_dir, tmp_path)
    if mode == "distributed":
        sync.connect()
        assert client.paths == ["/server_info", "/init_weights_update_group"]
    for version in ("v1", "v2"):  # twice: the session closes, the group is reused
        client.paths.clear()
        sync.push(iter(buckets(state)), weight_version=f"{mode}-{version}")  # streamed buckets
        assert client.paths == protocol(mode, len(buckets(state)))
    if mode == "distributed":
        sync.close()
        assert client.paths[-1] == "/destroy_weights_update_group"
    assert probe_gap(engine.client, PROBE, reference) <= TOL
    assert engine.client.model_info()["weight_version"] == f"{mode}-v2"


@pytest.mark.parametrize("mode", ["tensor", "distributed"])
def test_a_client_that_skips_begin_weight_update_fails(engine, tiny_moe_dir, tmp_path, mode):
    """The engine enforces the session as SGLang does: the push fails, nothing changes."""
    state = perturbed(tiny_moe_dir, seed=7)
    reference = reference_logprobs(tiny_moe_dir, state, tmp_path)
    before = probe_gap(engine.client, PROBE, reference)
    sync = make_sync(mode, SkipsSession(engine.url), tiny_moe_dir, tmp_path)
    with pytest.raises(EngineError, match=f"HTTP 400 from /update_weights_from_{mode}: .*"
                                          "must run between begin_weight_update"):
        sync.push(buckets(state))
    if mode == "distributed":
        sync.close()
    assert probe_gap(engine.client, PROBE, reference) == pytest.approx(before, abs=1e-6)


def test_bad_updates_are_refused_and_change_nothing(engine, tiny_moe_dir, tmp_path):
    state = perturbed(tiny_moe_dir, seed=5)
    reference = reference_logprobs(tiny_moe_dir, state, tmp_path)
    TensorSync(engine.client).push(buckets(state))
    client = engine.client
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    wrong = [(name, state[name]), ("model.layers.0.mlp.experts.9.up_proj.weight", state[name])]
    with client.weight_update_session():
        with pytest.raises(EngineError, match="HTTP 400.*unknown weight names"):
            client.update_weights_from_tensor(wrong)
        with pytest.raises(EngineError, match=f"HTTP 400.*{name}: shape"):
            client.update_weights_from_tensor([(name, state[name].T)])
    with pytest.raises(EngineError, match="the engine's session was left open"):
        with client.weight_update_session():
            raise EngineError(engine.url, "the engine's session was left open")
    client.begin_weight_update()  # the failed block above closed its session
    with pytest.raises(EngineError, match="HTTP 400.*session is already open"):
        client.begin_weight_update()
    client.end_weight_update()
    partial = dict(list(state.items())[:-3])
    with pytest.raises(EngineError, match="HTTP 400.*3 weights missing"):
        DiskSync(client, tmp_path / "partial", tiny_moe_dir).push(buckets(partial))
    assert probe_gap(client, PROBE, reference) <= TOL


class PretendCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (SGLang's serializer is stubbed out below)."""

    @property
    def is_cuda(self):
        return True


def test_sglang_tensor_format_as_far_as_a_cpu_allows(monkeypatch):
    """SGLang's own tensor format is CUDA IPC handles: CPU tensors are refused before any
    request (SGLang's patched reducer fails on them), and every TP rank gets a pickle of its
    own from SGLang's serializer (stubbed here; only a GPU run can open the handles)."""
    with pytest.raises(ValueError, match="takes CUDA tensors .* w is on the CPU"):
        tensor_payload([("w", torch.ones(2))], {"tp_size": 2})
    calls = []
    utils, patch = types.ModuleType("sglang.srt.utils"), types.ModuleType("patch_torch")
    utils.MultiprocessingSerializer = types.SimpleNamespace(
        serialize=lambda named, output_str: calls.append(named) or f"pickle-{len(calls)}")
    patch.monkey_patch_torch_reductions = lambda: None
    modules = {"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
               "sglang.srt.utils": utils, "sglang.srt.utils.patch_torch": patch}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    named = [("w", torch.ones(2).as_subclass(PretendCuda))]
    assert tensor_payload(named, {"tp_size": 2}) == {
        "serialized_named_tensors": ["pickle-1", "pickle-2"]}  # no load_format: SGLang's own
    assert calls == [named, named]


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
    model = LocalModel(str(tiny_dense_dir))
    model.load_tensors({"lm_head.weight": new["model.embed_tokens.weight"]})
    results = BatchRunner(model, None).run([SeqRequest(seq, max_new_tokens=0, return_logprob=True,
                                                        logprob_start_len=0) for seq in PROBE])
    for res, ref in zip(results, reference):
        got = [entry[0] for entry in res["meta_info"]["input_token_logprobs"][1:]]
        assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=TOL, rtol=0)
