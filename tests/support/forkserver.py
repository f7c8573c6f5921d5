"""Run ``python ...`` command lines for the tests: as forked children of one warm interpreter (the fork server,
``tests/support/_forkserver.py``), or as cold subprocesses.

A cold ``python script.py`` spends seconds of CPU importing torch and Lightning before it does anything; a forked
child of an interpreter that has already imported them starts in milliseconds. ``run``/``popen`` take the
arguments of ``python`` (``[script, *args]``, ``["-m", module, *args]``, ``["-c", code, *args]``) and the keywords
of ``subprocess.run``/``subprocess.Popen`` that the tests use, and return a ``CompletedProcess`` or a Popen-like
object. The child gets its own session (``os.setsid``), exactly the environment passed (default: this process's
environment at the call), the working directory, stdin/stdout/stderr, torch's thread count (``OMP_NUM_THREADS``
or torch's default) and the exit status (``-signal`` when killed) that a cold interpreter would have; see the
server's docstring for what it does at start and at exit.

``LC_TEST_FORK=0`` runs every command line as a cold ``python`` subprocess instead (slower; to rule the fork
server out when a test behaves differently). Tests that need a fresh interpreter call ``subprocess`` directly.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from .files import tail

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER_SCRIPT = os.path.join(HERE, "_forkserver.py")
SOCKET_ENV = "LC_TEST_FORKSERVER"  # where torchrun workers (tests/support/_worker_shim.py) find the server

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT


def enabled() -> bool:
    return os.environ.get("LC_TEST_FORK", "1").strip().lower() not in ("0", "false", "no", "off")


def default_threads() -> int:
    """torch's intra-op thread count in a fresh interpreter without OMP_NUM_THREADS."""
    global _DEFAULT_THREADS
    if _DEFAULT_THREADS is None:
        import torch

        _DEFAULT_THREADS = torch.get_num_threads()
    return _DEFAULT_THREADS


_DEFAULT_THREADS: int | None = None


