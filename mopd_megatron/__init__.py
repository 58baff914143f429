"""mopd-megatron: multi-teacher on-policy distillation (MOPD) for MoE students on Megatron-Core."""
__version__ = "0.1.0"
