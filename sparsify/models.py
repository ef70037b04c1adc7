"""Load a model from a user's file (``file.py`` / ``file.py:NAME``), the built-in zoo (``zoo:NAME``) or,
where it is installed, torchvision (``torchvision:NAME``, random init, 224x224 input).

A model file provides the model by a ``build_model()`` function, or a single ``nn.Module``
subclass with a no-argument constructor, or the factory named after the colon. It may give its
example input by ``INPUT_SHAPE`` (a tuple), ``INPUT_SHAPES`` (one tuple per input of a model with
several inputs) or ``example_input()`` (a tensor, or a tuple of tensors).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ._io import file_sha256
from .errors import ModelLoadError

ZOO_PREFIX = "zoo:"
TORCHVISION_PREFIX = "torchvision:"


@dataclass
class LoadedModel:
    """A freshly built model and what is known about it."""

    module: nn.Module
    spec: str                         # normalised: "zoo:NAME", "torchvision:NAME" or "/abs/file.py:FACTORY"
    name: str                         # short name for default output directories
    input_shape: tuple[int, ...] | list[tuple[int, ...]] | None   # a list for several inputs
    num_classes: int | None
    source_file: Path | None          # the user's file (None for zoo models)
    source_sha256: str | None
    dtype_note: str | None = None     # set when its float16 / bfloat16 / float64 tensors were made float32
    source_imports: dict[str, str] | None = None  # local modules the file imports: {path relative to it: sha256}


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``a/b.py:build`` -> (``a/b.py``, ``build``); a Windows drive colon is not a separator."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py") and name and "/" not in name and "\\" not in name:
        return path, name
    return spec, None


def model_file(spec: str) -> Path | None:
    """The file a model spec names (``a/b.py`` of ``a/b.py:build``), None for zoo: and torchvision:
    models, whose code is the package's."""
    if spec.startswith((ZOO_PREFIX, TORCHVISION_PREFIX)):
        return None
    return Path(_split_spec(spec)[0]).expanduser()


class _UserImports:
    """While open, a user's model file and what it imports are read with ``imports_dir`` (default:
    the file's folder) first on ``sys.path``, so that imports inside its factory work too; the
    modules named in ``fresh`` are imported anew from there (entries already in ``sys.modules``
    are set aside and put back on exit). ``local(module)``: the local modules read meanwhile."""

    def __init__(self, path: Path, imports_dir: Path | None = None, fresh: Sequence[str] = ()) -> None:
        self.path, self.search, self.fresh = path, str(imports_dir or path.parent), tuple(fresh)

    def __enter__(self) -> "_UserImports":
        self.aside = {name: sys.modules.pop(name) for name in self.fresh if name in sys.modules}
        self.before = set(sys.modules)
        sys.path.insert(0, self.search)
        return self

    def local(self, module: Any) -> dict[str, str]:
        """The files under the model file's folder, outside installed packages and sparsify itself,
        of the modules imported since entering and of those whose objects ``module`` holds:
        {path relative to the folder: sha256}."""
        return _local_imports(self.path, [n for n in set(sys.modules) - self.before if n != module.__name__], module)

    def __exit__(self, *exc: Any) -> None:
        if sys.path and sys.path[0] == self.search:
            sys.path.pop(0)
        if self.fresh:  # the copies served this import; the process's own modules come back
            for name in self.fresh:
                sys.modules.pop(name, None)
            sys.modules.update(self.aside)


def _import_file(path: Path) -> Any:
    """Import a Python file as a fresh module (inside ``_UserImports`` for its own imports); its
    import errors become ModelLoadError."""
    mod_name = f"sparsify_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a script's sys.exit() at import must not end the command
        sys.modules.pop(mod_name, None)
        hint = ("put script code under `if __name__ == \"__main__\":`" if isinstance(e, SystemExit)
                else "fix the file and retry")
        raise ModelLoadError(f"importing {path} failed: {_where(e, path)}; {hint}") from None
    return module


