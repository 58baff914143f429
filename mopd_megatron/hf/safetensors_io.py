"""HF conversion stage: read and write HF safetensors folders tensor by tensor.

Reading: one `model.safetensors`, or shards listed in `model.safetensors.index.json`. Experts
may be stored per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, [I, H] / [H, I]) or
fused per layer (`mlp.experts.gate_up_proj` [E, 2I, H] with gate rows first, and
`mlp.experts.down_proj` [E, H, I]); callers always ask for per-expert names and only that
expert's slice is read. A folder that mixes both layouts is rejected. Block-wise FP8 weights
(DeepSeek-V3's release: float8_e4m3 `W` [M, N] plus fp32 `W_scale_inv` [ceil(M/bm), ceil(N/bn)],
block size from config.json's `quantization_config.weight_block_size`) are dequantized on read
to fp32, `W * scale_inv` per block; the scale tensors themselves are never asked for.

Writing: buckets of (HF name, tensor) become safetensors shards of bounded size, an index,
and copies of the source folder's other files (config.json, tokenizer, generation config).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class HFCheckpointError(ValueError):
    """A missing, incomplete or malformed HF weight folder (names the file and the tensor)."""


class HFCheckpointReader:
    """Lazily reads named tensors from an HF safetensors folder.

    Args:
        hf_dir: the folder.

    Raises:
        HFCheckpointError: no folder, no safetensors, or a mix of expert layouts.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise HFCheckpointError(f"{self.dir}: HF checkpoint folder not found")
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            self.source = index
            self.files = {
                k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()
            }
        elif single.is_file():
            self.source = single
            with _open_safetensors(single) as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise HFCheckpointError(f"{self.dir}: neither {INDEX} nor {SINGLE} found")
        self.fused = any(_FUSED.fullmatch(k) for k in self.files)
        if self.fused and any(_PER_EXPERT.fullmatch(k) for k in self.files):
            raise HFCheckpointError(
                f"{self.source}: mixes per-expert keys (mlp.experts.N.*_proj.weight) and fused "
                "keys (mlp.experts.gate_up_proj / down_proj); convert it to one layout"
            )
        self._handles: dict[Path, object] = {}
        self.fp8_block = _fp8_block(self.dir / "config.json")

    def get(self, name: str) -> torch.Tensor:
        """The tensor named `name` (per-expert naming for experts in either layout; FP8
        weights dequantized to fp32).

        Raises:
            HFCheckpointError: the tensor is not in the folder, or an FP8 weight has no scale.
        """
        if name in self.files:
            tensor = self._open(name).get_tensor(name)
            if tensor.dtype not in _FP8:
                return tensor
            scale = f"{name}_scale_inv"
            if scale not in self.files:
                raise HFCheckpointError(
                    f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale!r} to dequantize it"
                )
            return dequantize_fp8(tensor, self._open(scale).get_tensor(scale), self.fp8_block)
        expert = _PER_EXPERT.fullmatch(name) if self.fused else None
        if expert is None:
            raise HFCheckpointError(f"{self.source}: tensor {name!r} not found")
        prefix, e, proj = expert.groups()
        key = f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
        if key not in self.files:
            raise HFCheckpointError(f"{self.source}: tensor {key!r} (for {name!r}) not found")
        sliced = self._open(key).get_slice(key)
        e = int(e)
        if e >= sliced.get_shape()[0]:
            raise HFCheckpointError(f"{self.file_of(name)}: {key!r} has no expert {e}")
        if sliced.get_dtype().startswith("F8"):
            raise HFCheckpointError(f"{self.source}: FP8 fused experts ({key!r}) are not supported")
        if proj == "down":
            return sliced[e]
        width = sliced.get_shape()[1] // 2
        return sliced[e, :width] if proj == "gate" else sliced[e, width:]

    def file_of(self, name: str) -> Path:
        """The file that holds `name` (for error messages)."""
        expert = _PER_EXPERT.fullmatch(name) if self.fused else None
        if expert is not None:
            name = (
                f"{expert.group(1)}.{'down_proj' if expert.group(3) == 'down' else 'gate_up_proj'}"
            )
        return self.files.get(name, self.source)

    def _open(self, name: str):
        path = self.files[name]
        if not path.is_file():
            raise HFCheckpointError(
                f"{self.source}: shard {path.name} (holding {name!r}) not found"
            )
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path)
        return self._handles[path]


def _open_safetensors(path: Path):
    """`safe_open`, with a truncated or corrupt file named in one line."""
    try:
        return safe_open(path, "pt")
    except Exception as err:  # safetensors raises its own error type, or OSError
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _fp8_block(config: Path) -> tuple[int, int]:
    """config.json's `quantization_config.weight_block_size` (DeepSeek's 128 x 128 if unset)."""
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        quant = {}
    return tuple(quant.get("weight_block_size") or (128, 128))


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """Block-wise FP8 -> fp32: each (bm, bn) block of `weight` times its `scale_inv` entry.

    Args:
        weight: [M, N] float8.
        scale_inv: [ceil(M / bm), ceil(N / bn)].
        block: (bm, bn).

    Returns:
        [M, N] float32.
    """
    (rows, cols), (bm, bn) = weight.shape, block
    if tuple(scale_inv.shape) != (-(-rows // bm), -(-cols // bn)):
        raise HFCheckpointError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight "
            f"in {bm}x{bn} blocks"
        )
    scale = scale_inv.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return weight.float() * scale


def write_hf_folder(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    out_dir: str | Path,
    source_dir: str | Path,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write streamed HF tensors as a safetensors folder, plus the source folder's other files.

    Args:
        buckets: lists of (HF name, tensor), e.g. `student.hf_weights.export_hf_weights(...)`.
        out_dir: the folder to write (created).
        source_dir: the HF folder whose config.json, tokenizer and other non-weight files
            are copied; config.json's dtype is set to the written tensors' dtype.
        max_shard_bytes: shard size bound (a bigger tensor gets a shard of its own).

    Returns:
        `out_dir`.
    """
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes, dtype = [0], None

    def flush() -> None:
        save_file(shards[-1], out_dir / f"shard-{len(shards):05d}.tmp", metadata={"format": "pt"})
        shards[-1] = dict.fromkeys(shards[-1])
        shards.append({})
        sizes.append(0)

    for bucket in buckets:
        for name, tensor in bucket:
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                flush()
            shards[-1][name] = tensor.detach().to("cpu").contiguous()
            sizes[-1] += nbytes
            dtype = dtype or (tensor.dtype if tensor.is_floating_point() else None)
    if shards[-1]:
        flush()
    shards.pop()
    total = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        final = SINGLE if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        (out_dir / f"shard-{i:05d}.tmp").rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    if total > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    copy_hf_metadata(source_dir, out_dir, dtype)
    return out_dir


def copy_hf_metadata(
    source_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Copy an HF folder's non-weight files (config, tokenizer, ...) into `out_dir`.

    Args:
        source_dir: the HF folder.
        out_dir: destination (created).
        dtype: when given, config.json's `dtype` / `torch_dtype` is set to it and its
            `quantization_config` dropped (the written weights are not quantized).
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    same = source_dir.resolve() == out_dir.resolve()
    for path in source_dir.iterdir():
        if (
            not same
            and path.is_file()
            and path.name != INDEX
            and not path.name.endswith(_WEIGHT_SUFFIXES)
        ):
            shutil.copyfile(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or (key == "dtype" and "torch_dtype" not in config):
                config[key] = name
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
