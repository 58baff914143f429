"""Distributed checkpoints of the student: bit-exact resume, keep_last, resharding, and the
one-line errors of a damaged checkpoint.

Launch 1 (TP2+SP, MoE) trains 4 steps and saves after steps 1-3 with keep_last=2.
Launch 2, a fresh process, loads step 2 and must reproduce steps 3 and 4 bit for bit (loss,
grad norm, lr, and the Python / torch RNG streams), then loads the same checkpoint at EP2
and PP2: the model's log-probs match, and the resharded optimizer reproduces steps 3-4.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from multirank import run_torchrun

from mopd_megatron.student.checkpoint import CheckpointError, check_checkpoint

RESHARD = ("ep2", "pp2")


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    common = ("--hf", str(tiny_moe_dir), "--ckpt", str(ckpt))
    first = run_torchrun("ckpt_resume.py", 2, *common, "--phase", "train")
    second = run_torchrun("ckpt_resume.py", 2, *common, "--phase", "resume",
                          "--reshard", ",".join(RESHARD))
    return first, second


def _without_time(step: dict) -> dict:
    return {key: value for key, value in step.items() if key != "seconds"}


def test_resume_is_bit_exact(runs):
    first, second = runs
    for rank in range(2):
        for number in ("3", "4"):
            assert _without_time(second[rank]["steps"][number]) == _without_time(
                first[rank]["steps"][number]
            )
        assert second[rank]["extra"] == {"step": 2, "sampler": {"epoch": 0, "position": 16}}


def test_keep_last_and_latest_marker(runs):
    first, _ = runs
    assert first[0]["listing"] == ["iter_0000002", "iter_0000003", "latest"]


@pytest.mark.parametrize("layout", RESHARD)
def test_load_at_another_layout(runs, layout):
    first, second = runs
    resharded = second[0]["reshard"][layout]
    torch.testing.assert_close(torch.tensor(resharded["probe"]), torch.tensor(first[0]["probe"]),
                               rtol=0, atol=1e-5)
    for number in ("3", "4"):
        want, got = first[0]["steps"][number], resharded["steps"][number]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == want["lr"]


SAVE_SMALL_CHECKPOINT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from mopd_megatron.student.cpu_compat import apply_cpu_patches

    if __name__ == "__main__":
        apply_cpu_patches()
        dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}.store", rank=0,
                                world_size=1)
        weight = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
        state = {"w": ShardedTensor.from_rank_offsets("w", weight), "extra": {"step": 7}}
        dist_checkpointing.save(state, sys.argv[1])
""")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A real torch_dist checkpoint (one sharded tensor and common state), saved by Megatron."""
    path = tmp_path_factory.mktemp("small") / "iter_0000007"
    path.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SAVE_SMALL_CHECKPOINT, str(path)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    check_checkpoint(path)
    return path


@pytest.mark.parametrize("name, damage, message", [
    ("__0_0.distcp", "half", r"__0_0.distcp: truncated: \d+ bytes, but its tensors end at byte"),
    ("__0_0.distcp", "delete", r"__0_0.distcp: missing \(the tensor index .metadata lists it\)"),
    (".metadata", "half", r"\.metadata: unreadable, truncated or corrupt \(UnpicklingError"),
    ("common.pt", "half", (r"common.pt: unreadable, truncated or corrupt \(RuntimeError: "
                           r"PytorchStreamReader failed reading zip archive")),
    ("common.pt", "empty", r"common.pt: unreadable, truncated or corrupt \(EOFError\)"),
    ("metadata.json", "half", r"metadata.json: unreadable, truncated or corrupt \(JSONDecode"),
    ("metadata.json", "delete", r"iter_0000007: not a Megatron distributed checkpoint"),
])
def test_a_damaged_checkpoint_names_the_file_in_one_line(small_checkpoint, tmp_path, name,
                                                         damage, message):
    bad = shutil.copytree(small_checkpoint, tmp_path / "iter_0000007")
    file = bad / name
    if damage == "delete":
        file.unlink()
    else:
        os.truncate(file, file.stat().st_size // 2 if damage == "half" else 0)
    with pytest.raises(CheckpointError, match=message) as caught:
        check_checkpoint(bad)
    assert "\n" not in str(caught.value) and str(bad) in str(caught.value)


def test_convert_names_a_truncated_checkpoint_in_one_line(small_checkpoint, tiny_moe_dir,
                                                          tmp_path):
    bad = shutil.copytree(small_checkpoint, tmp_path / "iter_0000007")
    os.truncate(bad / "__0_0.distcp", 1000)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mopd_megatron.cli", "convert", "megatron-to-hf",
         "--megatron-path", str(bad), "--hf-path", str(tmp_path / "hf"),
         "--hf-config", str(tiny_moe_dir)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: {bad / '__0_0.distcp'}: truncated: 1000 bytes" in done.stderr
