"""Recipes: YAML -> one dataclass per stage, with validation that names the file and the key.

A recipe is a YAML mapping whose top-level keys are the stages below. Every key must be a
field of its stage's dataclass (a typo is an error that suggests the closest field), every
value must have the field's type, and a required field without a default must be set.
Command-line overrides use dotted keys: `parallel.tp=2 optimizer.lr=3e-4`.

Each stage's dataclass checks its own values (`check`); `validate` adds the rules between
stages. The layout rules that need the model (heads, experts, layers) are the student's
(`student.layout.validate_layout`), checked once the student's HF config is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe (file or override) that cannot be run, with the place and the expectation."""


@dataclass
class ModelConfig:
    hf_path: str = ""
    """Student HF checkpoint folder (config.json + safetensors + tokenizer)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training precision; bf16 wraps the model in Megatron's Float16Module."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times TP; padded columns are masked."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    """Router load-balancing loss weight (0 = off, as usual for RL and distillation)."""
    recompute_activations: bool = False
    """Full activation recompute per layer (saves memory at ~30% more compute)."""

    def check(self, src: str) -> None:
        _require(src, "model.hf_path", self.hf_path, "the student's HF checkpoint folder")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size (MoE experts are split over EP ranks)."""
    etp: int = 1
    """Expert tensor-parallel size (1 works with the alltoall dispatcher on gloo)."""
    cp: int = 1
    """Context-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = off."""
    sequence_parallel: bool | None = None
    """None = on whenever tp > 1 (Megatron requires it for MoE with TP)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch in the training step."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl with CUDA, gloo without."""
    world_size: int = 0
    """Ranks `mopd-megatron train` starts on this machine when not launched by torchrun;
    0 = the fewest that fit the layout (dp just large enough for ep*etp)."""

    def check(self, src: str) -> None:
        for name in ("tp", "pp", "ep", "etp", "cp", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(
                    f"{src}: 'parallel.{name}' must be >= 1, got {getattr(self, name)}")

    @property
    def use_sequence_parallel(self) -> bool:
        """Whether Megatron splits the sequence over TP ranks (it takes tp > 1)."""
        return self.tp > 1 and self.sequence_parallel is not False

    @property
    def nproc(self) -> int:
        if self.world_size:
            return self.world_size
        experts = self.ep * self.etp
        min_dp = experts // math.gcd(experts, self.tp * self.cp)
        return self.tp * self.pp * self.cp * min_dp


@dataclass
class EngineConfig:
    """One serving engine: the student's rollout engine or a teacher."""

    engine: Literal["local", "sglang", "url"] = "local"
    """local = embedded CPU engine; sglang = launch an SGLang server; url = attach to one."""
    model_path: str = ""
    """HF checkpoint to serve (for the rollout engine: defaults to the student's)."""
    url: str = ""
    """Base URL when engine is `url` (e.g. http://10.0.0.5:30000)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 = pick a free port."""
    tp: int = 1
    dp: int = 1
    ep: int = 1
    mem_fraction_static: float = 0.8
    extra_args: list[str] = field(default_factory=list)
    """Extra command-line flags for `sglang.launch_server`."""
    timeout_s: float = 120.0
    """Per-request timeout."""
    max_retries: int = 3
    max_concurrency: int = 8
    batch_size: int = 64
    """Sequences per HTTP request."""


@dataclass
class RolloutConfig(EngineConfig):
    n_samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = off."""
    max_new_tokens: int = 256
    sync_mode: Literal["tensor", "disk", "distributed"] = "tensor"
    """How new student weights reach the rollout engine."""
    sync_check: bool = True
    """After each sync, compare engine and trainer log-probs on a fixed probe."""
    source: Literal["on_policy", "teacher_samples"] = "on_policy"
    """Where training trajectories come from: on_policy = the student's own samples (MOPD,
    RL); teacher_samples = verified samples of each prompt's teacher, drawn once at the start
    (off-policy fine-tuning, RFT; train with algorithm.loss: sft)."""
    teacher_sample_prompts: int = 0
    """teacher_samples: prompts to sample teachers on (x n_samples_per_prompt); 0 = all."""
    routing_replay: bool = True
    """Rollout routing replay (R3) for MoE students: the engine returns every token's routed
    experts (SGLang: --enable-return-routed-experts) and the trainer's routers use them, so
    both engines run the same experts. Ignored for dense students; teachers never replay.
    Turn off to measure the mismatch, or for an engine that cannot return routes."""
    max_turns: int = 4
    """Multi-turn prompts (records naming an environment): assistant turns per episode at most;
    each turn ends with a tool call or the final answer (max_new_tokens bounds one turn)."""
    max_episode_tokens: int = 4096
    """Multi-turn prompts: tokens of a whole episode (prompt, turns, tool outputs) at most;
    keep it below the model's context length (SGLang refuses an input that fills the whole
    context, and the teachers prefill the whole episode)."""
    environment_modules: list[str] = field(default_factory=list)
    """Python modules imported before the rollout starts, to register the environments that
    prompt records name (e.g. mopd_megatron.demo.agentic registers `lookup`)."""
    max_staleness: int = 0
    """k: the rollout samples and scores up to k steps ahead of training, with the newest
    weights the engine has, so a trained batch was sampled by weights at most k optimizer
    steps old (`async_rollout.py`). 0 = the synchronous loop: sample, score, train, sync."""
    stale_policy: Literal["wait", "drop"] = "wait"
    """How the bound holds: wait = batch s is sampled by exactly the weights of step s - 1 - k
    (each side waits for the other; reproducible, resumes exactly); drop = the rollout never
    waits for the trainer, which drops and counts batches past the bound."""

    def check(self, src: str) -> None:
        if self.engine == "url":
            _require(src, "rollout.url", self.url, "the running engine's base URL")
        if self.max_staleness < 0:
            raise RecipeError(f"{src}: 'rollout.max_staleness' must be >= 0 (0 = synchronous), "
                              f"got {self.max_staleness}")
        if self.stale_policy == "drop" and self.max_staleness == 0:
            raise RecipeError(f"{src}: 'rollout.stale_policy' drop needs "
                              "'rollout.max_staleness' >= 1 (at 0 every batch sampled during a "
                              "step would be dropped)")
        if self.max_staleness and self.source != "on_policy":
            raise RecipeError(f"{src}: 'rollout.max_staleness' applies to on-policy sampling, "
                              f"but rollout.source is {self.source!r}")


@dataclass
class TeacherConfig(EngineConfig):
    name: str = ""
    domains: list[str] = field(default_factory=list)
    """Prompt domains this teacher scores."""
    payload: Literal["", "sampled", "topk", "student_topk", "hidden_states", "local"] = ""
    """What the teacher sends the trainer: "" = the loss's default; sampled = log-prob of each
    sampled token (pg); topk = its top-k log-probs (topk); student_topk = its log-probs at the
    student's own top-k tokens, asked through SGLang's token_ids_logprob (topk); hidden_states = its final hidden
    state per position, turned into full-vocabulary logits in the trainer by the teacher's
    LM-head shard (full_rkl / forward_kl with no teacher model in the trainer); local = no
    server, the teacher model runs inside the trainer (full_rkl / forward_kl's default)."""
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype the hidden states travel in from the teacher's client to every rank."""


@dataclass
class TeachersConfig:
    teachers: list[TeacherConfig] = field(default_factory=list)
    default: str | None = None
    """Teacher name for domains that no teacher lists; None = unknown domain is an error."""
    check_tokenizer: bool = True
    """Fail at start-up if a teacher's vocabulary differs from the student's."""

    def check(self, src: str) -> None:
        for i, t in enumerate(self.teachers):
            key, what = (("url", "the teacher server's base URL") if t.engine == "url"
                         else ("model_path", "the teacher's HF checkpoint folder"))
            _require(src, f"teachers.teachers[{i}].{key}", getattr(t, key), what)
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names) or "" in names:
            raise RecipeError(
                f"{src}: every teachers.teachers[i].name must be set and unique, got {names}")
        if self.default is not None and self.default not in names:
            raise RecipeError(f"{src}: teachers.default {self.default!r} is not one of {names}")
        seen: dict[str, str] = {}
        for t in self.teachers:
            for d in t.domains:
                if d in seen:
                    raise RecipeError(
                        f"{src}: domain {d!r} is served by both {seen[d]!r} and {t.name!r}")
                seen[d] = t.name


