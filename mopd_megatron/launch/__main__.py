"""`python -m mopd_megatron.launch RECIPE ...`, the same as `mopd-megatron launch RECIPE ...`
(the sbatch script runs this form on every node)."""

import argparse
import sys

from mopd_megatron.launch.cli import configure, main

sys.exit(main(configure(argparse.ArgumentParser(prog="mopd-megatron launch")).parse_args()))
