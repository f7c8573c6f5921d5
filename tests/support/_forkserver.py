"""The fork server: a warm interpreter that runs ``python ...`` command lines as forked children.

    python tests/support/_forkserver.py SOCKET

Started once per test session by ``tests/support/forkserver.py`` (see there for the client side). It imports torch,
Lightning, lightning_ckpt, boto3, optuna, jsonargparse and torch.distributed once, starts no thread, then listens
on the Unix socket SOCKET. Each connection is one job: a length-prefixed JSON header (``argv`` as given to
``python``: ``[script, *args]``, ``["-m", module, *args]`` or ``["-c", code, *args]``; ``env``; ``cwd``;
``threads``; ``unbuffered``) with the job's stdin, stdout and stderr passed as file descriptors (SCM_RIGHTS). The
server forks; the child becomes what ``python argv...`` would have been after its imports: its own session
(``os.setsid``, like ``start_new_session=True``), the given descriptors as 0/1/2, exactly the given environment and
working directory, default signal handlers, ``sys.argv``/``sys.path[0]`` as the interpreter sets them, and on exit
the non-daemon threads joined and the atexit handlers run, as at interpreter exit. The server answers
``{"pid": ...}`` at once and ``{"returncode": ...}`` (``-signal`` if killed) when the child ends. A connection
closed before its child ended kills the child's process group (SIGKILL): a client that dies takes its job along.
Children also die with the server (PR_SET_PDEATHSIG), and the server ends when the process that started it is gone.

A forked child of a process that runs threads can deadlock (a lock held by a thread that does not exist in the
child); this server forks only while it has a single thread, and torch/OpenMP/BLAS are kept single-threaded until a
child sets its own thread count.
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# sys.path as a fresh interpreter has it after its first entry (this script's folder); the repository first, as
# the tests' scripts put it
BASE_PATH = [p for p in sys.path[1:] if p != ROOT]
BASE_PATH.insert(0, ROOT)
sys.path[:] = [sys.path[0], *BASE_PATH]

# a thread pool started by an import (OpenMP, OpenBLAS, MKL) does not survive fork: start none here
_SAVED_ENV = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
for _v in _SAVED_ENV:
    os.environ[_v] = "1"


def _warm_imports() -> None:
    """Everything the tests' scripts and torchrun workers import (seconds of CPU time per cold interpreter)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import boto3  # noqa: F401
        import boto3.s3.transfer  # noqa: F401
        import botocore.session

        import lightning.pytorch  # noqa: F401
        import lightning.pytorch.cli  # noqa: F401  (jsonargparse)
        import lightning.pytorch.strategies  # noqa: F401
        import optuna  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.run  # noqa: F401
        import torch.distributed._shard.sharded_tensor  # noqa: F401
        import yaml  # noqa: F401

        import lightning_ckpt  # noqa: F401
        import lightning_ckpt.cli  # noqa: F401
        import lightning_ckpt.demo  # noqa: F401
        import lightning_ckpt.extras.hpo  # noqa: F401
        import lightning_ckpt.extras.stages  # noqa: F401
        import lightning_ckpt.store.s3  # noqa: F401
        import lightning_ckpt.folder.transfer  # noqa: F401

        botocore.session.get_session().get_service_model("s3")  # parsed once, not in every child
        torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ the child
def _refresh_import_time_state(env: dict) -> None:
    """Some libraries read the environment once, at import (here: in the server). Read it again."""
    try:
        from lightning.fabric.utilities.rank_zero import _get_rank
    except ImportError:  # pragma: no cover
        return
    rank = _get_rank()
    for mod in ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                "lightning.pytorch.utilities.rank_zero"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "rank_zero_only"):
            m.rank_zero_only.rank = rank or 0


def _print_exception() -> None:
    """The traceback a cold interpreter prints: without this server's and runpy's frames."""
    import traceback

    etype, value, tb = sys.exc_info()
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                              or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
        tb = tb.tb_next
    try:
        sys.stderr.write("".join(traceback.format_exception(etype, value, tb)))
    except BaseException:  # noqa: BLE001
        sys.excepthook(etype, value, tb)


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # as the exit status: sys.exit(-1) is 255
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _run_child(job: dict, fds: list[int], server_fds: set[int]) -> None:
    """In the forked child: becomes ``python *argv``; never returns."""
    code = 1
    try:
        os.setsid()
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover
            pass
        for fd in server_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD,
                    signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        import torch

        torch.set_num_threads(max(1, int(job.get("threads") or 1)))
        _refresh_import_time_state(job["env"])
        # the standard streams as a fresh interpreter sets them up over these descriptors
        unbuffered = bool(job.get("unbuffered") or job["env"].get("PYTHONUNBUFFERED"))
        sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
        sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
        argv = list(job["argv"])
        import runpy

        try:
            try:
                if argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    sys.path[:] = [os.getcwd(), *BASE_PATH]
                    if not hasattr(sys.modules.get(argv[1]), "__path__"):  # a module, not a package: `python -m
                        sys.modules.pop(argv[1], None)  # pkg.mod` runs pkg.mod without importing it as pkg.mod first
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                elif argv[0] == "-c":
                    sys.argv = ["-c", *argv[2:]]
                    sys.path[:] = ["", *BASE_PATH]
                    import types

                    main = types.ModuleType("__main__")  # what `python -c` runs the code in
                    sys.modules["__main__"] = main
                    exec(compile(argv[1], "<string>", "exec"), main.__dict__)
                else:
                    sys.argv = list(argv)
                    sys.path[:] = [os.path.dirname(os.path.realpath(argv[0])), *BASE_PATH]
                    runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = _exit_code(e)
            except KeyboardInterrupt:
                _print_exception()
                code = -signal.SIGINT
            except BaseException:  # noqa: BLE001
                _print_exception()
                code = 1
            # what the interpreter does at exit: join non-daemon threads, run atexit handlers, flush the streams
            import atexit
            import threading

            try:
                threading._shutdown()  # type: ignore[attr-defined]
            except BaseException:  # noqa: BLE001
                pass
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code
    except BaseException:  # noqa: BLE001 - a failure setting the child up: say so on its stderr
        try:
            import traceback

            os.write(2, ("fork server child failed: " + traceback.format_exc()).encode())
        except BaseException:  # noqa: BLE001
            pass
        code = 1
    finally:
        os._exit(code)


