"""Test-session settings.

Under pytest-xdist (``pytest -n 2``) every worker is its own process: with torch's default of one
intra-op thread per core, two workers on two cores run four threads that spin-wait on each other
(the training tests ran about 3x slower). One torch thread per worker; ONNX Runtime sessions and
subprocesses choose their own threads as a user's would.
"""
from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
