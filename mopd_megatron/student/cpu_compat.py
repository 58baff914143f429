"""Student stage: the CPU shims that let Megatron-Core 0.16.1 run without CUDA (gloo, CPU torch).

This is the only place in the project that special-cases the CPU. `apply_cpu_patches()` is a
no-op when a CUDA device exists, and idempotent otherwise. It installs, in order (numbers as in
`reference/cpu-feasibility.md`, which shows each one's first error without it):

1. an RNG-state tracker on the CPU generator (attention always forks the model-parallel RNG);
   the CUDA RNG get/set helpers that activation recompute calls become CPU no-ops;
2. `torch.cuda.current_device() -> "cpu"` (RoPE, TP buffers, the MoE router, p2p buffers);
3. dummy CUDA streams and events (the alltoall token dispatcher);
4. `moe_utils.te_general_gemm = None` (a NameError in 0.16.1 when TE is absent);
5. a `WrappedTorchNorm` that accepts sequence parallelism and tags its parameters
   `sequence_parallel` so `finalize_model_grads` all-reduces their gradients over TP;
6. alltoall split sizes moved to host numpy arrays (gloo's `all_to_all_single` needs lists);
7. a global `TorchFunctionMode` mapping `device="cuda"`, `.cuda()` and `.to("cuda")` to CPU,
   kept on through backward passes, and `torch.cuda.synchronize` as a no-op (pipeline
   schedules, p2p, the default causal mask, activation recompute);
8. gradient clipping by total norm without the CUDA-only multi-tensor kernels;
9. `multi_latent_attention.HAVE_TE = False` when Transformer Engine is absent: 0.16.1 imports
   `megatron.core.extensions.transformer_engine`, whose TE classes are then `MagicMock`s, so
   `HAVE_TE` is True and `isinstance(self.linear_proj, TELinear)` raises a TypeError when an
   MLA layer is built (`MultiLatentAttention.__init__`).

Patches 1-9 are installed together: each is harmless where it is not needed.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

_STATE: dict = {"applied": False, "mode": None}


def apply_cpu_patches() -> bool:
    """Install the CPU shims once, when no CUDA device exists.

    Call it after `torch.distributed` is initialised and before the model is built (the RNG
    tracker must exist before `model_parallel_cuda_manual_seed`).

    Returns:
        True when the shims are installed (now or earlier), False on a CUDA machine.
    """
    if torch.cuda.is_available():
        return False
    if _STATE["applied"]:
        return True
    _install_rng_tracker()
    torch.cuda.current_device = lambda: "cpu"
    _install_streams()
    _install_moe_fixes()
    _install_mla_fix()
    _install_sequence_parallel_norm()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _STATE["mode"] = _CudaToCpuMode()
    _STATE["mode"].__enter__()
    _install_clip_grad()
    _STATE["applied"] = True
    return True


# 1. RNG ----------------------------------------------------------------------------------


def _install_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG states, kept for the CPU generator instead of the CUDA one."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves/restores the CUDA state beside the CPU one it already keeps.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


# 3. Streams ------------------------------------------------------------------------------


class _DummyEvent:
    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


class _DummyStream:
    """One shared stream object; a class (not a function) so `torch.cuda.Stream | None` works."""

    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _DummyStream)

    def __hash__(self):
        return 0


def _install_streams() -> None:
    torch.cuda.Stream = _DummyStream
    torch.cuda.current_stream = lambda *args, **kwargs: _DummyStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


# 4 + 6. MoE ------------------------------------------------------------------------------


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _install_moe_fixes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moe_utils.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu


# 9. MLA without Transformer Engine -------------------------------------------------------


def _install_mla_fix() -> None:
    import importlib.util

    from megatron.core.transformer import multi_latent_attention

    if importlib.util.find_spec("transformer_engine") is None:
        multi_latent_attention.HAVE_TE = False


# 5. Sequence-parallel norm ---------------------------------------------------------------


def _install_sequence_parallel_norm() -> None:
    from megatron.core.transformer import torch_norm

    def __new__(
        cls,
        config,
        hidden_size,
        eps=1e-5,
        persist_layer_norm=False,
        zero_centered_gamma=False,
        normalization="LayerNorm",
    ):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        module = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in module.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return module

    torch_norm.WrappedTorchNorm.__new__ = __new__


# 7. Device mapping -----------------------------------------------------------------------


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call.

    A mode is switched off while its own handler runs, so a backward pass entered through
    `Tensor.backward` / `torch.autograd.backward` would run without it (and activation
    recompute re-runs forward code that allocates on "cuda"). Those two calls are therefore
    replayed here on autograd's engine with the mode kept on.
    """

    @staticmethod
    def _fix(device):
        if isinstance(device, str) and device.startswith("cuda"):
            return "cpu"
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        if isinstance(device, int) and not isinstance(device, bool):
            return "cpu"
        return device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = self._fix(kwargs["device"])
        if func in (torch.Tensor.backward, torch.autograd.backward):
            return self._backward(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], self._fix(args[1]), *args[2:])
        return func(*args, **kwargs)

    def _backward(self, func, args, kwargs):
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        tensors = call["self"] if "self" in call else call["tensors"]
        tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
        grads = call["gradient"] if "gradient" in call else call["grad_tensors"]
        inputs = call["inputs"]
        inputs = () if inputs is None else (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        retain_graph = (
            call["create_graph"] if call["retain_graph"] is None else call["retain_graph"]
        )
        with self:
            grads = _make_grads(
                tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False
            )
            _engine_run_backward(
                tensors,
                grads,
                retain_graph,
                call["create_graph"],
                inputs,
                allow_unreachable=True,
                accumulate_grad=True,
            )


# 8. Gradient clipping --------------------------------------------------------------------


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.mul_(clip_coeff)


def _install_clip_grad() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
