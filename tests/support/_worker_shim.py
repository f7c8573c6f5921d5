"""A torchrun worker that runs as a child of the tests' fork server.

    torchrun --no-python ... python -S tests/support/_worker_shim.py SCRIPT ARGS...

torchrun starts this small program (standard library only, no site: it starts in milliseconds) for each rank, with
the rank's environment. It hands its command line, environment, working directory and standard streams to the fork
server (``$LC_TEST_FORKSERVER``), which forks the rank from an interpreter that has already imported torch and
Lightning; the rank then runs ``SCRIPT ARGS...`` as ``python -u SCRIPT ARGS...`` would. This process stands in for
the rank towards torchrun: it forwards the signals torchrun sends (SIGTERM, SIGINT, ...) to the rank's process
group and exits as the rank exited (the same code, or killed by the same signal). If it is killed itself (SIGKILL),
the server sees its connection close and kills the rank.
"""
import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main() -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["LC_TEST_FORKSERVER"])
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(omp) if omp.isdigit() and int(omp) > 0 else len(os.sched_getaffinity(0))
    header = json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "threads": threads,
                         "unbuffered": True}).encode()  # torchrun runs `python -u` workers
    msg = struct.pack("!I", len(header)) + header
    state = {"pid": None, "pending": []}

    def forward(signum, frame):
        if state["pid"] is None:
            state["pending"].append(signum)
            return
        try:
            os.killpg(state["pid"], signum)
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    sent = conn.sendmsg([msg[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))])
    conn.sendall(msg[sent:])
    f = conn.makefile("rb")
    first = json.loads(f.readline() or b"{}")
    if "pid" not in first:
        os.write(2, f"fork server refused the worker: {first}\n".encode())
        os._exit(1)
    state["pid"] = first["pid"]
    for sig in state["pending"]:
        forward(sig, None)
    line = f.readline()
    rc = json.loads(line)["returncode"] if line else -signal.SIGKILL
    if rc < 0:
        signal.signal(-rc, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-rc])
        os.kill(os.getpid(), -rc)
    os._exit(rc if rc >= 0 else 128 - rc)


if __name__ == "__main__":
    main()
