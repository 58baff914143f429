#!/usr/bin/env python
"""Toy reproduction of the MOPD paper's comparison table on CPU (issue #7).

Runs Mix-RL, Cascade RL, RFT, both parameter merges and the MOPD variants (policy gradient,
teacher top-k, full-vocabulary reverse KL, + ORM, second round) on the toy world for
several seeds, then writes the Markdown table and plots (`mopd_megatron.baselines.table`);
`mopd-megatron baseline table` takes the same arguments.

    python tools/repro_toy_table.py                      # the documented table -> docs/
    python tools/repro_toy_table.py --profile ci         # a smoke test in a few minutes
    python tools/repro_toy_table.py --lr-search --seeds 0 1 2
"""

import sys

from mopd_megatron.baselines.table import main

if __name__ == "__main__":
    sys.exit(main())
