"""mopd-megatron: multi-teacher on-policy distillation for MoE students on Megatron-Core."""
from setuptools import find_packages, setup

CPU_REQUIREMENTS = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "triton==3.9.0",
    "transformers>=5,<6",
    "safetensors",
    "pyyaml",
    "tensorboard",
    "tqdm",
    "psutil",  # megatron dist_checkpointing's file writer needs it
    "matplotlib",
    "msgspec",  # SGLang's own JSON contract types are msgspec structs
]

setup(
    name="mopd-megatron",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["mopd_megatron", "mopd_megatron.*"])
    + ["mopd_megatron.kernels"],
    # The kernels live at the top level of the repository but install inside the package:
    # PyPI has an unrelated distribution named `kernels`.
    package_dir={"mopd_megatron.kernels": "kernels"},
    package_data={"mopd_megatron": ["rollout/sglang_contract/*.py", "rollout/sglang_contract/*.json"]},
    install_requires=CPU_REQUIREMENTS,
    extras_require={
        "test": ["pytest"],
        # The gpu extra is for GPU machines only (NVIDIA apex, if wanted, is built from source
        # there: the PyPI package named apex is unrelated).
        "gpu": ["transformer-engine[pytorch]", "sglang"],
    },
    entry_points={"console_scripts": ["mopd-megatron=mopd_megatron.cli:main"]},
)
