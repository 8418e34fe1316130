"""Run untrusted (model-written) Python code in a separate, limited process.

Each call starts a fresh `python -I` interpreter; the evaluating process never executes the code
itself. What holds, and on what it rests (Linux):

  layer            what                                                   contains
  ---------------  -----------------------------------------------------  ---------------------------
  process          a new interpreter in its own session / process group;  crashes, os._exit, sys.exit,
                   stdin empty, stdout/stderr to files, isolated mode    PYTHON* variables, user site
                   (-I: no PYTHON* variables, no user site, no cwd on
                   sys.path)
  wall clock       `timeout`: then SIGKILL to the process group and to    infinite loops, sleeps,
                   every descendant still found under the child in /proc  deadlocks
  resource         (set in the preexec function, before exec)
                   RLIMIT_CPU (each process), RLIMIT_AS (address space),  CPU burners, huge allocations
                   RLIMIT_FSIZE (any file, stdout/stderr included),       (MemoryError), disk filling,
                   RLIMIT_NOFILE, RLIMIT_CORE 0, RLIMIT_NPROC (the        fd exhaustion, fork bombs
                   user's current processes + max_processes)             (not for root: the kernel
                                                                          exempts uid 0 from NPROC)
  network          a new, empty network namespace (unshare(CLONE_NEWNET)  every socket: not even
                   as root, CLONE_NEWUSER|CLONE_NEWNET otherwise) when    loopback is up
                   the kernel allows it; `network_isolated` reports it
  environment      only PATH, HOME (= the work directory), LANG, TMPDIR   secrets in the environment
  filesystem       cwd is a fresh temporary directory, removed after     leftovers between samples
  Python guard     an audit hook installed before the code runs          (see below)
                   (`python_guard=True`, the default)

The Python guard (`sys.addaudithook`, which Python code cannot remove) refuses, with PermissionError:
writes outside the work directory (open for writing, os.remove/rename/mkdir/chmod/..., shutil.rmtree),
new programs (os.system, os.exec*, os.posix_spawn, subprocess, whose `_posixsubprocess` cannot be
imported), ctypes (so no native calls around the hook), socket creation (the fallback where no
network namespace can be made), and os.fork beyond `max_processes` forks of the top-level process;
forked children may not fork again. It is what bounds a fork bomb when the evaluator runs as root,
and what stops writes outside the work directory: the OS layer does not (no mount namespace; the
child has the evaluator's file permissions). It is defence in depth, not a security boundary
against an adversary: native code reached some other way (a C extension already importable that
forks or writes) bypasses it. Reading files is not restricted (the parent's /proc/PID/environ too,
for the same user): do not evaluate where readable files hold secrets.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import Qwen2Error

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_OUTPUT_KEPT = 4000  # characters of stdout / stderr kept in a result


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds, then the whole process tree is killed
    cpu_seconds: int | None = None  # RLIMIT_CPU of each process; None = ceil(timeout) + 1
    memory_bytes: int = 2 << 30  # RLIMIT_AS: address space of each process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file written, stdout/stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 8  # forks allowed to the sample (guard) and RLIMIT_NPROC headroom
    python_guard: bool = True  # the audit hook described in the module docstring

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise Qwen2Error(f"sandbox timeout must be a positive number of seconds, got {self.timeout!r}")

    def rlimits(self, user_processes: int) -> list[tuple[int, int]]:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1
        return [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, self.memory_bytes),
                (resource.RLIMIT_FSIZE, self.file_bytes), (resource.RLIMIT_NOFILE, self.open_files),
                (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, user_processes + self.max_processes)]


@dataclass
class RunResult:
    status: str  # "ok", "error" (non-zero exit or killed by a signal) or "timed out"
    returncode: int | None
    stdout: str
    stderr: str
    error: str  # one line saying why it did not succeed; "" when status is "ok"
    seconds: float
    network_isolated: bool = field(default=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# The interpreter's first code: read the program from stdin, install the guard, run the program.
# It imports nothing but json/os/sys, so the modules the guard refuses are not already loaded.
_LAUNCHER = r'''
import json, os, sys
_config = json.loads(sys.argv[1])
_source = sys.stdin.read()
sys.stdin.close()
sys.stdin = open(os.devnull)
sys.argv = ["<sample>"]
_name = _config["name"]
if _config["guard"]:
    def _guard(root=os.path.realpath(_config["workdir"]), top=os.getpid(), forks=[_config["max_forks"]],
               realpath=os.path.realpath, fspath=os.fspath, getpid=os.getpid, sep=os.sep,
               refused=frozenset(("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty",
                                  "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
                                  "socket.__new__", "sys.remote_exec")),
               no_import=frozenset(("_posixsubprocess", "_ctypes", "ctypes", "_socket", "socket")),
               path_writes=frozenset(("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                                      "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags",
                                      "os.lchflags", "os.lchmod", "os.mkfifo", "os.mknod", "shutil.rmtree",
                                      "shutil.move", "shutil.copyfile", "shutil.copytree", "shutil.chown")),
               write_flags=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
        def inside(path):
            if isinstance(path, int):  # a file descriptor: already opened (and checked then)
                return True
            p = realpath(fspath(path))
            return p == root or p.startswith(root + sep)

        def hook(event, args):
            if event in refused:
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "import" and args[0] in no_import:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
            if event == "open" and args[0] is not None:
                mode, flags = args[1], args[2]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & write_flags)
                if writing and not inside(args[0]):
                    raise PermissionError(f"sandbox: writing {args[0]} outside the work directory is not allowed")
            elif event in path_writes:
                for path in args:
                    if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                        raise PermissionError(f"sandbox: {event} on {path} outside the work directory is not allowed")
            elif event == "os.fork":
                if getpid() != top or forks[0] <= 0:
                    raise PermissionError("sandbox: no more processes may be created")
                forks[0] -= 1
        return hook
    sys.addaudithook(_guard())
del _config
exec(compile(_source, "<sample>", "exec"), {"__name__": _name, "__builtins__": __builtins__})
'''

_netns_flags: int | None = None  # probed once: the unshare flags that work here, 0 if none


def _libc_unshare():
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare


def network_isolation_flags() -> int:
    """The unshare(2) flags that give a child an empty network namespace here (0 when the kernel
    refuses): probed once by starting a child with them and reading its /proc/self/ns/net."""
    global _netns_flags
    if _netns_flags is None:
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        try:
            ours = os.readlink("/proc/self/ns/net")
            unshare = _libc_unshare()

            def enter():
                if unshare(flags) != 0:
                    raise OSError(ctypes.get_errno(), "unshare failed")

            theirs = subprocess.run([sys.executable, "-I", "-c", "import os; print(os.readlink('/proc/self/ns/net'))"],
                                    preexec_fn=enter, capture_output=True, text=True, timeout=30).stdout.strip()
            _netns_flags = flags if theirs and theirs != ours else 0
        except (OSError, subprocess.SubprocessError, AttributeError):
            _netns_flags = 0
    return _netns_flags


def _user_process_count() -> int:
    """Processes of our real uid now (RLIMIT_NPROC counts all of them, not just the child's)."""
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += 1
    return count


def _descendants(root: int) -> list[int]:
    """Every live process below `root` (by parent links in /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the name may hold spaces or ')'
                children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child, everything forked below it (even what left its process group) and its
    process group. Stopped first, so nothing forks while the tree is read."""
    pids = [proc.pid] + _descendants(proc.pid)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGSTOP)
    for pid in _descendants(proc.pid) + pids:  # read again: forked between the first read and the stop
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session leader's pid is its group id


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * _OUTPUT_KEPT))
        return f.read().decode("utf-8", "replace")[-_OUTPUT_KEPT:]


