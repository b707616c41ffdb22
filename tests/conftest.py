"""Test-wide setup: an 8-device CPU mesh, and a private tokenizer cache per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
