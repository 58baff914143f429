"""Baselines for the MOPD comparison table (MOPD paper, Table 2), runnable with this stack.

Each method consumes the same inputs as MOPD (a student HF folder, one teacher HF folder per
domain, mixed-domain prompt files with verifiers) and produces an HF folder for the student
it ends with, plus, for trained methods, a `history.jsonl` with held-out accuracy over
training (for the sample-efficiency curves):

- `merge`: parameter merging (teacher average; task arithmetic), no training.
- `rft`: off-policy finetune: verified teacher samples -> SFT of the student (Megatron).
- `cascade`: GRPO domain after domain, through `mopd-megatron train`.
- Mix-RL and the MOPD variants are `mopd-megatron train` runs with recipe overrides
  (`methods`); the second MOPD round re-derives teachers from the MOPD student (`round2`).
- `evaluation` scores an HF folder per domain (greedy and sampled) and normalizes it
  (start 0, teacher 1); `curves` turns training histories into normalized score vs samples.
- `table` runs every method over several seeds on the toy world and writes the Markdown
  table and the plots (`tools/repro_toy_table.py`).
"""
