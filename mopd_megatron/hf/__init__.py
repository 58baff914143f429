"""HF <-> Megatron-Core conversion for Qwen3 (dense) and Qwen3-MoE students.

- `spec`: config.json -> `HFModelSpec`.
- `layout`: pure tensor re-layouts (QKV grouping, [gate; up] per TP rank, TP splits, vocab
  padding, expert ownership over EP).
- `names`: Megatron parameter name -> HF tensor names and re-layout kind.
- `safetensors_io`: lazy reading (sharded, fused experts) and sharded writing of HF folders.
- `megatron_io`: load HF weights into a built model at any layout; streaming HF export.
- `convert`: HF folder <-> Megatron distributed checkpoint (torch_dist) files.

Submodules are imported explicitly; this package imports nothing (no Megatron at import time).
"""
