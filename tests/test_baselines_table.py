"""The comparison table end to end at the `ci` profile: every method runs two steps on a tiny
toy world through the real loop and engines, and the Markdown table and plots are written."""

import json

from experiments.docs import LABELS
from experiments.methods import METHODS
from experiments.table import main


def test_ci_table_runs_every_method(tmp_path):
    out = tmp_path / "table"
    assert main(["--profile", "ci", "--out", str(out), "--seeds", "0"]) == 0
    table = (out / "docs" / "toy_table.md").read_text()
    for name in METHODS:
        result = json.loads((out / "seed0" / f"{name}.json").read_text())
        assert set(result["test"]) == {"greedy", "sampled"}, name
        assert LABELS[name] in table, name
    assert json.loads((out / "seed0" / "mopd_round2.json").read_text())["samples"] == 2 * 2 * 16
    assert len(json.loads((out / "seed0" / "cascade_rl.json").read_text())["segments"]) == 2
    assert (out / "docs" / "toy_curves.png").stat().st_size > 0
    assert "python -m experiments.table" not in table or "--profile ci" in table
