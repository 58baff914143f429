"""Rollout/sync stage, wire format of /update_weights_from_tensor: named tensors -> JSON fields.

Consumes (HF name, tensor) pairs and the server's /server_info; produces the request's
`serialized_named_tensors` (and `load_format`) in the format that server reads:

- the embedded CPU engine advertises `safetensors_b64` in `update_weights_from_tensor_formats`:
  one base64 safetensors payload of CPU copies (so the tensors really travel in the JSON);
- a real SGLang reads its own format: per TP rank, the base64 pickle of SGLang's
  `MultiprocessingSerializer`, which carries CUDA IPC handles (by device UUID) of CUDA
  tensors. Each rank gets a pickle of its own (SGLang's `deserialize_own_rank`: opening
  another rank's copy would break the producer's CUDA IPC reference counts). Only a process
  on the same node can send it, and only CUDA tensors: SGLang's patched reducer fails on CPU
  tensors, so these are refused here with a clear message.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

SAFETENSORS_B64 = "safetensors_b64"
"""`load_format` of the embedded engine's tensor payload."""


def tensor_payload(named: list[tuple[str, torch.Tensor]], server_info: dict) -> dict[str, Any]:
    """The `load_format` / `serialized_named_tensors` fields for this server."""
    if SAFETENSORS_B64 in server_info.get("update_weights_from_tensor_formats", []):
        return {"load_format": SAFETENSORS_B64, "serialized_named_tensors": [_safetensors(named)]}
    ranks = int(server_info.get("tp_size", 1))
    return {"serialized_named_tensors": [_sglang_pickle(named) for _ in range(ranks)]}


def _safetensors(named: list[tuple[str, torch.Tensor]]) -> str:
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for name, t in named}  # contiguous, no shared storage
    return base64.b64encode(save(tensors)).decode("ascii")


def _sglang_pickle(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's own `MultiprocessingSerializer.serialize(named, output_str=True)`."""
    where = next((name for name, t in named if not t.is_cuda), None)
    if where is not None:
        raise ValueError(f"SGLang's update_weights_from_tensor takes CUDA tensors (CUDA IPC "
                         f"handles); {where} is on the CPU: use rollout.sync_mode 'disk' or "
                         "'distributed', or keep the exported weights on the GPU")
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError as err:
        raise ValueError("SGLang's tensor format needs the sglang package in the trainer "
                         "(pip install -e '.[gpu]')") from err
    monkey_patch_torch_reductions()  # CUDA tensors are then pickled by device UUID
    return MultiprocessingSerializer.serialize(named, output_str=True)