def _local_imports(path: Path, new: Sequence[str], module: Any) -> dict[str, str]:
    """The files under ``path``'s folder, outside installed packages and sparsify itself, of the
    modules in ``new`` and of the modules whose objects ``module`` holds (those imported before it
    ran): {relative path: sha256}."""
    root = path.parent
    own = Path(__file__).resolve().parent
    names = set(new)
    for value in vars(module).values():
        names.add(value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None))
    found: dict[str, str] = {}
    for name in sorted(n for n in names if isinstance(n, str)):
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        f = Path(file).resolve()
        if (f == path or not f.is_relative_to(root) or f.is_relative_to(own)
                or {"site-packages", "dist-packages"} & set(f.parts)):
            continue
        found[f.relative_to(root).as_posix()] = file_sha256(f)
    return found


def module_name(relative: str) -> str:
    """The import name of a module file given relative to the search folder: ``a/b.py`` -> ``a.b``,
    ``a/__init__.py`` -> ``a``."""
    parts = relative.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _where(e: BaseException, path: Path) -> str:
    """``ExcType: message (file.py:LINE)`` for the deepest frame inside the user's file;
    ``(layers.py:LINE, from file.py:LINE)`` when a deeper one is in a module beside it (its folder,
    outside installed packages), where the fault usually is."""
    line, local = None, None
    folder = path.resolve().parent
    for frame in traceback.extract_tb(e.__traceback__):
        file = Path(frame.filename).resolve()
        if file == path.resolve():
            line, local = frame.lineno, None
        elif (line is not None and file.is_relative_to(folder) and file.suffix == ".py"
              and "site-packages" not in file.parts):
            local = f"{file.relative_to(folder).as_posix()}:{frame.lineno}"
    if isinstance(e, SystemExit):
        msg = f"it called sys.exit({e.code!r})"
    else:
        msg = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    if line and local:
        return f"{msg} ({local}, from {path.name}:{line})"
    return f"{msg} ({path.name}:{line})" if line else msg


def _no_arg_constructible(cls: type) -> bool:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())[1:]
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _find_factory(module: Any, path: Path, name: str | None) -> tuple[str, Callable[..., nn.Module]]:
    """The factory named ``name``, else ``build_model``, else the only no-arg nn.Module subclass."""
    if name is not None:
        obj = getattr(module, name, None)
        if obj is None or not callable(obj):
            raise ModelLoadError(f"{path} has no function or class named {name!r}; check the name after the colon")
        return name, obj
    if callable(getattr(module, "build_model", None)):
        return "build_model", module.build_model
    # one class under several names (``MODEL = Net``) is one candidate, under the first name
    candidates = list({
        id(obj): n for n, obj in reversed(vars(module).items())
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
        and _no_arg_constructible(obj)
    }.values())
    if not candidates:
        raise ModelLoadError(
            f"{path} defines no build_model() and no nn.Module subclass with a no-argument constructor; "
            f"add build_model() or name the factory as {path.name}:NAME"
        )
    if len(candidates) > 1:
        raise ModelLoadError(
            f"{path} is ambiguous: it defines {', '.join(sorted(candidates))}; "
            f"name one as {path.name}:NAME or define build_model()"
        )
    return candidates[0], getattr(module, candidates[0])


def _file_input_shape(module: Any, path: Path) -> tuple[int, ...] | list[tuple[int, ...]] | None:
    if hasattr(module, "INPUT_SHAPES"):
        try:
            shapes = [tuple(int(d) for d in s) for s in module.INPUT_SHAPES]
        except (TypeError, ValueError):
            shapes = []
        if not shapes or any(not s for s in shapes):
            raise ModelLoadError(f"{path}: INPUT_SHAPES must be a list of int tuples, one per model input, "
                                 "such as [(1, 3, 32, 32), (1, 3, 32, 32)]")
        return shapes if len(shapes) > 1 else shapes[0]
    if hasattr(module, "INPUT_SHAPE"):
        try:
            return tuple(int(d) for d in module.INPUT_SHAPE)
        except (TypeError, ValueError):
            raise ModelLoadError(f"{path}: INPUT_SHAPE must be a tuple of ints such as (1, 3, 32, 32)") from None
    fn = getattr(module, "example_input", None)
    if callable(fn):
        try:
            x = fn()
        except (Exception, SystemExit) as e:
            raise ModelLoadError(f"{path}: example_input() raised {_where(e, path)}") from None
        tensors = list(x) if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x) else \
            [x] if isinstance(x, torch.Tensor) else None
        if tensors is None:
            raise ModelLoadError(f"{path}: example_input() must return a tensor or a tuple of tensors")
        exact = next((t for t in tensors if not t.is_floating_point()), None)
        if exact is not None:
            # sparsify feeds every input as float (tracing, export checks, bench, data): an index
            # input (token ids into nn.Embedding) failed deep in tracing with advice about its shape
            raise ModelLoadError(f"{path}: example_input() gives a tensor of dtype "
                                 f"{str(exact.dtype).replace('torch.', '')} and shape {tuple(exact.shape)}, and sparsify feeds models float inputs (images, "
                                 f"signals, features) only; give the model what its first layer reads as floats "
                                 f"(e.g. the embeddings, with the nn.Embedding lookup outside the model)")
        return [tuple(t.shape) for t in tensors] if len(tensors) > 1 else tuple(tensors[0].shape)
    return None


