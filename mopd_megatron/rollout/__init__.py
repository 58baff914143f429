"""Rollout stage: SGLang-compatible serving (launch/attach, the embedded CPU engine) and the
one HTTP client that the rollout engine, the teachers and the weight sync share."""

from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.sglang import EngineHandle, start_engine
from mopd_megatron.rollout.transport import EngineError
from mopd_megatron.rollout.types import Generation, SamplingParams, Scores

__all__ = ["EngineClient", "EngineError", "EngineHandle", "Generation", "SamplingParams",
           "Scores", "start_engine"]
