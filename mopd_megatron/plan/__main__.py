"""`python -m mopd_megatron.plan RECIPE ...`, the same as `mopd-megatron plan RECIPE ...`."""

import argparse
import sys

from mopd_megatron.plan.cli import configure, main

sys.exit(main(configure(argparse.ArgumentParser(prog="mopd-megatron plan")).parse_args()))
