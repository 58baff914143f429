"""A character-level tokenizer for the toy world, built offline (no hub download).

42 tokens: <pad> <bos> <eos>, digits, lower-case letters, '+', '=' and space. It is a
`tokenizers` WordLevel model that splits every character, wrapped in
`PreTrainedTokenizerFast` so that transformers, the embedded engine and the trainer all
load it with `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
CHARACTERS = list(string.digits + string.ascii_lowercase + "+= ")
VOCAB = SPECIAL_TOKENS + CHARACTERS


def build_char_tokenizer(save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer; save it to `save_dir` when given."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer
