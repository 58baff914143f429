"""Environments for multi-turn rollouts, and the sandbox that runs model-written code (the
code verifier's programs, agent tools): see `envs.sandbox`."""

from mopd_megatron.envs.sandbox import (
    PYTHON,
    Limits,
    Result,
    SandboxUnavailable,
    require,
    run,
    unavailable_reason,
)

__all__ = ["PYTHON", "Limits", "Result", "SandboxUnavailable", "require", "run",
           "unavailable_reason"]
