"""Student stage, served teachers' LM heads: hidden states -> vocabulary-parallel teacher logits.

The exact full-vocabulary losses (`full_rkl`, `forward_kl`) need the teacher's logits at every
response position, sharded over the vocabulary like the student's. A served teacher sends its
final hidden state h [S, H] instead of [S, V] logits (`hidden_states` payload: H/V of the
floats, 1/37 for a 4,096-wide teacher over 151,936 tokens). SGLang's state is after the final
norm (what its LM head multiplies), so the teacher's logits shard on TP rank r is
u_r = h @ W_r^T, with W_r the rank's rows of the teacher's LM head, split exactly like the
student's `output_layer` (vocabulary padded to the student's padded size with zero rows,
which the kernel masks). The shard goes straight into the kernel with the student's shard:
no rank ever holds [N, V], and no collective is needed (every TP rank has the whole
micro-batch's hidden states, as it has the student's logits).

Each teacher's LM head is read once from its HF folder (that tensor only) and kept in fp32:
the memory is the head shards, [V_padded / tp, H] per distinct teacher, not the models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from torch import Tensor

from mopd_megatron.hf.layout import pad_vocab, padded_vocab_size, split_tp
from mopd_megatron.hf.names import hf_param_map
from mopd_megatron.hf.safetensors_io import HFCheckpointReader
from mopd_megatron.hf.spec import read_hf_config
from mopd_megatron.student.local_teacher import with_teacher_logits
from mopd_megatron.teachers import teacher_for
from mopd_megatron.trajectory import HIDDEN_KEY


def load_head_shard(name: str, hf_dir: str | Path, vocab_size: int, padded_vocab: int,
                    rank: int, size: int) -> Tensor:
    """TP rank `rank`'s fp32 rows of a teacher's LM head, [padded_vocab / size, H].

    Raises:
        ValueError: The teacher's vocabulary differs from the student's (naming both sizes).
    """
    spec = read_hf_config(hf_dir)
    if spec.vocab_size != vocab_size:
        raise ValueError(f"teacher {name!r} ({hf_dir}) has a vocabulary of {spec.vocab_size} "
                         f"tokens, the student {vocab_size}: its logits cannot be compared "
                         "with the student's token by token")
    (tensor_name,) = hf_param_map("output_layer.weight", spec).hf_names
    weight = HFCheckpointReader(hf_dir).get(tensor_name).float()
    if weight.shape != (vocab_size, spec.hidden_size):
        raise ValueError(f"teacher {name!r}: {tensor_name} in {hf_dir} has shape "
                         f"{tuple(weight.shape)}, expected ({vocab_size}, {spec.hidden_size})")
    return split_tp(pad_vocab(weight, padded_vocab), 0, rank, size).contiguous()


class TeacherHeads:
    """One LM-head shard per distinct teacher folder, routed by domain index.

    Args:
        teachers: Domain index -> (teacher name, its HF folder).
        vocab_size: The student's real vocabulary size.
        padded_vocab: The student's padded vocabulary (its output layer's rows over TP).
        device: Where the student's logits live.
    """

    def __init__(self, teachers: dict[int, tuple[str, str]], vocab_size: int,
                 padded_vocab: int, device: torch.device | str = "cpu"):
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
        self.heads: dict[str, Tensor] = {}
        self.domains: dict[str, list[int]] = {}
        for domain, (name, path) in sorted(teachers.items()):
            if path not in self.heads:
                shard = load_head_shard(name, path, vocab_size, padded_vocab, rank, size)
                self.heads[path] = shard.to(device)
            self.domains.setdefault(path, []).append(domain)

    @classmethod
    def from_recipe(cls, recipe, domains: list[str], vocab_size: int) -> TeacherHeads:
        """The heads of the teachers that score `domains` (by index), padded like the student
        built from `recipe` (Megatron's rule: `make_vocab_size_divisible_by` * tp)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        padded = padded_vocab_size(vocab_size, recipe.model.make_vocab_size_divisible_by, tp)
        teachers = {i: (t.name, t.model_path)
                    for i, t in enumerate(teacher_for(recipe.teachers, d) for d in domains)}
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return cls(teachers, vocab_size, padded, device)

    @property
    def bytes(self) -> int:
        """Memory the head shards take on this rank."""
        return sum(h.numel() * h.element_size() for h in self.heads.values())

    @torch.no_grad()
    def logits(self, hidden: Tensor, domain_ids: Tensor) -> Tensor:
        """[b, s, V_padded / tp] fp32 logits of each row's domain teacher from its hidden
        states [b, s, H] (each head runs on its own rows only)."""
        width = next(iter(self.heads.values())).shape[0]
        out = hidden.new_zeros(*hidden.shape[:2], width, dtype=torch.float32)
        for path, head in self.heads.items():
            rows = torch.isin(domain_ids, torch.tensor(self.domains[path],
                                                       device=domain_ids.device))
            if rows.any():
                if hidden.shape[-1] != head.shape[1]:
                    raise ValueError(f"teacher {path}: hidden states of width "
                                     f"{hidden.shape[-1]}, its LM head takes {head.shape[1]}")
                out[rows] = hidden[rows].float() @ head.T
        return out

    def wrap(self, loss_fn):
        """`loss_fn` with the micro-batch's `teacher_logits` computed from its hidden states."""
        return with_teacher_logits(loss_fn, self._micro_batch_logits)

    def _micro_batch_logits(self, micro_batch: dict) -> Tensor:
        if HIDDEN_KEY not in micro_batch:
            raise ValueError("the full-vocabulary loss with served teachers needs the batch "
                             f"field {HIDDEN_KEY!r} (teacher payload hidden_states)")
        return self.logits(micro_batch[HIDDEN_KEY], micro_batch["domain_ids"])
