"""Launch stage: turn a planned recipe into running processes, on one node, on a list of
hosts, or through SLURM.

`commands` derives every node's exact commands (torchrun for the student, SGLang servers for
the rollout engine and the teachers) and the recipe the student trains with; `runner` runs one
node's share; `slurm` renders and submits the sbatch script (`tools/launch/`); `cli` is
`mopd-megatron launch`; `local` lets a one-node command (`train`) re-run itself
under torchrun when its layout needs several ranks.
"""
