"""Engine lifecycle without a GPU: command lines, attaching, and failures that name the cause."""

import sys
import time

import pytest

from mopd_megatron.config import EngineConfig, RolloutConfig
from mopd_megatron.rollout import EngineError, SamplingParams, start_engine
from mopd_megatron.rollout.sglang import free_port, launch_command


def test_sglang_command_line_from_the_recipe():
    cfg = EngineConfig(engine="sglang", tp=4, dp=1, ep=4, mem_fraction_static=0.7,
                       extra_args=["--attn-dp-size", "2"])
    assert launch_command(cfg, "/ckpt/qwen3-30b-a3b", 30011) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/ckpt/qwen3-30b-a3b",
        "--host", "127.0.0.1", "--port", "30011", "--tp-size", "4", "--dp-size", "1",
        "--ep-size", "4", "--mem-fraction-static", "0.7", "--attn-dp-size", "2"]
    local = launch_command(EngineConfig(extra_args=["--num-threads", "2"]), "/ckpt/tiny", 1234)
    assert local[1:3] == ["-m", "mopd_megatron.rollout.local_server"]
    assert local[-2:] == ["--num-threads", "2"]
    with pytest.raises(ValueError, match="tp=dp=ep=1"):
        launch_command(EngineConfig(tp=2), "/ckpt/tiny", 1234)


def test_sampling_params_from_the_rollout_recipe():
    cfg = RolloutConfig(temperature=0.8, top_p=0.95, top_k=-1, max_new_tokens=10)
    sp = SamplingParams.from_config(cfg)
    assert sp.to_sglang() == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 10}


def test_attach_deadline_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    tic = time.monotonic()
    with pytest.raises(EngineError, match="not healthy after 0.5 s"):
        start_engine(EngineConfig(engine="url", url=url), startup_timeout_s=0.5)
    assert time.monotonic() - tic < 5


def test_server_that_dies_at_start_up_fails_fast_with_its_log(tmp_path):
    with pytest.raises(EngineError, match=r"(?s)server exited with code \d+ .*not_a_model"):
        start_engine(EngineConfig(engine="local"), str(tmp_path / "not_a_model"), tmp_path, "bad")
    assert "$ " in (tmp_path / "bad.log").read_text()  # the command line heads the log
