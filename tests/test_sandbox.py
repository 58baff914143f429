"""The code sandbox (envs.sandbox) against hostile model-written programs.

Each hostile sample of issue 15 runs through the code verifier: it must score 0 (its own
failure) in bounded time, its side effect must not happen (no file outside its folder, no
secret read, no connection to the host's loopback, no process left behind), and the caller
must survive with bounded memory. The samples are bounded themselves (the fork bomb stops at
200 processes, sleepers end within a minute), so a broken sandbox could not harm the machine
much; they run only where the sandbox is available (CI installs bubblewrap and sets
MOPD_REQUIRE_SANDBOX=1, which turns a missing sandbox into a failure).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mopd_megatron.data import PromptRecord
from mopd_megatron.envs import sandbox
from mopd_megatron.mopd.rewards import score

REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=f"no code sandbox here: {REASON}")
REPO = Path(__file__).resolve().parents[1]


def code_record(tests, timeout_s=5.0):
    return PromptRecord(domain="code", prompt="p", id="hostile", tests=tests,
                        metadata={"timeout_s": timeout_s})


def left_behind(marker: str, wait_s: float = 2.0) -> list[int]:
    """Processes whose command line holds `marker`, once the sandbox had `wait_s` to die."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [p.pid for p in psutil.process_iter(["cmdline"])
                 if marker in " ".join(p.info["cmdline"] or [])]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def run_caller(code: str) -> dict:
    """Run `code` in a fresh Python process (the 'trainer') and return the JSON it prints."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sandbox_is_available_where_required():
    if os.environ.get("MOPD_REQUIRE_SANDBOX") == "1":
        assert REASON is None, REASON


@needs_sandbox
def test_writes_land_in_the_throwaway_folder_only(tmp_path):
    token = uuid.uuid4().hex
    targets = [tmp_path / "escaped", Path(tempfile.gettempdir()) / f"escaped_{token}"]
    program = textwrap.dedent(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
            except OSError:
                pass
    """)
    try:
        assert score(code_record([f"import os\nassert os.path.exists({str(targets[0])!r})"]),
                     program) == 0.0
        written = sandbox.run([sandbox.PYTHON, "-I", "-c", program + "print(open("
                               f"{str(targets[1])!r}).read())"])
        assert written.stdout == "x\n"  # its own /tmp: a tmpfs that is gone with the sandbox
        assert not any(t.exists() for t in targets)
    finally:
        targets[1].unlink(missing_ok=True)


@needs_sandbox
def test_the_trainers_files_and_environment_stay_unread(tmp_path, monkeypatch):
    token = uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o600)
    recipe = REPO / "recipes" / "qwen3_30b_a3b_mopd.yaml"
    monkeypatch.setenv("MOPD_TEST_SECRET", token)
    program = textwrap.dedent(f"""
        import os
        seen = os.environ.get("MOPD_TEST_SECRET", "")
        for path in [{str(secret)!r}, {str(recipe)!r}]:
            try:
                seen += open(path).read()
            except OSError as err:
                print("cannot read", path, err)
        print(seen)
    """)
    tests = [f"assert {token!r} in seen and 'hf_path' in seen"]
    assert score(code_record(tests), program) == 0.0
    result = sandbox.run([sandbox.PYTHON, "-I", "main.py"], files={"main.py": program})
    assert token not in result.stdout and "hf_path" not in result.stdout
    assert result.stdout.count("No such file") == 2


@needs_sandbox
def test_no_connection_reaches_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = textwrap.dedent(f"""
            import socket
            sent = False
            try:
                with socket.create_connection(("127.0.0.1", {port}), timeout=2) as conn:
                    sent = conn.sendall(b"stolen") is None
            except OSError as err:
                print(err)
        """)
        assert score(code_record(["assert sent"]), program) == 0.0
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


@needs_sandbox
def test_a_fork_bomb_is_capped_and_leaves_nothing():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    program = textwrap.dedent("""
        import os, time
        forked = 0
        for _ in range(200):  # bounded even without a sandbox
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(20)
                os._exit(0)
            forked += 1
        print("forked", forked)
    """)
    start = time.perf_counter()
    assert score(code_record(["assert forked >= 200"]), program) == 0.0
    result = sandbox.run([sandbox.PYTHON, "-I", "main.py", marker], files={"main.py": program})
    assert time.perf_counter() - start < 10
    forked = int(result.stdout.split()[-1])
    assert forked < sandbox.Limits().processes
    assert left_behind(marker) == []


@needs_sandbox
def test_killing_its_parent_leaves_the_caller_alive():
    report = run_caller("""
        import json, os
        from mopd_megatron.data import PromptRecord
        from mopd_megatron.mopd.rewards import score
        program = f'''
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        '''
        record = PromptRecord(domain="code", prompt="p", tests=["assert False"])
        print(json.dumps({"score": score(record, program), "alive": True}))
    """)
    assert report == {"score": 0.0, "alive": True}


