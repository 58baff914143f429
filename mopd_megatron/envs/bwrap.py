"""The sandbox's isolation: the bubblewrap (`bwrap`) command line around a command.

Inside, the command sees:

- its own PID namespace (only its own processes; every one dies with bubblewrap), network
  namespace (a loopback of its own, nothing outside), mount, IPC, UTS and cgroup namespaces;
- an empty root with /usr (and the /bin, /lib, ... links), the Python interpreter's prefix and
  /etc/ld.so.cache read-only, a fresh /proc and a minimal /dev;
- /tmp, its working folder and the only writable place: a size-limited tmpfs holding the
  caller's files, gone with the sandbox;
- no capabilities, a new session, and `prlimit` limits on processes, CPU time, address
  space, file size and open files.

It runs as uid 65534 (nobody) with no supplementary groups. Started by an unprivileged user,
bubblewrap maps that uid to the caller's own in a user namespace that cannot create further
user namespaces. Started by root, a user namespace would map it to root outside, so instead
bubblewrap sets up as root and `setpriv` switches to the real unprivileged uid 65534, with no
capabilities and no way to gain any, before the command starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

SANDBOX_UID = 65534
"""The sandbox's user and group (`nobody` / `nogroup` on Debian)."""
WORKDIR = "/tmp"
PREFIX = os.path.realpath(sys.base_prefix)
PYTHON = os.path.join(PREFIX, "bin", "python{}.{}".format(*sys.version_info[:2]))
"""This interpreter's own executable (outside any virtual environment); its prefix is visible
in the sandbox, so `[PYTHON, "-I", ...]` runs model-written Python there."""
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ETC = ("/etc/ld.so.cache", "/etc/alternatives")
NAMESPACES = ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
              "--unshare-cgroup-try")


def bwrap_argv(command: Sequence[str], limits, files: dict[str, int]) -> list[str]:
    """The full command line that runs `command` in the sandbox.

    Args:
        command: what to run, with /tmp as its working folder.
        limits: a `sandbox.Limits`.
        files: name (relative to /tmp) -> a readable descriptor with that file's content.
    """
    argv = ["bwrap", *NAMESPACES, "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--cap-drop", "ALL"]
    root = os.geteuid() == 0
    if root:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
                 "--gid", str(SANDBOX_UID)]
    argv += _filesystem(limits.folder_bytes, files)
    argv += ["--chdir", WORKDIR, "--clearenv"]
    for key, value in {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR,
                       "TMPDIR": WORKDIR, "LANG": "C.UTF-8"}.items():
        argv += ["--setenv", key, value]
    argv.append("--")
    if root:
        argv += ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return argv + prlimit_argv(limits, processes=True) + list(command)


def prlimit_argv(limits, processes: bool) -> list[str]:
    """`prlimit` with the run's resource limits (the process count only where it counts
    the sandbox alone)."""
    argv = ["prlimit", f"--cpu={limits.cpu_s}", f"--as={limits.memory_bytes}",
            f"--fsize={limits.file_bytes}", f"--nofile={limits.open_files}", "--core=0"]
    if processes:
        argv.append(f"--nproc={limits.processes}")
    return argv + ["--"]


def _filesystem(folder_bytes: int, files: dict[str, int]) -> list[str]:
    argv = ["--ro-bind", "/usr", "/usr"]
    for name in _ROOT_LINKS:
        path = f"/{name}"
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in _ETC:
        argv += ["--ro-bind-try", path, path]
    if PREFIX != "/usr" and not PREFIX.startswith("/usr/"):
        for parent in reversed(PurePosixPath(PREFIX).parents[:-1]):  # bwrap would make them 0700
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", PREFIX, PREFIX]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "0777", "--size", str(folder_bytes), "--tmpfs", WORKDIR]
    made = set()
    for name, fd in files.items():
        path = PurePosixPath(WORKDIR, name)
        for parent in reversed(path.parents[:-2]):
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0777", "--dir", str(parent)]
        argv += ["--perms", "0666", "--file", str(fd), str(path)]
    return argv