def _error_line(stderr: str, returncode: int) -> str:
    """The exception line of a traceback ("AssertionError", "NameError: name 'x' is not defined"),
    else the signal or exit code."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines and not lines[-1].startswith(" "):
        return lines[-1].strip()
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def run_python(source: str, limits: Limits = Limits(), module_name: str = "__main__") -> RunResult:
    """Run `source` as a program in a fresh, limited interpreter; never raises for what the code does.
    `module_name` is its `__name__` (anything but "__main__" skips `if __name__ == "__main__":` blocks)."""
    flags = network_isolation_flags()
    unshare = _libc_unshare() if flags else None
    rlimits = limits.rlimits(_user_process_count())

    def limit_child():  # runs in the forked child before exec: only plain calls, no imports
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))
        if unshare is not None and unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare of the network namespace failed")

    scratch = tempfile.mkdtemp(prefix="qwen2-sandbox-")
    try:
        workdir = os.path.join(scratch, "work")
        os.mkdir(workdir)
        config = json.dumps({"workdir": workdir, "max_forks": limits.max_processes, "guard": limits.python_guard,
                             "name": module_name})
        out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, config], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=workdir, env=_minimal_env(workdir),
                                    start_new_session=True, preexec_fn=limit_child, close_fds=True)
        try:
            with contextlib.suppress(BrokenPipeError):  # the child may die before it reads
                proc.stdin.write(source.encode("utf-8"))
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait(timeout=max(0.0, limits.timeout - (time.monotonic() - start)))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_tree(proc)  # forked children outlive their parent otherwise
            proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if timed_out:
        status, error = "timed out", f"timed out after {limits.timeout:g} s"
    elif proc.returncode == 0:
        status, error = "ok", ""
    else:
        status, error = "error", _error_line(stderr, proc.returncode)
    return RunResult(status, None if timed_out else proc.returncode, stdout, stderr, error, seconds, bool(flags))
