"""Test-wide setup: an 8-device CPU mesh, and a private tokenizer cache per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One miniature `loam.train` run (helpers.SMALL: 12 steps, checkpoints at 4, 8, 12) shared
    by every test that resumes, rewinds or damages a copy of it. Never modify it in place."""
    from helpers import run_train

    workdir = tmp_path_factory.mktemp("reference")
    run_train(workdir)
    return workdir