def load_model(spec: str | nn.Module, model_args: dict[str, Any] | None = None, seed: int = 0,
               imports_dir: Path | None = None, fresh: Sequence[str] = ()) -> LoadedModel:
    """Build the model named by ``spec`` with every global generator seeded from ``seed`` (torch, random,
    numpy: ``_seed_all``) so its initial weights, and any structure it draws, replay.

    For a file: ``imports_dir`` is searched first for its imports (a run's copies of them) and the
    modules named in ``fresh`` are read anew (see ``_UserImports``). Raises ModelLoadError."""
    model_args = dict(model_args or {})
    if isinstance(spec, nn.Module):
        return LoadedModel(spec, f"module:{type(spec).__name__}", type(spec).__name__.lower(),
                           None, None, None, None)
    _seed_all(seed)
    if spec.startswith(ZOO_PREFIX):
        from . import zoo

        entry = zoo.get(spec[len(ZOO_PREFIX):])
        try:
            module = entry.build(**model_args)
        except TypeError as e:
            raise ModelLoadError(f"zoo:{entry.name} does not accept --model-args {model_args}: {e}") from None
        num_classes = model_args.get("num_classes", entry.num_classes)
        return LoadedModel(module, f"zoo:{entry.name}", entry.name, tuple(entry.input_shape), num_classes, None, None)
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX):], model_args)

    file, name = _split_spec(spec)
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file {file} not found; give a path to a .py file or zoo:NAME (see `sparsify zoo`)")
    path = path.resolve()
    with _UserImports(path, imports_dir, fresh) as imports:
        module = _import_file(path)
        factory_name, factory = _find_factory(module, path, name)
        try:
            model = factory(**model_args)
        except (Exception, SystemExit) as e:
            raise ModelLoadError(f"{path.name}:{factory_name}({_fmt_args(model_args)}) raised {_where(e, path)}") from None
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{path.name}:{factory_name} returned {type(model).__name__}, not an nn.Module")
        input_shape = _file_input_shape(module, path)
        local = imports.local(module)
    digest = file_sha256(path)
    return LoadedModel(model, f"{path}:{factory_name}", path.stem, input_shape,
                       getattr(module, "NUM_CLASSES", None), path, digest, source_imports=local)


def _seed_all(seed: int) -> None:
    """Seed torch's, Python's and numpy's global generators: a model file that draws its structure
    with ``np.random.permutation`` or ``random.sample`` (at import or in its factory) was built
    differently by each rebuild of its run (two exports of one run differed by 0.045)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _torchvision_model(name: str, model_args: dict[str, Any]) -> LoadedModel:
    """``torchvision.models.get_model(name, weights=None, **model_args)``; torchvision is imported only here."""
    try:
        import torchvision.models as tvm
    except Exception as e:  # not installed, or a build that does not match this torch
        raise ModelLoadError(f"torchvision:{name} needs torchvision, which cannot be imported here ({type(e).__name__}); "
                             f"install the build matching torch {torch.__version__}, or use zoo:NAME (see `sparsify zoo`)") from None
    try:
        module = tvm.get_model(name, weights=None, **model_args)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"torchvision:{name}({_fmt_args(model_args)}) failed: {why}; "
                             "see torchvision.models.list_models() for the names") from None
    return LoadedModel(module, f"{TORCHVISION_PREFIX}{name}", name, (1, 3, 224, 224),
                       model_args.get("num_classes", 1000), None, None)


def _fmt_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
