"""Rollout/teacher stage, engine lifecycle: launch or attach a server, wait until healthy, stop it.

Consumes an `EngineConfig` (engine kind, model path, parallel sizes, port, limits) and
produces an `EngineHandle` with the server's `url` and an `EngineClient`. One entry point,
`start_engine`, serves the student's rollout engine and every teacher:

- `sglang`: `python -m sglang.launch_server --model-path P --host H --port N
  [--enable-return-routed-experts] --tp-size .. --dp-size .. --ep-size ..
  --mem-fraction-static .. [extra_args]` (a GPU machine; the routes flag, on both engine
  kinds, when the rollout engine's `routing_replay` is on);
- `local`: the embedded CPU engine, `python -m mopd_megatron.rollout.local_server` with the
  same flags where it has them (`extra_args` are passed on, e.g. `--num-threads 2`);
- `url`: attach to a server that is already running at `cfg.url` (nothing is launched or
  stopped).

A launched server runs in its own process group with its log streamed to
`<log_dir>/<name>.log`; the handle waits for GET /health up to a deadline (failing early,
with the log's tail, if the process exits), and `stop()` sends SIGTERM to the group, then
SIGKILL after a grace period. Handles stop on context exit and at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from mopd_megatron.config import EngineConfig
from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.transport import EngineError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_command(cfg: EngineConfig, model_path: str, port: int) -> list[str]:
    """The server command line for `cfg.engine` in {sglang, local}."""
    common = ["--model-path", str(model_path), "--host", cfg.host, "--port", str(port)]
    # Routing replay: only the rollout engine's config has the key (teachers never replay).
    if getattr(cfg, "routing_replay", False):
        common.append("--enable-return-routed-experts")
    # A teacher that sends hidden states needs SGLang's flag for them.
    if getattr(cfg, "payload", "") == "hidden_states":
        common.append("--enable-return-hidden-states")
    if cfg.engine == "local":
        if max(cfg.tp, cfg.dp, cfg.ep) > 1:
            raise ValueError(f"the embedded CPU engine runs tp=dp=ep=1, got tp={cfg.tp} "
                             f"dp={cfg.dp} ep={cfg.ep}")
        return [sys.executable, "-m", "mopd_megatron.rollout.local_server", *common,
                *cfg.extra_args]
    return [sys.executable, "-m", "sglang.launch_server", *common, "--tp-size", str(cfg.tp),
            "--dp-size", str(cfg.dp), "--ep-size", str(cfg.ep),
            "--mem-fraction-static", str(cfg.mem_fraction_static), *cfg.extra_args]


class EngineHandle:
    """A running (or attached) engine: `url`, `client`, `stop()`; a context manager.

    Args:
        url: Base URL of the server.
        client: Its HTTP client.
        process: The launched server process, or None when attached.
        log_path: Where the launched server's output goes.
    """

    def __init__(self, url: str, client: EngineClient, process: subprocess.Popen | None = None,
                 log_path: Path | None = None):
        self.url, self.client, self.process, self.log_path = url, client, process, log_path
        if process is not None:
            atexit.register(self.stop)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server log ('' when attached)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self, deadline_s: float) -> None:
        """Poll GET /health until 200.

        Raises:
            EngineError: The process exited, or the deadline passed (with the log's tail).
        """
        end = time.monotonic() + deadline_s
        while not self.client.health():
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(self.url, f"server exited with code {self.process.returncode} "
                                  f"before becoming healthy; log {self.log_path}:\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > end:
                raise EngineError(self.url, f"not healthy after {deadline_s:g} s; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate a launched server's process group (SIGTERM, then SIGKILL); idempotent."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_engine(cfg: EngineConfig, model_path: str | None = None, log_dir: str | Path = ".",
                 name: str = "engine", startup_timeout_s: float = 900.0,
                 wait: bool = True) -> EngineHandle:
    """Launch (or attach to) the server `cfg` describes and wait until it is healthy.

    Args:
        cfg: The engine's recipe section (a RolloutConfig or TeacherConfig works too).
        model_path: Checkpoint to serve when `cfg.model_path` is empty (e.g. the student's).
        log_dir: Folder of the server log `<name>.log`.
        name: Name of the engine in logs and errors (e.g. 'rollout', 'teacher-math').
        startup_timeout_s: Deadline for GET /health to answer 200.
        wait: Wait for health here; False returns at once (launch several engines, then
            call `handle.wait_healthy(deadline)` on each).

    Returns:
        The handle; use it as a context manager or call `stop()`.
    """
    if cfg.engine == "url":
        if not cfg.url:
            raise ValueError(f"{name}: engine 'url' needs the server's url")
        handle = EngineHandle(cfg.url, EngineClient.from_config(cfg.url, cfg))
        if wait:
            handle.wait_healthy(startup_timeout_s)
        return handle
    path = cfg.model_path or model_path
    if not path:
        raise ValueError(f"{name}: no model_path to serve")
    port = cfg.port or free_port(cfg.host)
    url = f"http://{cfg.host}:{port}"
    log_path = Path(log_dir) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = launch_command(cfg, path, port)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    handle = EngineHandle(url, EngineClient.from_config(url, cfg), process, log_path)
    try:
        if wait:
            handle.wait_healthy(startup_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle
