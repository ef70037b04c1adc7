"""sparsify: compile PyTorch models into channel-sparse ones and prove they are faster."""
from __future__ import annotations

__version__ = "0.1.0"
