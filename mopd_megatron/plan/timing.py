"""Planner stage, time: how long one step keeps each GPU group busy, and how long it idles,
in the synchronous loop and with the rollout ahead of training (`rollout.max_staleness` ≥ 1).

Consumes a `Plan` (step shape, SGLang servers) and the rates of one GPU (`Rates`); produces
`StepTimes`: seconds of one step per phase, and the GPU-seconds each group (student, rollout,
teachers) spends idle per step in both modes. A first-order model, to compare layouts and
modes, not to predict a wall clock:

- mean lengths: prompts and responses fill `Rates.fill` of data.max_prompt_tokens and
  rollout.max_new_tokens (P and G tokens).
- rollout (decode, HBM-bound): each replica runs its share of the sequences in waves of as
  many as its KV cache holds at the mean context P + G/2; a wave takes G decode steps, each
  reading the weights and the KV cache in use of one GPU at `hbm_efficiency` of its bandwidth.
- teachers (prefill, compute-bound): 2 · N_active · tokens of the domains a server scores
  (data.domain_weights, equal shares when unset) at `prefill_mfu`; the slowest server counts.
- train: (6 + 2 with full recompute) · N_active · tokens over the student's GPUs at
  `train_mfu`.
- sync: the student's bf16 weights at the rate of rollout.sync_mode; student and rollout
  engine both take part.

Synchronous, the step is max(rollout, teachers) + train + sync (teacher scoring overlaps
the rollout chunk by chunk); ahead of training, each group runs its own phase back to back
and the step is max(rollout + sync, teachers, train + sync). A group's idle GPU-seconds per
step are its GPUs times (step − its busy time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mopd_megatron.plan.params import model_params
from mopd_megatron.plan.planner import Plan, load_spec, sglang_servers
from mopd_megatron.plan.serving import GIB, attention_dp

GROUPS = ("student", "rollout", "teachers")


@dataclass(frozen=True)
class Rates:
    """What one GPU delivers (H100 SXM: 989 dense bf16 TFLOP/s, 3.35 TB/s HBM3)."""

    peak_flops: float = 989e12
    hbm_bytes_per_s: float = 3.35e12
    train_mfu: float = 0.35
    """Achieved fraction of peak in the Megatron step (MoE, long sequences)."""
    prefill_mfu: float = 0.5
    """Achieved fraction of peak in the teachers' prefill."""
    hbm_efficiency: float = 0.6
    """Achieved fraction of HBM bandwidth in a decode step."""
    fill: float = 0.5
    """Mean prompt and response length as a fraction of their limits."""
    sync_bytes_per_s: tuple[tuple[str, float], ...] = (
        ("tensor", 50e9), ("distributed", 20e9), ("disk", 2e9))
    """Weight-sync rate by rollout.sync_mode: CUDA IPC in a node, NCCL over the network, a
    shared filesystem."""


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one step per phase, and GPUs per group."""

    rollout: float
    teachers: float
    train: float
    sync: float
    gpus: dict[str, int]

    def busy(self) -> dict[str, float]:
        return {"student": self.train + self.sync, "rollout": self.rollout + self.sync,
                "teachers": self.teachers}

    def step(self, ahead: bool) -> float:
        """Seconds of one step: synchronous, or with the rollout ahead of training."""
        if ahead:
            return max(self.busy().values())
        return max(self.rollout, self.teachers) + self.train + self.sync

    def idle(self, ahead: bool) -> dict[str, float]:
        """GPU-seconds each group idles per step."""
        step = self.step(ahead)
        return {g: self.gpus[g] * (step - busy) for g, busy in self.busy().items()}


def step_times(plan: Plan, rates: Rates = Rates()) -> StepTimes | None:
    """The step's phases for a plan whose rollout and teachers are SGLang servers (None
    otherwise: an embedded or attached engine has no GPUs to count)."""
    r, s = plan.recipe, plan.shape
    launched = sglang_servers(r)
    if not launched or launched[0].name != "rollout" or len(launched) < 2:
        return None
    prompt = rates.fill * r.data.max_prompt_tokens
    response = rates.fill * r.rollout.max_new_tokens
    tokens = s.sequences * (prompt + response)
    active = model_params(plan.spec).active

    rollout, rollout_server = launched[0], plan.servers[0]
    replicas = attention_dp(rollout.cfg) or rollout.cfg.dp
    per_gpu = int(rollout.cfg.mem_fraction_static * r.launch.gpu_memory_gib * GIB)
    pool = per_gpu - rollout_server.weights_per_gpu
    context = prompt + response / 2
    per_replica = rollout_server.kv_tokens / replicas
    running = max(1, min(math.ceil(s.sequences / replicas), int(per_replica // context)))
    waves = math.ceil(s.sequences / replicas / running)
    kv_read = pool * running * context / per_replica
    decode_step = ((rollout_server.weights_per_gpu + kv_read)
                   / (rates.hbm_bytes_per_s * rates.hbm_efficiency))
    rollout_s = waves * response * decode_step

    weights = dict(r.data.domain_weights)
    teachers_s = 0.0
    for server, plan_server in zip(launched[1:], plan.servers[1:], strict=True):
        domains = [d for i in server.teachers for d in r.teachers.teachers[i].domains]
        share = (sum(weights.get(d, 0.0) for d in domains) / sum(weights.values())
                 if weights else len(server.teachers) / len(r.teachers.teachers))
        spec, _ = load_spec(server.model_path, f"{server.key}.model_path", plan.spec_source)
        flops = 2 * model_params(spec).active * share * tokens
        teachers_s = max(teachers_s, flops / (plan_server.gpus * rates.peak_flops
                                              * rates.prefill_mfu))

    passes = 8 if r.model.recompute_activations else 6
    train_s = passes * active * tokens / (s.world_size * rates.peak_flops * rates.train_mfu)
    sync_s = 2 * plan.params.total / dict(rates.sync_bytes_per_s)[r.rollout.sync_mode]
    gpus = {"student": s.world_size, "rollout": rollout_server.gpus,
            "teachers": sum(sv.gpus for sv in plan.servers[1:])}
    return StepTimes(rollout_s, teachers_s, train_s, sync_s, gpus)


def format_times(times: StepTimes, rates: Rates = Rates()) -> list[str]:
    """The plan report's lines: phases, then idle GPU-seconds per group in both modes."""
    lines = [(
        f"time      one step, modelled (H100 rates; MFU train {rates.train_mfu}, prefill "
        f"{rates.prefill_mfu}; HBM {rates.hbm_efficiency:.0%}; lengths {rates.fill:.0%} of "
        f"their limits): rollout {times.rollout:.0f} s, teachers {times.teachers:.0f} s, "
        f"train {times.train:.0f} s, sync {times.sync:.0f} s")]
    for ahead, label in ((False, "synchronous"), (True, "rollout.max_staleness >= 1")):
        step, idle = times.step(ahead), times.idle(ahead)
        groups = ", ".join(
            f"{g} {idle[g]:,.0f} ({idle[g] / (times.gpus[g] * step):.0%})" for g in GROUPS)
        lines.append(f"idle      GPU-s per step, {label}: step {step:.0f} s; {groups}")
    gain = times.step(False) / times.step(True)
    lines.append(f"          steps per hour ahead of training / synchronous: {gain:.2f}x")
    return lines
