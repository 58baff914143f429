"""HF <-> Megatron-Core conversion for Qwen3 (dense), Qwen3-MoE and DeepSeek-V3 students.

- `spec`: config.json -> `HFModelSpec` (`spec_deepseek`: the DeepSeek-V3 fields and checks).
- `layout`: pure tensor re-layouts (QKV grouping, [gate; up] per TP rank, TP splits, vocab
  padding, expert ownership over EP).
- `names`: Megatron parameter name -> HF tensor names and re-layout kind (`names_deepseek`:
  MLA, shared experts, router expert bias).
- `safetensors_io`: lazy reading (sharded, fused experts, block-wise FP8) and sharded writing
  of HF folders.
- `convert`: HF folder <-> Megatron distributed checkpoint (torch_dist) files.

Submodules are imported explicitly; this package imports nothing (no Megatron at import time).
"""
