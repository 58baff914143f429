"""Bad input fails in one line before any rank or model starts (issue 15, item 3)."""

from pathlib import Path

from tiny_models import make_tiny_hf_model

from mopd_megatron.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_cpu.yaml"


def test_a_missing_data_file_stops_train_before_torchrun(tmp_path, capsys, tiny_moe_dir):
    missing = tmp_path / "missing.jsonl"
    status = main(["train", str(RECIPE), f"data.train_files=[{missing}]",
                   f"model.hf_path={tiny_moe_dir}",
                   f"logging.dir={tmp_path / 'run'}"])  # the layout needs torchrun (EP=2)
    err = capsys.readouterr().err
    assert status == 2
    line = f"mopd-megatron train: error: {missing}: prompt file not found"
    assert err.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists()


def test_a_truncated_hf_checkpoint_is_named_in_one_line(tmp_path, capsys):
    hf = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe")
    weights = hf / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    capsys.readouterr()  # the model's own progress bar
    status = main(["convert", "hf-to-megatron", "--hf-path", str(hf),
                   "--megatron-path", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"mopd-megatron convert: error: {weights}: not a readable")


def test_a_missing_student_checkpoint_stops_train_in_one_line(tmp_path, capsys):
    status = main(["train", str(RECIPE), f"model.hf_path={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"mopd-megatron train: error: {tmp_path / 'nowhere'}: "
                                   "HF checkpoint folder not found"]


def test_an_unknown_verifier_stops_train_before_any_model(tmp_path, capsys, tiny_moe_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "1+1=", "domain": "poetry", "answer": "2"}\n')
    status = main(["train", str(RECIPE), f"model.hf_path={tiny_moe_dir}", "parallel.ep=1",
                   f"data.train_files=[{prompts}]", "data.eval_files=[]", "data.domain_weights={}",
                   f"logging.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "no verifier for domain 'poetry'" in err[-1], err
    assert not (tmp_path / "run" / "checkpoints").exists()
