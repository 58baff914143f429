"""HF conversion stage: file conversion between HF folders and Megatron distributed checkpoints.

`hf_to_megatron`: HF safetensors folder -> `megatron.core.dist_checkpointing` folder (torch_dist
format: every tensor stored globally with its sharding metadata, so any later TP/PP/EP layout
can load it), plus `hf_config/` holding the HF config and tokenizer files so the folder
describes itself. `megatron_to_hf`: the reverse, through the same streaming export that weight
sync uses.

Both run as a single process (TP=PP=EP=1 in memory) or under torchrun at a layout whose product
matches the world size (DP fills the rest). The layout given is validated against the model.
Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * tp`, so the
target training TP decides the stored padded size; export reads it back from the checkpoint.
Call these from a script with an `if __name__ == "__main__":` guard (the checkpoint writer
starts a `spawn` process that re-imports `__main__`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch.distributed as dist

from mopd_megatron.config import ModelConfig, ParallelConfig
from mopd_megatron.hf.layout import padded_vocab_size
from mopd_megatron.hf.safetensors_io import copy_hf_metadata, write_hf_folder
from mopd_megatron.hf.spec import HFModelSpec, read_hf_config
from mopd_megatron.student.hf_weights import export_hf_weights, load_hf_weights

HF_CONFIG_DIR = "hf_config"
"""Sub-folder of a converted Megatron checkpoint with the HF config.json and tokenizer files."""


def hf_to_megatron(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    parallel: ParallelConfig | None = None,
    model_cfg: ModelConfig | None = None,
) -> Path:
    """Convert an HF checkpoint into a Megatron distributed checkpoint (collective).

    Args:
        hf_dir: HF folder (config.json, safetensors, tokenizer).
        ckpt_dir: output folder (created).
        parallel: the target layout (tp, pp, ep, etp); default all 1.
        model_cfg: dtype and vocabulary padding; default: the HF dtype, padding 128.

    Returns:
        `ckpt_dir`.
    """
    from megatron.core import dist_checkpointing

    from mopd_megatron.student.model import build_model, sharded_state_dict

    spec = read_hf_config(hf_dir)
    parallel = parallel or ParallelConfig()
    model_cfg = model_cfg or ModelConfig(
        dtype="bfloat16" if spec.dtype == "bfloat16" else "float32"
    )
    padded = padded_vocab_size(spec.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tp)
    chunks = build_model(spec, model_cfg, _init_layout(parallel, spec, hf_dir), padded)
    load_hf_weights(chunks, hf_dir, spec)
    ckpt_dir = Path(ckpt_dir)
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        copy_hf_metadata(hf_dir, ckpt_dir / HF_CONFIG_DIR)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict(chunks), str(ckpt_dir))
    dist.barrier()
    return ckpt_dir


def megatron_to_hf(
    ckpt_dir: str | Path,
    hf_dir: str | Path,
    parallel: ParallelConfig | None = None,
    hf_config_dir: str | Path | None = None,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Convert a Megatron distributed checkpoint into an HF folder (collective; rank 0 writes).

    Args:
        ckpt_dir: the torch_dist checkpoint folder (e.g. an `iter_0000100/` of a run).
        hf_dir: output HF folder (created).
        parallel: the layout to load at; default all 1.
        hf_config_dir: folder with the HF config.json and tokenizer; default
            `ckpt_dir/hf_config` (written by `hf_to_megatron`).
        max_shard_bytes: safetensors shard size bound.

    Returns:
        `hf_dir`.
    """
    from megatron.core import dist_checkpointing

    from mopd_megatron.student.checkpoint import check_checkpoint
    from mopd_megatron.student.model import build_model, sharded_state_dict

    ckpt_dir = Path(ckpt_dir)
    hf_config_dir = Path(hf_config_dir or ckpt_dir / HF_CONFIG_DIR)
    spec = read_hf_config(hf_config_dir)
    parallel = parallel or ParallelConfig()
    check_checkpoint(ckpt_dir)  # one line naming a missing, truncated or unreadable file
    embedding = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))[
        "embedding.word_embeddings.weight"
    ]
    model_cfg = ModelConfig(dtype="bfloat16" if "bfloat16" in str(embedding.dtype) else "float32")
    layout = _init_layout(parallel, spec, hf_config_dir)
    chunks = build_model(spec, model_cfg, layout, padded_vocab=embedding.global_shape[0])
    state = dist_checkpointing.load(sharded_state_dict(chunks), str(ckpt_dir))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"])
    return save_hf_checkpoint(chunks, spec, hf_dir, hf_config_dir, max_shard_bytes)


def save_hf_checkpoint(
    chunks: list,
    spec: HFModelSpec,
    hf_dir: str | Path,
    source_dir: str | Path,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write the model as an HF folder (collective: every rank exports, rank 0 writes).

    Args:
        chunks: this rank's model chunks.
        spec: the HF architecture.
        hf_dir: output folder (created).
        source_dir: HF folder whose config.json and tokenizer files are copied.
        max_shard_bytes: safetensors shard size bound.

    Returns:
        `hf_dir`.
    """
    buckets = export_hf_weights(chunks, spec)
    if dist.get_rank() == 0:
        write_hf_folder(buckets, hf_dir, source_dir, max_shard_bytes)
    else:
        for _ in buckets:
            pass
    dist.barrier()
    return Path(hf_dir)


def _init_layout(parallel: ParallelConfig, spec, source) -> ParallelConfig:
    """Validate the target layout, then initialise the one this process group runs.

    Alone, the process holds the whole model (TP=PP=EP=1); under torchrun it runs `parallel`.
    """
    from mopd_megatron.student.layout import layout_dims, validate_layout
    from mopd_megatron.student.parallel import init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    minimal_world = parallel.tp * parallel.pp * parallel.cp * parallel.ep * parallel.etp
    validate_layout(
        parallel,
        minimal_world if world == 1 else world,
        source=str(source),
        **layout_dims(parallel, spec),
    )
    layout = (
        parallel
        if world > 1
        else dataclasses.replace(
            parallel, tp=1, pp=1, ep=1, etp=1, cp=1, vpp=None, sequence_parallel=None
        )
    )
    init_parallel(layout, seed=0, spec=spec, source=str(source))
    return layout
