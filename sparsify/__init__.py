"""sparsify: compile PyTorch models into channel-sparse ones and prove they are faster.

The Python API mirrors the CLI, one function per stage::

    path, result = sparsify.transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out="runs/l")
    run = sparsify.load("runs/l")
    sparsify.train("runs/l", data="digits", epochs=3)
    sparsify.export("runs/l", "l.onnx")
    sparsify.bench(["dense.onnx", "l.onnx"], batch_sizes=(1, 16))
    sparsify.inspect("runs/l")

Studies (``sparsify.study``): ``run_study(load_spec("studies/x.toml"))`` trains every arm x seed,
``compare(["runs/study-x"])`` gives per-arm mean +- s.e. and paired differences.

Imports are lazy so that ``sparsify --help`` does not pay for torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def transform(*args: Any, **kwargs: Any) -> Any:
    """Trace a model and rewrite it with a pass: see ``sparsify.api.transform``."""
    from .api import transform as f

    return f(*args, **kwargs)


def transform_to_dir(*args: Any, **kwargs: Any) -> Any:
    """``transform`` and save a run directory: see ``sparsify.api.transform_to_dir``."""
    from .api import transform_to_dir as f

    return f(*args, **kwargs)


def load(path: Any, rules: Any = None) -> Any:
    """Load a run directory (graph rebuilt from its recipe, tensors loaded): see ``sparsify.api.load``."""
    from .api import load as f

    return f(path, rules)


def inspect(*args: Any, **kwargs: Any) -> Any:
    """Per-layer report of a run directory, model or .onnx file: see ``sparsify.api.inspect``."""
    from .api import inspect as f

    return f(*args, **kwargs)


def export(run_dir: Any, out: Any, *, force: bool = False, **kwargs: Any) -> Any:
    """Compact and export a run directory to ONNX: see ``sparsify.runtime.export.export_run``. An
    existing ``out`` is replaced only with ``force`` (as the CLI's --force); UsageError otherwise."""
    import os
    from pathlib import Path

    from .errors import UsageError
    from .runtime.export import export_run

    if not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"out {out!r} is not a path; give the .onnx file to write, e.g. \"model.onnx\"")
    if Path(out).exists() and not Path(out).is_dir() and not force:
        raise UsageError(f"{out} exists; pass force=True to overwrite it or choose another path")
    return export_run(run_dir, out, **kwargs)


def bench(paths: Any, **kwargs: Any) -> Any:
    """Measure ONNX files side by side in ONNX Runtime: see ``sparsify.runtime.bench.bench_files``."""
    from .runtime.bench import bench_files

    return bench_files(paths, **kwargs)


def __getattr__(name: str) -> Any:
    # ``sparsify.train`` is the train subpackage, itself callable as train_run(run_dir, **config).
    if name == "train":
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
