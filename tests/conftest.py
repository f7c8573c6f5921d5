"""Session-wide test support: the fork server, the S3 server and the markers (see ``tests/support/``).

Markers (``pyproject.toml``): ``distributed`` (torchrun or other multi-process groups), ``s3`` (the SeaweedFS
server), ``faults`` (the kill -9 campaign), ``slow`` (several seconds each even with the fork server), ``smoke`` (the
subset `.ci/run` also runs under the oldest supported Lightning), ``ray`` (a local Ray runtime: the ``ray_runtime``
fixture of ``tests/test_ray.py``, one for all its tests). Tests under ``tests/distributed/`` are marked
``distributed`` and tests that use the ``s3`` or ``own_s3`` fixture ``s3`` here, so new tests get them too.

The quick subset for local work: ``python -m pytest -q -m "not slow and not distributed and not s3 and not faults and not ray"``.

torch runs single-threaded in the tests (``OMP_NUM_THREADS=1`` unless it is set): the models are tiny, and a second
intra-op thread only spins against the checkpoint writer's threads and the other processes on the machine (on a
busy 2-core machine, runs took 2 to 6 times longer with two threads). The scripts and torchrun ranks the tests
start inherit the setting, so both sides of every comparison run alike.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; see above

import pytest  # noqa: E402
import torch  # noqa: E402

from support import forkserver as _forkserver  # noqa: E402
from support import seaweed, shared  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Markers from what a test uses; before ``-m`` selects on them."""
    distributed_dir = os.path.join(TESTS, "distributed") + os.sep
    for item in items:
        names = getattr(item, "fixturenames", ())
        if str(item.fspath).startswith(distributed_dir):
            item.add_marker(pytest.mark.distributed)
        if "s3" in names or "own_s3" in names:
            item.add_marker(pytest.mark.s3)
        if "ray_runtime" in names:
            item.add_marker(pytest.mark.ray)


def pytest_collection_finish(session):
    """Start the servers the selected tests need now, in the background: they start while the first tests run."""
    names = set()
    private = 0  # tests that take a private S3 server (own_s3): each gets one started now, not in its setup
    for item in session.items:
        names.update(getattr(item, "fixturenames", ()))
        private += "own_s3" in getattr(item, "fixturenames", ())
    if "forkserver" in names:
        _forkserver.prestart()
    if "s3" in names:
        seaweed.session_server(wait=False)
    for _ in range(private):
        seaweed.prestart_private()


def pytest_sessionfinish(session, exitstatus):
    _forkserver.shutdown()
    seaweed.stop_session_server()


@pytest.fixture(scope="session")
def forkserver():
    """The warm interpreter that runs the tests' ``python`` command lines (``support.run_python``, ``torchrun``);
    None with LC_TEST_FORK=0. Modules that run scripts request it (``pytest.mark.usefixtures("forkserver")``) so
    that it starts in the background as soon as the session knows it is needed."""
    if not _forkserver.enabled():
        yield None
        return
    server = _forkserver.server()
    server.wait_ready()
    yield server


@pytest.fixture(scope="module")
def s3(request):
    """The session's S3 server with a bucket for this test module (the module's ``BUCKET``, else its name), and
    the AWS environment pointing at it while the module runs."""
    server = seaweed.session_server()
    default = os.path.splitext(os.path.basename(str(request.fspath)))[0].replace("_", "-").lower()
    bucket = seaweed.new_bucket(server, getattr(request.module, "BUCKET", default))
    with seaweed.aws_env(server):
        yield seaweed.Bucket(server, bucket)


@pytest.fixture
def own_s3(request):
    """A private S3 server, for a test that stops and restarts it; with the module's ``BUCKET`` created."""
    with seaweed.private_server(getattr(request.module, "BUCKET", "bucket")) as server:
        yield server


@pytest.fixture(scope="session")
def shared_launch(request, tmp_path_factory, forkserver):
    """The session's shared 2-rank torchrun launch (``support.shared``), for the runs the selected tests need."""
    needed = {n for item in request.session.items for n in getattr(item, "fixturenames", ()) if n in shared.REGISTRY}
    return shared.SharedLaunch(tmp_path_factory.mktemp("shared-2rank"), sorted(needed))


@pytest.fixture(autouse=True)
def _nothing_written_into_the_working_directory():
    """A test writes only under its tmp_path: a Trainer without ``default_root_dir`` and without one of this
    package's saving callbacks gets Lightning's own ModelCheckpoint, which writes ``./checkpoints/`` into the
    working directory (the repository)."""
    cwd = os.getcwd()
    before = set(os.listdir(cwd))
    yield
    new = set(os.listdir(cwd)) - before - {".pytest_cache", "__pycache__"}
    assert not new, f"the test wrote {sorted(new)} into the working directory {cwd}; give it a tmp_path"
