"""mopd-megatron: multi-teacher on-policy distillation for MoE students on Megatron-Core."""
from setuptools import find_packages, setup

# Honest ranges: each admits only releases this project has run (the CPU lock,
# requirements/cpu.lock, and the GPU lock's SGLang pins). Installs use a lock file; see README.
CPU_REQUIREMENTS = [
    "torch>=2.13,<2.15",  # 2.13.0 CPU (tests); 2.14.1 is what sglang 0.5.23 pins (GPU lock)
    "megatron-core==0.16.1",  # the CPU patches in student/cpu_compat.py are for this release
    "triton>=3.8,<3.10",  # 3.9.0 CPU lock; torch 2.14.1 needs 3.8
    "transformers>=5.19,<5.26",  # 5.25.0 CPU lock; sglang 0.5.23 pins 5.19.0
    "safetensors>=0.8,<0.9",
    "pyyaml>=6.0,<7",
    "tensorboard>=2.21,<3",
    "tqdm>=4.70,<5",
    "psutil>=7.2,<8",  # megatron dist_checkpointing's file writer needs it
    "matplotlib>=3.11,<4",
    "msgspec>=0.23,<0.24",  # SGLang's own JSON contract types are msgspec structs
]

setup(
    name="mopd-megatron",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # Only `mopd_megatron` is importable: nothing at the repository root may shadow a
    # dependency's top-level name (Hugging Face's `kernels` is one, via transformers/SGLang).
    packages=find_packages(include=["mopd_megatron", "mopd_megatron.*"]),
    package_data={"mopd_megatron": ["rollout/sglang_contract/*.py", "rollout/sglang_contract/*.json"]},
    install_requires=CPU_REQUIREMENTS,
    extras_require={
        "test": ["pytest>=9,<10"],
        # The gpu extra is for GPU machines only (NVIDIA apex, if wanted, is built from source
        # there: the PyPI package named apex is unrelated).
        # SGLang pinned to the release whose HTTP contract the project checks
        # (rollout/sglang_contract/); install with requirements/gpu.lock.
        "gpu": ["transformer-engine[pytorch]>=2.8,<3", "sglang==0.5.23"],
    },
    entry_points={"console_scripts": ["mopd-megatron=mopd_megatron.cli:main"]},
)
