"""Test-wide set-up: offline hub, Triton's CPU interpreter, tiny checkpoints."""

import os
import sys
from pathlib import Path

# Must precede any import of the Triton kernels: without a GPU they run only in the interpreter.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

sys.path.insert(0, str(Path(__file__).parent))

import pytest
from tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint (untied embeddings) with the toy tokenizer."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_moe"), "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory):
    """A tiny random dense Qwen3 checkpoint with tied embeddings."""
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("tiny_dense"), "qwen3", tie_word_embeddings=True
    )
