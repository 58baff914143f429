"""Planner stage, output: a `Plan` as the text `mopd-megatron plan` prints.

Consumes a `Plan`; produces a few aligned lines: the model and its counts, the layout, the
step's shape, memory per student rank and pipeline stage, GPUs and nodes per group, each
SGLang server, and the verdict (every problem, or that the job fits).
"""

from __future__ import annotations

from mopd_megatron.plan.planner import Plan
from mopd_megatron.plan.serving import GIB
from mopd_megatron.plan.timing import format_times, step_times


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B"


def _gib(count: float) -> str:
    return f"{count / GIB:.1f}"


def format_plan(plan: Plan) -> str:
    """The plan as text (see the module docstring)."""
    r, p, s, m = plan.recipe, plan.recipe.parallel, plan.shape, plan.params
    lines = [f"plan for {r.source}"]
    lines.append(
        f"model     {plan.spec.model_type} ({plan.spec_source}): {_billions(m.total)} parameters, "
        f"{_billions(m.active)} active, {_billions(m.non_embedding)} non-embedding; vocabulary "
        f"{plan.spec.vocab_size}, padded to {plan.padded_vocab} at tp {p.tp}"
    )
    features = [r.model.dtype, "sequence parallel" if p.use_sequence_parallel else
                "no sequence parallel",
                "distributed optimizer" if r.optimizer.use_distributed_optimizer else
                "replicated optimizer",
                "full recompute" if r.model.recompute_activations else "no recompute"]
    lines.append(
        f"layout    {s.world_size} student ranks = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {s.dp}"
        f"{f' (vpp {p.vpp})' if p.vpp else ''}; experts: ep {p.ep} x etp {p.etp} x expert-dp "
        f"{s.expert_dp}; " + ", ".join(features)
    )
    lines.append(
        f"step      {s.sequences} sequences of up to {s.seq_len} tokens; "
        f"{s.sequences // s.dp} per DP rank in {s.micro_batches} micro-batches of "
        f"{p.micro_batch_size}"
    )
    lines.append(f"memory    per student rank, GiB (usable {_gib(plan.usable_bytes)} of "
                 f"{r.launch.gpu_memory_gib})")
    header = ("stage", "params", "weights", "grads", "optimizer", "activations", "kl-buffers",
              "total")
    rows = [header] + [
        (str(st.stage), _billions(st.params.total), _gib(st.weights), _gib(st.gradients),
         _gib(st.optimizer), _gib(st.activations), _gib(st.kl_buffers), _gib(st.total))
        for st in plan.stages
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
              for row in rows]
    if plan.payload is not None and plan.payload.payload:
        lines.append("teachers  " + _payload_line(plan))
    lines.append("GPUs      " + _gpus_line(plan))
    for server, placed in zip(plan.servers, plan.placement.servers, strict=True):
        per_replica = server.kv_tokens // s.seq_len
        waves = f"; {-(-s.sequences // per_replica)} waves per step" if per_replica else ""
        lines.append(
            f"  {server.name}: {server.gpus} GPUs on node(s) "
            f"{','.join(str(slot.node) for slot in placed.slots)}, weights "
            f"{_gib(server.weights_per_gpu)} GiB/GPU, KV cache {server.kv_tokens} tokens = "
            f"{per_replica} full-length sequences at once" + (waves if server.key == "rollout"
                                                              else "")
        )
    times = step_times(plan)
    if times is not None:
        lines += format_times(times)
    if plan.ok:
        lines.append("verdict   fits: no problems found")
    else:
        count = len(plan.problems)
        lines.append(f"verdict   cannot run ({count} problem{'s' if count > 1 else ''}):")
        lines += [f"  - {problem}" for problem in plan.problems]
    return "\n".join(lines)


def _payload_line(plan: Plan) -> str:
    """The teacher payload against the alternatives, per token, per step and in the trainer."""
    pay, k = plan.payload, min(plan.recipe.algorithm.topk, plan.spec.vocab_size)
    sizes = ", ".join(f"{name if name != 'topk' else f'top-{k}'} {size}"
                      for name, size in pay.per_token.items())
    line = f"payload {pay.payload}; bytes per scored token: {sizes}"
    if pay.step_bytes:
        line += (f"; {pay.step_bytes / 2**20:.1f} MiB per step from the teachers to rank 0, "
                 "and again to every other rank")
    if pay.trainer_bytes:
        line += f"; {_gib(pay.trainer_bytes)} GiB on a last-stage rank (in kl-buffers)"
    return line


def _gpus_line(plan: Plan) -> str:
    placement = plan.placement
    parts = [f"student {plan.shape.world_size}"]
    for group in ("rollout", "teachers"):
        gpus = sum(sv.gpus for sv in plan.servers
                   if (sv.key == "rollout") == (group == "rollout"))
        if gpus:
            parts.append(f"{group} {gpus}")
    nodes = ", ".join(f"{group} {count}" for group, count in placement.group_nodes.items()
                      if count)
    return (f"{' + '.join(parts)} GPUs on {placement.nodes} node(s) of "
            f"{placement.gpus_per_node} GPUs ({nodes})")