@needs_sandbox
def test_a_session_leader_child_holding_stdout_does_not_block():
    marker = f"sleeper-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(40)", {marker!r}],
                         start_new_session=True)
        def f(x):
            return -x
    """)
    start = time.perf_counter()
    assert score(code_record(["assert f(2) == 4"], timeout_s=20), program) == 0.0
    assert time.perf_counter() - start < 5
    assert left_behind(marker) == []


@needs_sandbox
def test_huge_output_leaves_the_callers_memory_bounded():
    report = run_caller("""
        import json, resource, time
        from mopd_megatron.data import PromptRecord
        from mopd_megatron.mopd.rewards import score_batch
        program = '''
        import sys
        for _ in range(100):  # 100 MB on each stream
            sys.stdout.write("x" * 1_000_000)
            sys.stderr.write("y" * 1_000_000)
        '''
        record = PromptRecord(domain="code", prompt="p", tests=["pass"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        scores = score_batch([record] * 8, [program] * 8, max_workers=8)
        print(json.dumps({"scores": scores, "seconds": time.perf_counter() - start,
                          "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
    """)
    assert report["scores"] == [0.0] * 8
    assert report["seconds"] < 20
    assert report["grew_kib"] < 64 << 10  # 8 runs x 2 streams x 1 MiB kept, plus buffers


@needs_sandbox
def test_memory_file_size_and_cpu_limits():
    hog = sandbox.run([sandbox.PYTHON, "-I", "-c", "x = bytearray(3 << 30)"])
    assert hog.returncode != 0 and "MemoryError" in hog.stderr
    big = sandbox.run([sandbox.PYTHON, "-I", "-c", "open('f', 'wb').write(bytes(32 << 20))"])
    assert big.returncode != 0 and "File too large" in big.stderr
    spin = sandbox.run([sandbox.PYTHON, "-I", "-c", "while True: pass"],
                       limits=sandbox.Limits(timeout_s=1))
    assert spin.timed_out and not spin.ok


@needs_sandbox
def test_files_stdin_and_its_own_identity():
    result = sandbox.run(
        [sandbox.PYTHON, "-I", "main.py"],
        files={"main.py": "import os, sys\nprint(os.getuid(), sorted(os.listdir('.')), "
                          "open('data/in.txt').read(), sys.stdin.read())",
               "data/in.txt": "file"},
        stdin="input",
    )
    assert result.ok and result.stdout == "65534 ['data', 'main.py'] file input\n"
    with pytest.raises(ValueError, match="relative path"):
        sandbox.run(["true"], files={"../x": ""})


def test_refuses_without_the_sandbox_unless_weak_mode_is_accepted(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "bwrap is missing (test)")
    monkeypatch.setattr(sandbox, "_weak_mode", False)
    with pytest.raises(sandbox.SandboxUnavailable, match=r"bwrap is missing \(test\).*"
                                                         r"data.allow_weak_sandbox"):
        sandbox.run([sandbox.PYTHON, "-c", "print(1)"])
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.require(allow_weak=False)
    sandbox.require(allow_weak=True)
    assert "WEAK MODE" in caplog.text and "bwrap is missing (test)" in caplog.text
    # Weak mode keeps the deadline and the output bound.
    assert sandbox.run([sandbox.PYTHON, "-c", "print(1)"]).stdout == "1\n"
    start = time.perf_counter()
    flood = sandbox.run([sandbox.PYTHON, "-c", "while True: print('x' * 1000)"])
    assert flood.truncated and len(flood.stdout) == sandbox.Limits().output_bytes
    spin = sandbox.run([sandbox.PYTHON, "-c", "while True: pass"],
                       limits=sandbox.Limits(timeout_s=0.5))
    assert spin.timed_out and time.perf_counter() - start < 10


def test_code_prompts_are_refused_before_any_model_is_built(tmp_path, monkeypatch):
    from mopd_megatron.config import DataConfig, RecipeError
    from mopd_megatron.data import save_prompts
    from mopd_megatron.data.prompt_set import load_prompt_set
    from mopd_megatron.demo.tokenizer import build_char_tokenizer

    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "bwrap is missing (test)")
    monkeypatch.setattr(sandbox, "_weak_mode", False)
    path = tmp_path / "prompts.jsonl"
    save_prompts([PromptRecord(domain="math", prompt="1+1=", answer="2"),
                  PromptRecord(domain="code", prompt="rev ab=", tests=["pass"])], path)
    cfg, tokenizer = DataConfig(train_files=[str(path)]), build_char_tokenizer()
    with pytest.raises(RecipeError, match="bwrap is missing"):
        load_prompt_set(cfg, tokenizer, seed=0)
    cfg.allow_weak_sandbox = True
    assert load_prompt_set(cfg, tokenizer, seed=0).domains == ["code", "math"]
