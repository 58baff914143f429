"""Sync stage, by disk: write the student's weights as an HF checkpoint, then reload it.

Consumes buckets of (HF checkpoint name, tensor) and a template HF folder (config,
generation config, tokenizer); produces an HF checkpoint folder (one safetensors shard per
bucket + `model.safetensors.index.json` + the template's non-weight files) and asks the
engine to load it with POST /update_weights_from_disk. The engine must see the folder
(same machine or a shared file system). Works with every engine; the slowest path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.sync.tensor import Bucket

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


def write_hf_checkpoint(buckets: Iterable[Bucket], out_dir: str | Path,
                        template_dir: str | Path) -> Path:
    """Write `buckets` as safetensors shards with an index, plus the template's other files.

    Args:
        buckets: Lists of (HF name, tensor); every weight of the model, once.
        out_dir: Output folder (old weight files in it are removed first).
        template_dir: HF folder whose config/tokenizer files are copied.

    Returns:
        The output folder.
    """
    out, template = Path(out_dir), Path(template_dir)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_FILES:
        for old in out.glob(pattern):
            old.unlink()
    weights = {p for pattern in WEIGHT_FILES for p in template.glob(pattern)}
    for f in template.iterdir():
        if f.is_file() and f not in weights:
            shutil.copy2(f, out / f.name)
    weight_map, total = {}, 0
    shards = [bucket for bucket in buckets if bucket]
    for i, bucket in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                   for name, t in bucket}
        duplicate = set(tensors) & set(weight_map)
        if duplicate or len(tensors) != len(bucket):
            raise ValueError(f"weights sent twice: {sorted(duplicate)[:5] or 'within a bucket'}")
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


class DiskSync:
    """Push weights through an HF folder on disk.

    Args:
        client: The rollout engine's client.
        out_dir: Folder to (re)write on every push.
        template_dir: The student's HF folder (config and tokenizer to copy).
    """

    def __init__(self, client: EngineClient, out_dir: str | Path, template_dir: str | Path):
        self.client, self.out_dir, self.template_dir = client, Path(out_dir), template_dir

    def push(self, buckets: Iterable[Bucket], weight_version: str | None = None) -> None:
        """Write the checkpoint, then POST /update_weights_from_disk with its path."""
        path = write_hf_checkpoint(buckets, self.out_dir, self.template_dir)
        self.client.update_weights_from_disk(str(path.resolve()), weight_version=weight_version)
