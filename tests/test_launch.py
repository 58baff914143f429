"""The launcher: node placement, every process's exact command, the sbatch script, the
per-node runner's lifecycle, and the torchrun scripts in tools/launch/."""

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mopd_megatron.config import load_recipe
from mopd_megatron.launch import cli, runner
from mopd_megatron.launch.commands import JobCommands, Process, job_commands
from mopd_megatron.launch.slurm import render_sbatch
from mopd_megatron.plan.placement import Slot, place
from mopd_megatron.plan.planner import make_plan

ROOT = Path(__file__).resolve().parents[1]
QWEN3_30B = ROOT / "recipes" / "models" / "qwen3_30b_a3b"

RECIPE = """
model: {hf_path: /absent/student, dtype: bfloat16, recompute_activations: true}
parallel: {tp: 4, ep: 16, micro_batch_size: 1, world_size: 16}
rollout: {engine: sglang, tp: 16, dp: 1, max_new_tokens: 4096, sync_mode: disk}
teachers:
  teachers:
    - {name: math, domains: [math], engine: sglang, model_path: /absent/math, tp: 4}
    - {name: proofs, domains: [proofs], engine: sglang, model_path: /absent/math, tp: 4}
    - {name: code, domains: [code], engine: sglang, model_path: /absent/code, tp: 2,
       extra_args: [--chunked-prefill-size, "4096"]}
    - {name: chat, domains: [chat], engine: url, url: "http://elsewhere:8000"}
data: {train_files: [t.jsonl], prompts_per_step: 256, max_prompt_tokens: 1024}
logging: {dir: LOGDIR}
launch:
  gpus_per_node: 8
  gpu_memory_gib: 79.6
  env: {NCCL_SOCKET_IFNAME: ib0}
  ports: {master: 29400}
  slurm: {partition: h100, account: proj, time: "01:00:00", sbatch_args: [--mem=0],
          srun_args: ["--container-image=/images/mopd.sqsh"]}
"""


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("LOGDIR", str(tmp_path / "run")))
    recipe = load_recipe(path)
    plan = make_plan(recipe, str(QWEN3_30B))
    assert plan.ok, plan.problems
    return path, recipe, plan


def test_placement_one_node_and_separate_groups():
    one = place(2, [("rollout", "rollout", 2), ("t", "teachers", 4)], 8)
    assert one.nodes == 1 and one.student.slots == (Slot(0, (0, 1)),)
    assert [s.slots for s in one.servers] == [(Slot(0, (2, 3)),), (Slot(0, (4, 5, 6, 7)),)]
    many = place(16, [("rollout", "rollout", 16), ("a", "teachers", 4), ("b", "teachers", 4),
                      ("c", "teachers", 8), ("d", "teachers", 2)], 8)
    assert many.group_nodes == {"student": 2, "rollout": 2, "teachers": 3} and not many.problems
    assert [slot.node for slot in many.servers[0].slots] == [2, 3]
    assert [s.slots for s in many.servers[1:]] == [
        (Slot(4, (0, 1, 2, 3)),), (Slot(4, (4, 5, 6, 7)),), (Slot(5, tuple(range(8))),),
        (Slot(6, (0, 1)),)]
    bad = place(12, [("rollout", "rollout", 12)], 8)
    assert len(bad.problems) == 2
    assert "must fill whole nodes" in bad.problems[0] and "multiple of" in bad.problems[1]


def test_every_process_command(job):
    _, recipe, plan = job
    hosts = [f"h{i}" for i in range(plan.placement.nodes)]
    assert plan.placement.group_nodes == {"student": 2, "rollout": 2, "teachers": 1}
    commands = job_commands(recipe, plan.placement, hosts)
    python = sys.executable
    student = commands.nodes[1][0]
    assert student.argv == [
        python, "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1",
        "--nproc-per-node=8", "--master-addr=h0", "--master-port=29400", "-m",
        "mopd_megatron.cli", "train", str(commands.recipe_path)]
    assert student.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_SOCKET_IFNAME": "ib0",
                           "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    rollout = [commands.nodes[2][0], commands.nodes[3][0]]
    for rank, process in enumerate(rollout):  # one server over two nodes
        assert process.argv[:3] == [python, "-m", "sglang.launch_server"]
        assert process.argv[-8:] == ["--nccl-port", "40000", "--nnodes", "2", "--node-rank",
                                     str(rank), "--dist-init-addr", "h2:50000"]
        assert "--host" in process.argv and "0.0.0.0" in process.argv
        assert process.argv[process.argv.index("--port") + 1] == "30000"
    teachers = commands.nodes[4]  # math+proofs share one server; code has its own
    assert [p.name for p in teachers] == ["server math+proofs", "server code"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in teachers] == ["0,1,2,3", "4,5"]
    assert teachers[1].argv[teachers[1].argv.index("--port") + 1] == "30200"
    assert ["--chunked-prefill-size", "4096", "--nccl-port", "40200"] == teachers[1].argv[-4:]
    resolved = commands.resolved
    assert resolved["rollout"]["engine"] == "url" and resolved["rollout"]["url"] == "http://h2:30000"
    urls = [(t["engine"], t["url"]) for t in resolved["teachers"]["teachers"]]
    assert urls == [("url", "http://h4:30100"), ("url", "http://h4:30100"),
                    ("url", "http://h4:30200"), ("url", "http://elsewhere:8000")]
    assert commands.student_nodes == [0, 1]


def test_resolved_recipe_loads_and_matches(job, tmp_path):
    _, recipe, plan = job
    commands = job_commands(recipe, plan.placement, [f"h{i}" for i in range(5)])
    from mopd_megatron.launch.commands import write_resolved_recipe

    again = load_recipe(write_resolved_recipe(commands))
    assert again.parallel == recipe.parallel and again.launch == recipe.launch
    assert again.rollout.url == "http://h2:30000" and again.teachers.teachers[1].engine == "url"


