"""Bad input fails in one line before any rank or model starts (issue 15, item 3)."""

from pathlib import Path

from mopd_megatron.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_cpu.yaml"


def test_a_missing_data_file_stops_train_before_torchrun(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    status = main(["train", str(RECIPE), f"data.train_files=[{missing}]",
                   f"logging.dir={tmp_path / 'run'}"])  # the layout needs torchrun (EP=2)
    err = capsys.readouterr().err
    assert status == 2
    line = f"mopd-megatron train: error: {missing}: prompt file not found"
    assert err.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists()
