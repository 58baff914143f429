"""Planner stage: from a recipe and its models' config.json, the job's memory per rank, its
GPUs and nodes, and every reason it cannot run, before anything is queued.

`params` counts parameters per rank, `memory` adds gradients, optimizer state, activations
and the KL kernel's buffers, `serving` sizes the SGLang servers, `placement` assigns nodes,
`planner.make_plan` puts them together, `report` prints the result, `meta` builds ranks on
the meta device to check the counts, and `cli` is `mopd-megatron plan`.
"""