@pytest.mark.parametrize("hetjob", [False, True])
def test_sbatch_script(job, hetjob):
    path, recipe, plan = job
    recipe.launch.slurm.hetjob = hetjob
    script = render_sbatch(recipe, plan.placement, [str(path), "train.steps=3"])
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for line in ("#SBATCH --partition=h100", "#SBATCH --account=proj", "#SBATCH --mem=0",
                 "#SBATCH --time=01:00:00", "#SBATCH --gpus-per-node=8"):
        assert line in script
    assert f"-m mopd_megatron.launch {path} train.steps=3 --hosts \"$MOPD_HOSTS\"" in script
    assert "--container-image=/images/mopd.sqsh" in script
    if hetjob:
        assert script.count("#SBATCH hetjob") == 2 and script.count("--partition=h100") == 3
        assert [line for line in script.splitlines() if "--nodes=" in line] == [
            "#SBATCH --nodes=2", "#SBATCH --nodes=2", "#SBATCH --nodes=1"]
        assert "srun --het-group=0,1,2 " in script and "SLURM_JOB_NODELIST_HET_GROUP_" in script
    else:
        assert "#SBATCH --nodes=5" in script and "hetjob" not in script


def test_dry_run_and_refusals(job, capsys):
    path, _, _ = job
    parser = cli.configure(argparse.ArgumentParser())
    args = ["--model-config", str(QWEN3_30B)]
    assert cli.main(parser.parse_args([str(path), *args, "--slurm", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=5" in out and "[node 4: node-4, teachers group]" in out
    assert "--master-addr=node-0" in out and "teacher code: engine url http://node-4:30200" in out
    assert cli.main(parser.parse_args([str(path), *args])) == 2
    assert "needs 5 nodes: use --slurm or --hosts" in capsys.readouterr().err
    assert cli.main(parser.parse_args([str(path), "parallel.ep=6", *args, "--dry-run"])) == 1
    assert "cannot run" in capsys.readouterr().err


@pytest.mark.parametrize("name, nodes", [("qwen3_30b_a3b_mopd", 7), ("mimo_v2_flash_mopd", 23)])
def test_the_shipped_recipes_dry_run_as_written(name, nodes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # their launch.model_config is found from the recipe's folder
    parser = cli.configure(argparse.ArgumentParser())
    recipe = str(ROOT / "recipes" / f"{name}.yaml")
    assert cli.main(parser.parse_args([recipe, "--slurm", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert f"#SBATCH --nodes={nodes}" in out or f"# {nodes} node(s)" in out
    assert cli.main(parser.parse_args([recipe, "--dry-run"])) == 0
    assert f"# {nodes} node(s)" in capsys.readouterr().out


def test_this_node(monkeypatch):
    monkeypatch.setattr(cli.socket, "gethostname", lambda: "gpu07.cluster")
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    assert cli.this_node(["gpu06", "gpu07"]) == 1
    monkeypatch.setenv("SLURMD_NODENAME", "gpu06")
    assert cli.this_node(["gpu06", "gpu07"]) == 0
    with pytest.raises(ValueError, match="pass --node-rank"):
        cli.this_node(["a", "b"])


def _commands(tmp_path, server_code: str) -> JobCommands:
    py = sys.executable
    pidfile = tmp_path / "server.pid"
    code = f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); {server_code}"
    server = Process("server s", [py, "-c", code], {}, str(tmp_path / "server.log"))
    student = Process("student", [py, "-c", "import time; time.sleep(0.3)"], {"X": "1"},
                      str(tmp_path / "student.log"))
    return JobCommands(["a", "b"], tmp_path / "launch", {}, [[student], [server]], [0])


def test_runner_lifecycle(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "POLL_S", 0.05)
    commands = _commands(tmp_path, "time.sleep(60)")
    marker = commands.launch_dir / "done"
    writer = threading.Timer(0.5, lambda: (marker.parent.mkdir(exist_ok=True),
                                           marker.write_text("0\n")))
    writer.start()
    start = time.time()
    assert runner.run_node(commands, 1) == 0  # the server node stops at the end marker
    assert time.time() - start < 10
    pid = int((tmp_path / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    marker.unlink()
    assert runner.run_node(commands, 0) == 0  # the student node writes it
    assert marker.read_text() == "0\n" and (commands.launch_dir / "recipe.yaml").is_file()
    assert (tmp_path / "student.log").read_text().startswith("$ env X=1 ")
    marker.unlink()
    assert runner.run_node(_commands(tmp_path, "raise SystemExit(3)"), 1) == 1  # a server died


def test_torchrun_scripts():
    single = ROOT / "tools" / "launch" / "torchrun_single_node.sh"
    multi = ROOT / "tools" / "launch" / "torchrun_multi_node.sh"
    env = dict(os.environ, DRY_RUN="1", NNODES="2", NODE_RANK="1", MASTER_ADDR="h0",
               NPROC_PER_NODE="4", PYTHON="python")
    out = subprocess.run(["bash", str(multi), "r.yaml", "parallel.tp=2"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1",
                   "--nproc-per-node=4", "--master-addr=h0", "--master-port=29500", "-m",
                   "mopd_megatron.cli", "train", "r.yaml", "parallel.tp=2"]
    out = subprocess.run(["bash", str(single), "r.yaml"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[2:5] == ["torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    missing = subprocess.run(["bash", str(multi), "r.yaml"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]}, check=False)
    assert missing.returncode != 0 and "set NNODES" in missing.stderr
    assert yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())  # untouched