@dataclass
class AlgorithmConfig:
    loss: Literal["pg", "topk", "full_rkl", "forward_kl", "grpo", "sft"] = "pg"
    """pg = MOPD policy gradient on the sampled token (paper default); topk = corrected
    teacher top-k reverse KL; full_rkl / forward_kl = exact full-vocabulary KL (local teacher);
    grpo = outcome reward only, no teacher (the Mix-RL / Cascade-RL baselines); sft = token-mean
    cross-entropy on fixed trajectories (RFT). See `mopd/objectives.py`."""
    adv_clip: float = 5.0
    """A_max: the teacher advantage is clipped to [-A_max, A_max]."""
    orm_coef: float = 0.0
    """alpha: weight of the GRPO outcome-reward advantage (0 = pure distillation)."""
    icepop_low: float = 0.5
    """IcePop gate: tokens with pi_theta/mu_theta below this get weight 0."""
    icepop_high: float = 2.0
    """IcePop gate: tokens with pi_theta/mu_theta above this get weight 0."""
    topk: int = 64
    """k of the teacher top-k loss: the teachers are asked for their top-k log-probs."""

    def check(self, src: str) -> None:
        if not 0 < self.icepop_low < 1 < self.icepop_high:
            raise RecipeError(
                f"{src}: IcePop bounds need 0 < algorithm.icepop_low < 1 < "
                f"algorithm.icepop_high, got [{self.icepop_low}, {self.icepop_high}]")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    decay: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    """Shard the fp32 main weights and Adam moments over data-parallel ranks (Megatron's
    distributed optimizer, NCCL only: it fails on gloo). The planner counts the memory it saves."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL or Parquet prompt files (fields: prompt or messages, domain, answer, ...)."""
    eval_files: list[str] = field(default_factory=list)
    domain_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per domain (the paper: math 0.35, IF 0.35, SWE 0.30); empty = natural mix."""
    prompts_per_step: int = 64
    apply_chat_template: bool = False
    max_prompt_tokens: int = 1024
    allow_weak_sandbox: bool = False
    """Where the code sandbox (bubblewrap) is unavailable, run code verifiers in weak mode
    (the trainer's user, no namespaces; README, 'The code sandbox') instead of refusing."""

    def check(self, src: str) -> None:
        _require(src, "data.train_files", self.train_files, "a list of JSONL/Parquet prompt files")


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Megatron distributed checkpoints go here ('' = <logging.dir>/checkpoints)."""
    save_interval: int = 50
    keep_last: int = 2
    resume: bool = True
    """Resume from the newest checkpoint in `dir` when one exists."""
    export_hf: bool = True
    """Export the final student as an HF checkpoint (<dir>/hf)."""


@dataclass
class LoggingConfig:
    dir: str = "runs/mopd"
    tensorboard: bool = True
    eval_interval: int = 0
    """Steps between held-out evaluations (0 = only at start and end)."""


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234


@dataclass
class PortsConfig:
    """TCP ports the launcher assigns; server i of the job uses base + 100 i."""

    master: int = 29500
    """torchrun rendezvous (MASTER_PORT) on the student's first node."""
    engine: int = 30000
    """HTTP port of SGLang server i (rollout first, then one per teacher model)."""
    nccl: int = 40000
    """SGLang's --nccl-port of server i (its tensor-parallel NCCL rendezvous)."""
    dist_init: int = 50000
    """A server spanning several nodes: its --dist-init-addr port on its first node."""
    weight_sync: int = 29700
    """Rendezvous of the distributed weight sync (sync_mode: distributed) on the student's
    first node."""


@dataclass
class SlurmConfig:
    """The `#SBATCH` header and srun options of `mopd-megatron launch RECIPE --slurm`."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "04:00:00"
    """Wall-clock limit (HH:MM:SS or D-HH:MM:SS)."""
    job_name: str = "mopd"
    hetjob: bool = False
    """One heterogeneous-job component per node group (student, rollout, teachers) instead of
    one allocation whose node list is split in order."""
    exclusive: bool = True
    sbatch_args: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options, e.g. ['--constraint=h100', '--mem=0']."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun options, e.g. ['--container-image=/images/mopd.sqsh'] (pyxis)."""


@dataclass
class LaunchConfig:
    """Where the job runs: the cluster's nodes, GPUs, ports and scheduler settings.

    The student's world size is `parallel.world_size` (0 = the fewest ranks the layout
    needs); its ranks fill whole nodes. Each `sglang` engine (the rollout engine, and one per
    distinct teacher model) becomes one SGLang server on tp * dp GPUs (tp with
    data-parallel attention, `--attn-dp-size`), on nodes of its own group.
    """

    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    """Memory of one GPU as nvidia-smi reports it (H100 80GB: 79.6, H200: 139.8)."""
    memory_utilization: float = 0.9
    """Fraction of a GPU the student may plan to fill; the rest covers the CUDA context, NCCL
    buffers and allocator fragmentation."""
    model_config: str = ""
    """config.json (or a folder holding one) that `plan` and `launch` use for every model
    folder not on this machine yet, e.g. models/qwen3_30b_a3b; a relative path is taken from
    the recipe's folder. `--model-config` overrides it."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the sbatch script runs before srun (module load, source a venv); srun passes
    the environment they leave to every node."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of every process (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, HF_HOME, ...)."""
    ports: PortsConfig = field(default_factory=PortsConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str = field(default="<defaults>", compare=False, repr=False,
                        metadata={"yaml": False})
    """Where the recipe came from (for error messages); not a YAML key."""

    @property
    def checkpoint_root(self) -> Path:
        """Where the run's `iter_*` checkpoints go (`checkpoint.dir`, else under the run)."""
        return Path(self.checkpoint.dir or Path(self.logging.dir) / "checkpoints")

    @property
    def hf_export_dir(self) -> Path:
        """Where the final student is exported as an HF checkpoint."""
        return self.checkpoint_root / "hf"


# ---------------------------------------------------------------------------------------
# YAML -> dataclasses


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `key.sub=value` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: expected a mapping of stages at the top, got {type(raw).__name__}"
        )
    for item in overrides:
        _apply_override(raw, item, path)
    recipe = from_dict(Recipe, raw, source=str(path))
    recipe.source = str(path)
    validate(recipe)
    return recipe


def from_dict(cls: type, raw: Any, source: str = "<dict>", where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where or 'recipe'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (
                f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            )
            raise RecipeError(f"{source}: unknown key '{dotted}'{hint}")
        values[key] = _coerce(hints[key], value, source, dotted)
    return cls(**values)


def _coerce(tp: Any, value: Any, source: str, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, where)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{source}: '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: '{where}' must be a list, got {value!r}")
        return [_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{source}: '{where}' must be {tp.__name__}, got {value!r}")
    return value


def _apply_override(raw: dict, item: str, source: Path) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key.sub=value (e.g. parallel.tp=2)")
    key, text = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: '{part}' is not a mapping in {source}")
    node[parts[-1]] = yaml.safe_load(text)


def to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (for logging and for saving beside checkpoints)."""
    data = dataclasses.asdict(recipe)
    data.pop("source", None)
    return data


def edit_recipe(recipe: Recipe, **stages: dict[str, Any]) -> Recipe:
    """A copy of `recipe` with fields of its stages replaced, validated again.

    `edit_recipe(r, parallel={"tp": 2}, train={"steps": 10})`: a misspelt stage or field is
    a TypeError from `dataclasses.replace`, as in any typed code.
    """
    changes = {name: dataclasses.replace(getattr(recipe, name), **fields)
               for name, fields in stages.items()}
    edited = dataclasses.replace(recipe, **changes)
    validate(edited)
    return edited


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write `recipe` as a YAML file that `load_recipe` reads back to an equal recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------
# Validation


def validate(recipe: Recipe) -> None:
    """Every stage's own rules, then the rules between stages (the model-dependent layout
    rules are the student's: `student.layout.validate_layout`)."""
    src = recipe.source
    for stage in dataclasses.fields(Recipe):
        check = getattr(getattr(recipe, stage.name), "check", None)
        if check is not None:
            check(src)
    from .mopd.objectives import objective_class  # imported here: it imports this module

    objective, r = objective_class(recipe.algorithm), recipe.rollout
    if (r.source == "teacher_samples") != objective.trains_on_fixed_samples:
        raise RecipeError(
            f"{src}: rollout.source 'teacher_samples' goes with an objective that trains on fixed "
            f"samples (algorithm.loss: sft), got source {r.source!r} with loss {objective.name!r}"
        )
    need = objective.min_samples_per_prompt
    if r.n_samples_per_prompt < need:
        raise RecipeError(
            f"{src}: algorithm.loss '{objective.name}' needs rollout.n_samples_per_prompt >= "
            f"{need} (its advantage compares the samples of one prompt), got "
            f"{r.n_samples_per_prompt}"
        )
    _check_payloads(recipe, objective)
    served = {d for t in recipe.teachers.teachers for d in t.domains}
    unknown = set(recipe.data.domain_weights) - served
    if served and recipe.teachers.default is None and unknown:
        raise RecipeError(
            f"{src}: data.domain_weights names domains no teacher serves: {sorted(unknown)}"
        )


def _check_payloads(recipe: Recipe, objective: Any) -> None:
    """Every teacher's payload is one the loss trains on, and all teachers send the same."""
    chosen = {t.payload or (objective.payloads or ("",))[0] for t in recipe.teachers.teachers}
    for i, t in enumerate(recipe.teachers.teachers):
        if t.payload and t.payload not in objective.payloads:
            raise RecipeError(
                f"{recipe.source}: teachers.teachers[{i}].payload {t.payload!r} (teacher "
                f"{t.name!r}) does not feed algorithm.loss {objective.name!r}, which takes "
                f"{list(objective.payloads) or 'no teacher'}")
    if len(chosen) > 1:
        raise RecipeError(f"{recipe.source}: every teacher must send the same payload, got "
                          f"{sorted(chosen)}")
    for i, t in enumerate(recipe.teachers.teachers):
        if t.payload == "hidden_states":  # the trainer reads its LM head from there
            _require(recipe.source, f"teachers.teachers[{i}].model_path", t.model_path,
                     "the teacher's HF folder, whose LM head turns its hidden states into logits")


def teacher_payload(recipe: Recipe) -> str:
    """The payload the recipe's teachers send ("" = the loss's default)."""
    return next((t.payload for t in recipe.teachers.teachers if t.payload), "")


def _require(src: str, key: str, value: Any, what: str) -> None:
    if not value:
        raise RecipeError(f"{src}: missing required value '{key}' ({what})")
