"""Kept for test files written before ``tests/support/`` existed: the S3 helpers live in ``support.seaweed``.
New tests use the ``s3`` fixture (``tests/conftest.py``): the session's server, a bucket per module."""
from support.seaweed import SeaweedS3, list_remote, remote_steps, s3_server  # noqa: F401