# ------------------------------------------------------------------------------------------------ the server
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


class Job:
    def __init__(self, conn: socket.socket) -> None:
        self.conn: socket.socket | None = conn
        self.buf = b""
        self.fds: list[int] = []
        self.pid: int | None = None
        self.pidfd: int | None = None


def _recv_header(job: Job) -> dict | None:
    """Reads what has arrived; the job's header once it is complete."""
    data, ancdata, _flags, _addr = job.conn.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
    for level, typ, raw in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            n = len(raw) - len(raw) % 4
            job.fds += list(struct.unpack(f"{n // 4}i", raw[:n]))
    if not data:
        raise ConnectionError("closed before the header was complete")
    job.buf += data
    if len(job.buf) < 4:
        return None
    (size,) = struct.unpack("!I", job.buf[:4])
    if len(job.buf) < 4 + size:
        return None
    return json.loads(job.buf[4:4 + size])


def _send(conn: socket.socket, msg: dict) -> None:
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def serve(path: str) -> None:
    parent = os.getppid()  # the test session: when it is gone (even killed), so is this server, and its children
    _warm_imports()
    for k, v in _SAVED_ENV.items():  # what the jobs' environments say applies to them, not ours
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    threads = _threads()
    with open(path + ".ready.tmp", "w") as f:
        json.dump({"pid": os.getpid(), "threads": threads}, f)
    os.replace(path + ".ready.tmp", path + ".ready")
    if threads != 1:
        print(f"fork server: {threads} threads after the imports; forking could deadlock", file=sys.stderr)
        return
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    open_fds = {listener.fileno()}  # closed in every child
    if hasattr(sel, "fileno"):
        open_fds.add(sel.fileno())

    def drop_conn(job: Job, kill: bool) -> None:
        if job.conn is None:
            return
        if kill and job.pid is not None:  # the client went away while its job runs: the job goes too
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except OSError:
                pass
        sel.unregister(job.conn)
        open_fds.discard(job.conn.fileno())
        job.conn.close()
        job.conn = None
        for fd in job.fds:
            os.close(fd)
        job.fds = []

    while True:
        if os.getppid() != parent:  # nobody will clean up after us: remove the socket's folder (made for us)
            import shutil

            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            return
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                job = Job(conn)
                open_fds.add(conn.fileno())
                sel.register(conn, selectors.EVENT_READ, ("conn", job))
                continue
            kind, job = key.data
            if kind == "pidfd":  # the child ended
                sel.unregister(job.pidfd)
                open_fds.discard(job.pidfd)
                os.close(job.pidfd)
                _, status = os.waitpid(job.pid, 0)
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                if job.conn is not None:
                    _send(job.conn, {"returncode": rc})
                    drop_conn(job, kill=False)
                continue
            if job.pid is not None:  # a running job's connection: EOF means the client is gone
                try:
                    more = job.conn.recv(4096)
                except OSError:
                    more = b""
                if not more:
                    drop_conn(job, kill=True)
                continue
            try:
                header = _recv_header(job)
            except (OSError, ValueError, ConnectionError):
                drop_conn(job, kill=False)
                continue
            if header is None:
                continue
            if header.get("op") == "quit":
                return
            if _threads() != 1:
                _send(job.conn, {"error": f"the fork server has {_threads()} threads; it cannot fork safely"})
                drop_conn(job, kill=False)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(header, job.fds, open_fds - set(job.fds))
            for fd in job.fds:
                os.close(fd)
            job.fds = []
            job.pid = pid
            job.pidfd = os.pidfd_open(pid)
            open_fds.add(job.pidfd)
            sel.register(job.pidfd, selectors.EVENT_READ, ("pidfd", job))
            _send(job.conn, {"pid": pid})


if __name__ == "__main__":
    serve(sys.argv[1])
