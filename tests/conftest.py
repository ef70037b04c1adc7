"""Test-session settings.

Under pytest-xdist (``pytest -n 2``) every worker is its own process: with torch's default of one
intra-op thread per core, two workers on two cores run four threads that spin-wait on each other
(the training tests ran about 3x slower). One torch thread per worker; ONNX Runtime sessions and
subprocesses choose their own threads as a user's would, but sessions whose caller leaves
``spinning`` unset do not spin-wait between runs (``native.SPINNING``). ``global_hooks_restored``: for tests that
register process-wide module hooks.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    from sparsify.runtime import native

    native.SPINNING = False  # ORT's idle workers spin-wait too: ORT-heavy tests ran 5-8% slower


@pytest.fixture
def global_hooks_restored():
    """The process-wide hook tables as they were: a test's global hook must not reach later tests."""
    from torch.nn.modules import module as torch_module

    tables = [torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks,
              torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks]
    saved = [dict(t) for t in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)
