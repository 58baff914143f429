"""The `mopd-megatron` command line: conversion round trip, and one-line errors for bad input."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mopd_megatron.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_convert_round_trip_is_bit_exact(tiny_moe_dir, tmp_path):
    ckpt, back = tmp_path / "megatron", tmp_path / "hf"
    done = _cli("convert", "hf-to-megatron", "--hf-path", str(tiny_moe_dir),
                "--megatron-path", str(ckpt), "--ep", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("convert", "megatron-to-hf", "--megatron-path", str(ckpt), "--hf-path", str(back))
    assert done.returncode == 0, done.stderr[-3000:]
    source, result = load_file(tiny_moe_dir / "model.safetensors"), {}
    for shard in back.glob("*.safetensors"):
        result.update(load_file(shard))
    assert source.keys() == result.keys()
    assert all(torch.equal(source[k], result[k]) for k in source)


def test_bad_inputs_give_one_line_errors(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("parallel: {tpp: 2}\n")
    done = _cli("train", str(typo))
    assert done.returncode == 2
    assert f"{typo}: unknown key 'parallel.tpp'; did you mean 'tp'?" in done.stderr
    assert "Traceback" not in done.stderr

    done = _cli("convert", "megatron-to-hf", "--megatron-path", str(tmp_path / "none"),
                "--hf-path", str(tmp_path / "out"), "--hf-config", str(tmp_path / "none"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(tmp_path / "none") in done.stderr
