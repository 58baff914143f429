"""TeacherPool over two embedded engines (tiny MoE, tiny dense) on real HTTP.

Routing by domain, a shared server started once, the default teacher, the unknown-domain
error, attaching to a running server by URL, and the tokenizer check at start-up.
"""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mopd_megatron.config import TeacherConfig, TeachersConfig
from mopd_megatron.demo.tokenizer import VOCAB
from mopd_megatron.teachers import TeacherPool

TOL = 1e-4


@pytest.fixture(scope="module")
def pool(tiny_moe_dir, tiny_dense_dir, tmp_path_factory):
    cfg = TeachersConfig(teachers=[
        TeacherConfig(name="math", model_path=str(tiny_moe_dir), domains=["math", "arith"],
                      extra_args=["--random-seed", "1"]),
        TeacherConfig(name="code", model_path=str(tiny_dense_dir), domains=["code"]),
        TeacherConfig(name="olympiad", model_path=str(tiny_moe_dir), domains=["olympiad"]),
    ])
    with TeacherPool.start(cfg, tiny_moe_dir, tmp_path_factory.mktemp("logs")) as teachers:
        yield teachers


@pytest.fixture(scope="module")
def references(tiny_moe_dir, tiny_dense_dir):
    return {name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for name, d in (("moe", tiny_moe_dir), ("dense", tiny_dense_dir))}


def test_shared_server_is_started_once(pool):
    assert len(pool.handles) == 2 and pool.names == ["math", "code", "olympiad"]
    assert pool.client("math") is pool.client("olympiad")
    assert pool.client("math") is not pool.client("code")


def test_mixed_domains_are_routed_and_come_back_in_order(pool, references):
    g = torch.Generator().manual_seed(0)
    domains = ["math", "code", "olympiad", "arith", "code", "code", "math"]
    sequences = [torch.randint(3, 42, (9 + i,), generator=g).tolist() for i in range(7)]
    starts = [4, 2, 5, 1, 9, 3, 6]
    scores = pool.score(sequences, starts, domains, top_k=3)
    for seq, r, domain, s in zip(sequences, starts, domains, scores):
        with torch.no_grad():  # temperature 1: the teacher's own distribution
            logits = {k: m(torch.tensor([seq])).logits[0, r - 1:-1] for k, m in references.items()}
        logp = torch.log_softmax(logits["dense" if domain == "code" else "moe"], dim=-1)
        ref = logp.gather(1, torch.tensor(seq[r:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s.token_logprobs), ref, atol=TOL, rtol=0), domain
        assert s.top_ids == torch.topk(logp, 3, dim=-1).indices.tolist()
        assert not torch.allclose(logits["moe"], logits["dense"], atol=1e-2)  # routing matters


def test_default_teacher_and_unknown_domain(pool):
    with pytest.raises(ValueError, match=r"no teacher for domain 'poetry': known domains are "
                                         r"\['arith', 'code', 'math', 'olympiad'\]"):
        pool.score([[1, 2, 3]], [1], ["poetry"])
    with_default = TeacherPool(pool.clients, pool.routes, default="code")
    assert with_default.route("poetry") == "code"
    assert with_default.route("math") == "math"
    assert len(with_default.score([[1, 2, 3]], [1], ["poetry"])[0].token_logprobs) == 2


def test_attach_to_a_running_server_by_url(pool, tiny_moe_dir, tmp_path):
    url = pool.clients["code"].url
    cfg = TeachersConfig(teachers=[TeacherConfig(name="remote", engine="url", url=url,
                                                 domains=["code"])])
    attached = TeacherPool.start(cfg, tiny_moe_dir, tmp_path)  # vocabulary checked via the URL
    assert attached.clients["remote"].url == url and attached.handles[0].process is None
    attached.stop()  # does not stop a server it did not launch
    assert pool.clients["code"].health()


def test_vocabulary_mismatch_fails_naming_the_teacher(tiny_moe_dir, tiny_dense_dir, tmp_path):
    folder = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_dense_dir, folder)
    for f in folder.glob("*token*"):
        f.unlink()
    swapped = VOCAB[:3] + VOCAB[3:][::-1]  # same tokens, other ids
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(swapped)}, unk_token="<pad>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(folder)
    cfg = TeachersConfig(teachers=[
        TeacherConfig(name="math", model_path=str(tiny_moe_dir), domains=["math"]),
        TeacherConfig(name="poet", model_path=str(folder), domains=["poetry"])])
    with pytest.raises(ValueError, match="teacher 'poet' .* does not share the student's vocab"):
        TeacherPool.start(cfg, tiny_moe_dir, tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # refused before launching anything
