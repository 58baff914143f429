"""Vocab-parallel KL kernels (Triton) and their pure-torch references.

Public entry points (see `vocab_parallel.py`): `vocab_parallel_logprob_entropy`,
`vocab_parallel_kl` and `topk_reverse_kl`; `reference` holds the full-vocabulary oracle.
"""

from . import reference
from .vocab_parallel import topk_reverse_kl, vocab_parallel_kl, vocab_parallel_logprob_entropy

__all__ = ["reference", "topk_reverse_kl", "vocab_parallel_kl", "vocab_parallel_logprob_entropy"]