# ------------------------------------------------------------------------------------------------ the server
class ForkServer:
    """The server process: started in the background, answers once its imports are done."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lc-fork-")  # short: a Unix socket path has at most 107 bytes
        self.path = os.path.join(self.dir, "sock")
        self.log_path = os.path.join(self.dir, "server.log")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, self.path], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.ready: dict | None = None

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if os.path.exists(self.path + ".ready"):
                with open(self.path + ".ready") as f:
                    self.ready = json.load(f)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server did not start (exit status {self.proc.poll()}); its log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.02)
        if self.ready["threads"] != 1:
            raise RuntimeError(f"the fork server has {self.ready['threads']} threads after its imports (a library "
                               f"started a thread pool at import); forking it could deadlock. Log:\n{self.log_tail()}")
        return self.ready

    def log_tail(self, n: int = 4000) -> str:
        return tail(self.log_path, n)

    def spawn(self, argv: Sequence[str], env: dict, cwd: str, fds: tuple[int, int, int], threads: int,
              unbuffered: bool = False) -> tuple[socket.socket, int]:
        """Starts a job; returns its connection (closing it kills the job) and the child's pid."""
        self.wait_ready()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        header = json.dumps({"argv": list(argv), "env": env, "cwd": cwd, "threads": threads,
                             "unbuffered": unbuffered}).encode()
        msg = struct.pack("!I", len(header)) + header
        sent = conn.sendmsg([msg[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", *fds))])
        conn.sendall(msg[sent:])
        reply = _read_line(conn, timeout=60)
        if "error" in reply or "pid" not in reply:
            conn.close()
            raise RuntimeError(f"the fork server refused {argv[:2]}: {reply}")
        return conn, int(reply["pid"])

    def stop(self) -> None:
        """SIGKILL to its process group; its children die with it (PR_SET_PDEATHSIG)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_line(conn: socket.socket, timeout: float | None, buf: bytearray | None = None) -> dict:
    buf = bytearray() if buf is None else buf
    conn.settimeout(timeout)
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


_SERVER: ForkServer | None = None
_LOCK = threading.Lock()


def server() -> ForkServer:
    """The session's fork server (started here if :func:`prestart` did not already)."""
    global _SERVER
    with _LOCK:
        if _SERVER is None:
            _SERVER = ForkServer()
            atexit.register(shutdown)
    return _SERVER


def prestart() -> None:
    """Starts the server now, without waiting for it: it imports while the first tests run."""
    if enabled():
        server()


def shutdown() -> None:
    global _SERVER
    with _LOCK:
        if _SERVER is not None:
            _SERVER.stop()
            _SERVER = None


def socket_env() -> dict:
    """The environment variable that lets torchrun workers (``_worker_shim.py``) reach the server."""
    return {SOCKET_ENV: server().path}


# ------------------------------------------------------------------------------------------------ the processes
class ForkedProcess:
    """A job of the fork server, with the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list, conn: socket.socket, pid: int, stdin=None, stdout=None, stderr=None) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._conn = conn
        self._buf = bytearray()
        self._readers: dict[str, threading.Thread] | None = None  # communicate(): a reader thread per pipe
        self._chunks: dict[str, list] = {}
        self._lock = threading.Lock()

    def _collect(self, timeout: float | None) -> bool:
        with self._lock:
            if self.returncode is not None:
                return True
            try:
                msg = _read_line(self._conn, timeout, self._buf)
            except (socket.timeout, BlockingIOError):
                return False
            except (ConnectionError, OSError):
                msg = {"returncode": -signal.SIGKILL}  # the server is gone: so is the child (PR_SET_PDEATHSIG)
            self.returncode = int(msg["returncode"])
            self._conn.close()
            return True

    def poll(self) -> int | None:
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._collect(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple:
        if self._readers is None:  # the first call: send the input, read the pipes to their end in the background
            self._readers = {}
            if self.stdin is not None:
                try:
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
                except BrokenPipeError:
                    pass
            for name in ("stdout", "stderr"):
                f = getattr(self, name)
                if f is not None:
                    self._chunks[name] = []
                    t = threading.Thread(target=lambda f=f, out=self._chunks[name]: out.append(f.read()), daemon=True)
                    t.start()
                    self._readers[name] = t
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._readers.values():
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out = []
        for name in ("stdout", "stderr"):
            if name in self._chunks:
                getattr(self, name).close()
                out.append(self._chunks[name][0] if self._chunks[name] else None)
            else:
                out.append(None)
        return tuple(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()

    def __del__(self):
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001
            pass


def _fd_for(spec, own: list, default: int) -> int:
    """A descriptor for the child from a subprocess-style spec; descriptors opened here go to ``own``."""
    if spec is None:
        return default
    if spec == DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        own.append(fd)
        return fd
    if isinstance(spec, int):
        return spec
    return spec.fileno()


def popen(argv: Sequence[str], *, stdin=None, stdout=None, stderr=None, env: dict | None = None,
          cwd: str | os.PathLike | None = None, text: bool = False, unbuffered: bool = False,
          start_new_session: bool = True) -> Any:
    """``subprocess.Popen([sys.executable, *argv], ...)``, as a fork-server child unless LC_TEST_FORK=0."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    if not enabled():
        return subprocess.Popen([sys.executable, *(["-u"] if unbuffered else []), *argv], stdin=stdin, stdout=stdout,
                                stderr=stderr, env=env, cwd=cwd, text=text, start_new_session=start_new_session)
    own: list[int] = []  # descriptors to close here once the server has its copies
    parent: dict[str, Any] = {}

    def pipe(name: str, child_reads: bool) -> int:
        r, w = os.pipe()
        child_end, parent_end = (r, w) if child_reads else (w, r)
        own.append(child_end)
        if child_reads:
            raw = io.open(parent_end, "wb")
            parent[name] = io.TextIOWrapper(raw, write_through=True) if text else raw
        else:
            parent[name] = io.open(parent_end, "r", newline=None) if text else io.open(parent_end, "rb")
        return child_end

    try:
        fd0 = pipe("stdin", True) if stdin == PIPE else _fd_for(stdin, own, 0)
        fd1 = pipe("stdout", False) if stdout == PIPE else _fd_for(stdout, own, 1)
        fd2 = fd1 if stderr == STDOUT else pipe("stderr", False) if stderr == PIPE else _fd_for(stderr, own, 2)
        omp = env.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.strip().isdigit() and int(omp) > 0 else default_threads()
        conn, pid = server().spawn(argv, env, cwd, (fd0, fd1, fd2), threads, unbuffered)
    except BaseException:
        for f in parent.values():
            f.close()
        raise
    finally:
        for fd in own:
            os.close(fd)
    return ForkedProcess([sys.executable, *argv], conn, pid, parent.get("stdin"), parent.get("stdout"),
                         parent.get("stderr"))


def run(argv: Sequence[str], *, capture_output: bool = False, text: bool = False, timeout: float | None = None,
        env: dict | None = None, cwd: str | os.PathLike | None = None, check: bool = False, input: Any = None,
        stdout=None, stderr=None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], ...)``, as a fork-server child unless LC_TEST_FORK=0."""
    if capture_output:
        stdout = stderr = PIPE
    p = popen(argv, stdin=PIPE if input is not None else None, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
              text=text)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check:
        cp.check_returncode()
    return cp
