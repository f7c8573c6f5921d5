"""Support code of the tests, written once: the Trainer and data helpers, the fork server that runs ``python ...``
command lines without a cold interpreter, the torchrun launcher, free ports and the session's S3 server.
``tests/conftest.py`` puts ``tests/`` on ``sys.path``, so test modules ``import support``."""
from __future__ import annotations

import os

from .forkserver import popen as start_python
from .forkserver import run as run_python
from .net import free_port
from .seaweed import list_remote, remote_steps
from .launch import torchrun
from .training import Scripted, data, fit, scripted, trainer

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)

__all__ = ["ROOT", "TESTS", "Scripted", "data", "free_port", "list_remote", "remote_steps", "run_python",
           "scripted", "start_python", "torchrun", "trainer", "fit"]
