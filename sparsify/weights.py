"""A user's trained weights: read a state dict from ``.pt``/``.pth``/``.safetensors`` and apply it to a model.

``.pt``-style files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled code. A checkpoint dict that holds the state dict under ``state_dict``,
``model_state_dict`` or ``model`` (with other entries such as ``epoch`` beside it) is unwrapped; the
``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) key prefixes, and a first name every
key shares (a LightningModule's ``model.``), are removed when the model's own names do not carry
them, and tied weights saved once (safetensors' ``save_model``) fill every name that shares them. A sparsify
run's own ``weights.safetensors`` fits the model it was transformed from: its masks are applied to the
weights and dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .errors import ModelLoadError, name_list

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a zip that torch.jit.save wrote (its archive holds the module's code)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``; ModelLoadError (one line) when there is none or the file is unsafe."""
    path = Path(path).expanduser()
    if path.is_dir():  # a run directory most often: its weights are one file in it
        inside = path / "weights.safetensors"
        raise ModelLoadError(f"--weights {path} is a directory; give the weights file itself"
                             + (f", e.g. {inside}" if inside.is_file() else " (.pt, .pth or .safetensors)"))
    if not path.is_file():
        raise ModelLoadError(f"--weights {path} not found; give a .pt, .pth or .safetensors file holding a state dict")
    with open(path, "rb") as f:
        head = f.read(9)
    # the format by the content, whatever the name says: safetensors opens with its header's length
    # and "{" (a .pt of safetensors was "not a file torch.save wrote"), torch.save with a zip or a
    # pickle (a .safetensors of torch.save was "header too large")
    torch_saved = head[:2] == b"PK" or head[:1] == b"\x80"
    if not torch_saved and (path.suffix == ".safetensors" or head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for damaged files
            raise ModelLoadError(f"--weights {path} is not a readable safetensors file ({e}); save it again") from None
    else:
        if not torch_saved:  # torch.save writes a zip archive (older: a pickle)
            raise ModelLoadError(f"--weights {path} is not a file torch.save wrote (nor .safetensors); give the "
                                 f"file of torch.save(model.state_dict(), path)")
        if _is_torchscript(path):  # before torch.load, which warns about it on stderr
            raise ModelLoadError(f"--weights {path} is a TorchScript module (torch.jit.save), not a state dict; "
                                 f"save `model.state_dict()` with torch.save, or as .safetensors")
        try:
            with open(path, "rb") as f:  # a file object: torch.load reads a ".safetensors" name as safetensors
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise ModelLoadError(
                    f"--weights {path} holds pickled objects, not only tensors, and is not loaded (it could run "
                    f"code); save `model.state_dict()` with torch.save, or as .safetensors") from None
            raise ModelLoadError(f"--weights {path} cannot be read by torch.load ({first[:120]}); save it again "
                                 f"with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        others = [str(k) for k, v in obj.items() if not torch.is_tensor(v)] if isinstance(obj, dict) else []
        what = (f"a dict of tensors and {name_list(others)} (not tensors)" if others and len(others) < len(obj)
                else f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise ModelLoadError(f"--weights {path} holds {what}, not a state dict; save model.state_dict(), or a "
                             f"checkpoint dict with it under 'state_dict' or 'model'")
    for key, t in obj.items():  # kinds of tensor the loading and checks cannot read: tracebacks before
        kind = ("a sparse" if t.layout != torch.strided else "a meta (value-less)" if t.is_meta
                else "a quantized" if t.is_quantized else None)
        if kind is not None:
            raise ModelLoadError(f"--weights {path} holds {kind} tensor, {key}; save plain dense tensors "
                                 f"(tensor.to_dense(), tensor.dequantize(), the trained values)")
    return obj


def _fitted(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the wrappers' key prefixes removed (``module.`` of DataParallel, ``_orig_mod.`` of
    torch.compile, a first name all keys share such as a LightningModule's ``model.``, nested too) as
    far as that names the model's keys (a model whose own submodule is
    called ``module`` keeps its names), and with tied weights saved once
    (``self.b.weight = self.a.weight`` written by safetensors' ``save_model`` under one name) under
    each name that shares them."""
    candidates = [state]  # each wrapper prefix peeled off in turn; the one naming most of the model's keys wins
    while True:
        prefix = next((p for p in PREFIXES if candidates[-1] and all(k.startswith(p) for k in candidates[-1])), None)
        if prefix is None:
            # any first name that every key shares: a LightningModule's ``model.`` (its checkpoint's
            # state_dict names the wrapped net's keys so), ``net.``, ``backbone.``
            first = {k.split(".", 1)[0] + "." if "." in k else "" for k in candidates[-1]}
            prefix = first.pop() if len(first) == 1 and "" not in first and len(candidates) <= 4 else None
        if prefix is None:
            break
        candidates.append({k[len(prefix):]: v for k, v in candidates[-1].items()})
    state = max(candidates, key=lambda c: len(c.keys() & own.keys()))  # the first of equals: the least peeled
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for k, v in own.items():
        if k in state:
            by_storage.setdefault((v.data_ptr(), tuple(v.shape)), k)
    tied = {k: state[by_storage[(v.data_ptr(), tuple(v.shape))]] for k, v in own.items()
            if k not in state and v.numel() and (v.data_ptr(), tuple(v.shape)) in by_storage}
    return {**state, **tied}


def _masks_applied(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sparsify run's ``weights.safetensors`` for the model it was transformed from: each masked
    layer's ``X.weight`` times its ``X.mask`` (the weights the run computes with), the masks dropped.
    Any other ``state`` is returned as it is."""
    from .nn import broadcast_mask

    out = dict(state)
    for key, mask in state.items():
        weight = key.removesuffix(".mask") + ".weight"
        w = state.get(weight)
        if (not key.endswith(".mask") or key in own or weight not in own or w is None or mask.dim() > w.dim()
                or tuple(mask.shape) != tuple(w.shape[:mask.dim()])):
            continue
        out[weight] = w * broadcast_mask(mask.to(w.dtype), w)
        del out[key]
    return out


def _misfit(source: str, model: str, parts: list[str]) -> ModelLoadError:
    return ModelLoadError(f"--weights {source} does not fit {model}: {'; '.join(parts)}; pass the same "
                          f"--model-args the weights were trained with, or weights saved from this model")


@torch.no_grad()
def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str, model: str,
                     allow_missing: bool = False) -> list[str]:
    """Load ``state`` into ``module`` (every key and shape must match, every value must be finite);
    returns the model's keys the file lacks, which ``allow_missing`` lets through (they keep their
    values) for the caller to check against what the forward reads (``check_missing``).

    Raises ModelLoadError naming a few mismatched keys, or the first tensor (in the model's order)
    holding NaN or infinite values and how many; nothing is copied then. BatchNorm's
    ``num_batches_tracked`` counters may be absent from the file (older PyTorch omits them).
    """
    own = module.state_dict()
    state = _masks_applied(_fitted(state, own), own)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misfits = [f"{k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
               for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # integers for a float tensor (int8 quantized values without their scale) were cast as they are
    misfits += [f"{k} is {str(state[k].dtype).removeprefix('torch.')} in the file, "
                f"{str(own[k].dtype).removeprefix('torch.')} in the model"
                for k in own if k in state and own[k].is_floating_point() and not state[k].is_floating_point()]
    if (missing and not allow_missing) or unexpected or misfits:
        parts = []
        if missing:
            parts.append(f"missing {name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {name_list(unexpected)}")
        if misfits:
            parts.append(name_list(misfits))
        raise _misfit(source, model, parts)
    # in the model's order, so the tensor named is the first in the network
    bad = [(k, int((~torch.isfinite(state[k])).sum()), state[k].numel()) for k in own
           if k in state and state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        k, n, total = bad[0]
        more = f", and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''} too" if len(bad) > 1 else ""
        raise ModelLoadError(f"--weights {source}: {k} has {n} NaN or infinite value{'s' if n > 1 else ''} (of "
                             f"{total}){more}; training and export need finite weights: save the weights from before "
                             f"they became non-finite (e.g. an earlier checkpoint)")
    for k, v in own.items():
        if k in state:
            v.copy_(state[k].to(dtype=v.dtype))
    return missing


def check_missing(missing: list[str], read: Iterable[str], source: str, model: str,
                  read_in_python: Callable[[list[str]], bool] | None = None) -> str | None:
    """After tracing: the keys a ``--weights`` file lacks (``apply_state_dict``) must be ones the
    forward never reads (``read``: the traced model's state-dict keys; ``read_in_python(keys)``:
    whether it reads any of the others as Python values, which tracing turns into branches and
    constants: ``replay.decides_graph``), as a sparsify run's weights lack a layer its forward skips
    (an optional head). Raises ModelLoadError naming those it does read; returns a one-line note
    naming the others, None when none is missing."""
    read = set(read)
    needed = [k for k in missing if k in read]
    if needed:
        raise _misfit(source, model, [f"missing {name_list(needed)}"])
    if not missing:
        return None
    if read_in_python is not None and read_in_python(list(missing)):
        raise _misfit(source, model, [f"missing {name_list(missing)}, which the forward reads in Python (the "
                                      f"value decides the traced graph: a branch, a number)"])
    return (f"--weights {source} lacks {name_list(missing)}, which the forward never reads: "
            f"{'they keep' if len(missing) > 1 else 'it keeps'} the model's initial values")
