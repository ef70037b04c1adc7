"""Trace an nn.Module into a torch.fx GraphModule with shapes recorded on every node.

The model is traced in eval mode and in training mode; when the two programs differ (dropout
flags, ``if self.training:`` branches, auxiliary outputs) the result keeps both graphs over one
module tree (``ModeGraphModule``). Sparse layers, modules a rule covers and the user's ``--leaf``
module types stay opaque (leaf modules). A model that cannot be traced raises TraceError naming the
source line and, when the failure is inside a submodule's forward, the type to make a leaf.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dis
import functools
import inspect
import itertools
import logging
import operator
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.parameter import is_lazy

from ..errors import TraceError, UsageError
from ..nn import SPARSE_LAYERS


# Tensor factories whose sizes or options a model computes from its input: stochastic depth's
# ``torch.rand(x.shape[0], 1, 1, 1, device=x.device)``. torch.fx records a torch function only when
# a tensor argument is traced, so these failed on a traced size ("rand() received an invalid
# combination of arguments - got (Proxy, ...)"); the tracer records them as calls instead.
TENSOR_FACTORIES = (torch.rand, torch.randn, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.empty,
                    torch.full, torch.arange, torch.linspace, torch.eye)


# nn.Module's methods before a trace patches them (SparsifyTracer._decide runs modules mid-trace)
_ORIG_MODULE_CALL, _ORIG_MODULE_GETATTR = torch.nn.Module.__call__, torch.nn.Module.__getattr__


class _InPlaceProxy(fx.Proxy):
    """A Proxy whose augmented assignments stay in place: fx's Proxy has no ``__iadd__``, so Python ran
    ``x += y`` as ``x = x + y`` and an alias of ``x`` (``skip = x`` before it) kept the old value, where
    the eager model updates the tensor both names hold. ``operator.iadd`` in the graph does what the
    model does: in place for a tensor, a new value for a number (``_functional_augmented`` makes it
    ``operator.add`` where no alias can tell)."""


def _in_place_method(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


# The augmented assignments and the operators Python falls back to without them (``x = x + y``).
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                 operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                 operator.ior: operator.or_, operator.ixor: operator.xor}
for _op in _OUT_OF_PLACE:
    setattr(_InPlaceProxy, f"__{_op.__name__}__", _in_place_method(_op))


def _setitem(self: fx.Proxy, index: Any, value: Any) -> None:
    # fx's Proxy has no ``__setitem__``: ``x[:, :8] = y`` failed to trace ("does not support item
    # assignment"). ``operator.setitem`` writes into ``x`` as the model does; fx keeps the node
    # although nothing reads its value (it is side-effectful).
    self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


_InPlaceProxy.__setitem__ = _setitem  # type: ignore[attr-defined]


def _len(self: fx.Proxy) -> int:
    # list(x.chunk(4, 1)) asks for the length first: known for the splits SparsifyTracer.iter iterates
    count = _pieces(self.node)
    if count is not None:
        return count
    tracer = self.tracer
    if isinstance(tracer, SparsifyTracer) and _splits_by_size(self.node):
        # list(x.unbind(1)), list(x.split(2, 1)): as many pieces as the example's size gives, as
        # SparsifyTracer.iter counts them (fx refused: "'len' is not supported")
        return tracer.piece_count(self, inspect.currentframe().f_back, "len")
    if isinstance(tracer, SparsifyTracer):
        # len(x) of a tensor is x.size(0), read as a Python number: decided on the example input
        # like other sizes (fx refused it), refused in one line when it is the batch size
        size = tracer.create_proxy("call_method", "size", (self, 0), {})
        try:
            value = tracer.size_value(size, inspect.currentframe().f_back, "len")
        finally:
            if not size.node.users:
                tracer.graph.erase_node(size.node)
        if value is not None:
            return int(value)
    return fx.Proxy.__len__(self)


_InPlaceProxy.__len__ = _len  # type: ignore[attr-defined]


def _number(kind: type) -> Any:
    def convert(self: fx.Proxy) -> Any:
        # ``int(x.shape[2] / 2)``, ``range(x.size(1))``, ``float(h) / w``: fx refused a traced value
        # read as a Python number. One computed from sizes is decided on the example input
        # (SparsifyTracer.size_value), like a condition.
        tracer = self.tracer
        value = tracer.size_value(self, inspect.currentframe().f_back, "reads") \
            if isinstance(tracer, SparsifyTracer) else None
        if value is None:
            raise fx.proxy.TraceError(f"a traced value is read as a Python {kind.__name__} "
                                      f"({self.node.name}), which symbolic tracing cannot give")
        return kind(value)

    return convert


_InPlaceProxy.__int__ = _number(int)  # type: ignore[attr-defined]
_InPlaceProxy.__index__ = _number(int)  # type: ignore[attr-defined]
_InPlaceProxy.__float__ = _number(float)  # type: ignore[attr-defined]


class SparsifyTracer(fx.Tracer):
    """torch.fx tracer that keeps as leaves: sparse layers, the given module types, and every module
    a rule covers (a subclass of a known layer that does not override its forward is that layer);
    calls of ``TENSOR_FACTORIES`` with traced arguments become nodes."""

    def __init__(self, leaf_types: Iterable[str] = (), rules: Any = None) -> None:
        super().__init__(autowrap_functions=TENSOR_FACTORIES)
        # fx patches the autowrap functions where the traced code finds them: module globals
        # (``from torch import rand``) and the modules searched here (``torch.rand``).
        self._autowrap_search.append(torch)
        self.leaf_types = set(leaf_types)
        self.rules = rules
        self.record_stack_traces = True  # lets errors name the model's source line
        # A buffer read in forward is a graph value (get_attr), not a tensor computed once while
        # tracing: ``x / (self.ema + 1e-3)`` or ``self.var[None, :, None, None]`` otherwise became
        # constants that training never updates, and in-place updates of a buffer ran on the
        # user's module as it was traced.
        self.proxy_buffer_attributes = True
        # The example inputs by forward's parameter names (``trace(example=...)``): Python control
        # flow on sizes is decided on them (``to_bool``) and each branch recorded in size_branches.
        self.example: dict[str, torch.Tensor] = {}
        self.size_branches: list[str] = []
        self._deciding = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        # fx traces ``type(model).forward``: the hooks registered on the model itself (its own
        # forward hook, ``torch.nn.utils.prune`` of a parameter of its own) were dropped. They are
        # traced with it, as ``model(x)`` runs them; a submodule's run in its call (``__call__``).
        root = self.root
        if is_module and (root._forward_pre_hooks or root._forward_hooks):
            root_fn = _with_hooks(root, root_fn)
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # The model's own ``with torch.no_grad():`` runs while it is traced; the graph would lose it.
        if kind in ("call_function", "call_method", "call_module") and not torch._C.is_grad_enabled():
            node.meta["grad_disabled"] = True
        return node

    def to_bool(self, obj: fx.Proxy) -> bool:  # type: ignore[override]
        # Python control flow on a traced value: ``assert x.shape[1] == 3``, ``if x.shape[-1] % 8:``,
        # ``if up.shape != skip.shape:`` (UNets). fx refused them all. A condition computed from
        # sizes only is decided on the example inputs (``size_value``) and the branch it takes is
        # traced; one that reads tensor values (``if x.sum() > 0:``) still cannot be traced.
        user = inspect.currentframe().f_back.f_back  # Proxy.__bool__, then the code that branches
        value = self.size_value(obj, user, "branches on")
        if value is None:
            return super().to_bool(obj)
        if _is_assert(user):
            if not value:
                raise _Untraceable(f"an assert in forward fails for the example input of shape "
                                   f"{shape_text(tuple(self.example.values()))}; give the shape the model expects "
                                   f"with --input-shape")
            return True
        return bool(value)

    def size_value(self, obj: fx.Proxy, user: Any, use: str) -> bool | int | float | None:
        """The value of ``obj`` when it is computed from tensor sizes only (``x.shape[-1] % 8 == 0``,
        ``int(x.shape[2] / 2)``, ``math.ceil(h / s)``): the graph traced so far run on the example
        inputs' shapes under FakeTensorMode (``_condition``, ``_decide``). None when it is not
        (it reads tensor values) or no example was given. The place in the model's code (frame
        ``user``) is recorded in ``size_branches`` (``size_branches_note``). Raises _Untraceable when
        the value changes with the batch size, which stays free in training and export (``use``
        says what the forward does with it: "branches on", "reads", "len", "iterates over")."""
        if not self.example or self._deciding:  # deciding reached a traced value (a rebound buffer): no
            return None
        where = user_source_line("".join(traceback.format_stack(user)))
        self._deciding = True
        try:
            condition, inputs = self._condition(obj.node)
            batch = next(iter(self.example.values())).shape[0]
            value = self._decide(condition, inputs, batch)
            others = {self._decide(condition, inputs, b) for b in _OTHER_BATCHES if b != batch}
        except Exception:
            return None
        finally:
            self._deciding = False
        if others != {value}:
            what, fix = {"branches on": ("branches on the batch size", "compute that branch with torch operations "
                                                                       "(torch.where)"),
                         "reads": ("reads the batch size as a Python number", "keep it a traced size "
                                   "(x.view(x.size(0), -1), x.flatten(1))"),
                         "len": ("reads the batch size as a Python number (len of a tensor)", "write x.size(0), "
                                 "a traced size, instead of len(x)"),
                         "iterates over": ("loops over the batch axis", "compute it for the whole batch at once")}[use]
            raise _Untraceable(f"the forward {what}, which stays free in training and export; {fix}, or keep the "
                               f"module that holds it opaque with --leaf TYPE")
        if not _is_assert(user):
            self.size_branches.append(where or "forward")
        return value

    def _condition(self, node: fx.Node) -> tuple[fx.GraphModule, list[torch.Tensor]]:
        """The part of the graph traced so far that computes ``node`` (a condition), as a
        GraphModule, and the example inputs it reads (KeyError: it reads another input)."""
        needed: set[fx.Node] = set()

        def close(start: fx.Node) -> None:
            stack = [start]
            while stack:
                n = stack.pop()
                if n not in needed:
                    needed.add(n)
                    stack.extend(n.all_input_nodes)

        close(node)
        # an in-place op on a value the condition reads changes it (``y.unsqueeze_(-1)`` before
        # ``if y.dim() == 3:``) without being its ancestor: it runs too
        before = list(itertools.takewhile(lambda n: n is not node, self.graph.nodes))
        grown = True
        while grown:
            grown = False
            for n in before:
                if n not in needed and _in_place(n) and n.args and n.args[0] in needed:
                    close(n)
                    grown = True
        graph, env = fx.Graph(), {}
        inputs = []
        for n in self.graph.nodes:
            if n in needed:
                env[n] = graph.node_copy(n, lambda a: env[a])
                if n.op == "placeholder":
                    inputs.append(self.example[n.target])
        graph.output(env[node])
        with _unpatched_modules():  # the GraphModule copies the parameters it reads (``self.weight.size()``)
            return fx.GraphModule(self.root, graph), inputs

    def _decide(self, condition: fx.GraphModule, inputs: list[torch.Tensor], batch: int) -> bool | int | float:
        """The value of ``condition`` (``_condition``) for fake inputs of the examples' shapes at
        batch size ``batch``. TypeError when it is a tensor's value, not one computed from sizes."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # eval mode: a BatchNorm leaf of the training trace must not update its statistics
        with _unpatched_modules(), _quiet("torch._subclasses.fake_tensor"), eval_mode(self.root), mode:
            fake = [torch.empty((batch, *x.shape[1:]), dtype=x.dtype) for x in inputs]
            value = Interpreter(condition).run(*fake)
            if not isinstance(value, (bool, int, float, torch.SymBool, torch.SymInt, torch.SymFloat)):
                raise TypeError(f"not a value of sizes: {type(value).__name__}")  # a tensor's value
            for sym, plain in ((torch.SymBool, bool), (torch.SymInt, int), (torch.SymFloat, float)):
                if isinstance(value, sym):
                    return plain(value)
            return value

    def piece_count(self, obj: fx.Proxy, frame: Any, what: str) -> Any:
        """``len(obj)`` of a split whose number of pieces depends on a size, decided on the example
        input (``size_value``; ``what`` names the use in its messages); None when it cannot be."""
        length = self.create_proxy("call_function", len, (obj,), {})
        try:
            return self.size_value(length, frame, what)
        finally:
            self.graph.erase_node(length.node)

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:  # type: ignore[override]
        # fx iterates a Proxy only when unpacked (``a, b = x.chunk(2, 1)``): ``for t in x.chunk(4, 1)``,
        # ``list(...)``, ``sum(...)`` failed ("Proxy object cannot be iterated"). Splits whose number
        # of pieces the call itself gives are iterated piece by piece; a chunk that yields fewer
        # pieces than asked (6 channels in 4 chunks: 3) fails loudly when the graph first runs.
        # Others (``x.unbind(2)``, ``x.split(8, 1)``) have as many pieces as the example input's
        # sizes give (``size_value``; over the batch axis refused), iterated likewise.
        count = _pieces(obj.node)
        if count is None:
            count = self.piece_count(obj, inspect.currentframe().f_back.f_back, "iterates over")
            if not isinstance(count, int):
                return super().iter(obj)
        pieces = [obj[i] for i in range(count)]
        for piece in pieces:
            piece.node.meta["iterated_split"] = count  # see propagate_shapes
        return iter(pieces)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:  # type: ignore[override]
        # A module built in forward (``nn.ReLU()(x)``, ``nn.Flatten()(x)``) is not in the model's
        # hierarchy, so fx refused it ("module is not installed as a submodule"). One without
        # weights or buffers of its own (its modules may be the model's) is its forward's operations:
        # traced through. One with them has new weights on every call, which no graph (nor a
        # trained sparse model) can keep.
        try:
            self.path_of_module(m)
        except NameError:
            # weights that are the model's own (nn.Sequential(self.c2, nn.ReLU())(x)) are no new ones
            own = {id(t) for t in itertools.chain(self.root.parameters(), self.root.buffers())}
            if any(id(t) not in own for t in itertools.chain(m.parameters(), m.buffers())):
                raise _Untraceable(
                    f"{type(m).__name__} is created inside forward with weights of its own, so every call "
                    f"draws new ones that no trained or exported model can keep; create it in __init__ "
                    f"(self.layer = {type(m).__name__}(...)) and call self.layer in forward") from None
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .rules import DEFAULT_RULES
        from .rules.base import beyond_forward, type_names

        if isinstance(m, SPARSE_LAYERS) or any(n in self.leaf_types for n in type_names(type(m))):
            return True

        if beyond_forward(m) is not None:  # its hooks / parametrizations run only when it is called
            return True
        if isinstance(m, torch.jit.ScriptModule):  # TorchScript: compiled code fx cannot trace into
            return True

        if (self.rules or DEFAULT_RULES).rule_for_module(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


# Batch sizes a condition on sizes is also decided at: one that changes with any of them branches on
# the batch size (``x.shape[0] > 2``, ``min(x.shape[0], 2)``, ``x.shape[0] != 4``, ``x.numel() > k``).
_OTHER_BATCHES = (1, 2, 3, 4, 64)


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """nn.Module's own ``__call__`` and ``__getattr__`` while a trace is in progress: fx patches them
    so that a module call or a parameter read becomes a node of the graph being traced, which a
    condition's graph built or run meanwhile (``SparsifyTracer.to_bool``) must not do."""
    patched = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__, torch.nn.Module.__getattr__ = _ORIG_MODULE_CALL, _ORIG_MODULE_GETATTR
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = patched


def _is_assert(frame: Any) -> bool:
    """Whether the code in ``frame`` converts a value to bool for an ``assert`` (the jump over the
    raise of an AssertionError follows)."""
    from bisect import bisect_left

    insts = list(dis.get_instructions(frame.f_code))
    i = bisect_left(insts, frame.f_lasti, key=lambda x: x.offset)
    if i >= len(insts) or "JUMP" not in insts[i].opname:
        return False
    # `assert c`: the jump skips the raise that follows; `assert a and b`: the jump goes to it
    target = next((inst for inst in insts if inst.offset == insts[i].argval), None)
    return insts[i + 1].opname == "LOAD_ASSERTION_ERROR" or (target is not None and target.opname == "LOAD_ASSERTION_ERROR")


_SPLITS = {"chunk": ("chunks", 0), "split": ("split_size_or_sections", 0), "split_with_sizes": ("split_sizes", 1),
           "tensor_split": ("indices_or_sections", 1)}  # the argument giving the pieces, and what a list adds


def _torch_op_name(node: fx.Node) -> str | None:
    """The name of the tensor method or torch function ``node`` calls (``x.split`` and ``torch.split``:
    "split"), else None."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("torch", "torch.functional"):
        return getattr(node.target, "__name__", "")
    return None


def _splits_by_size(node: fx.Node) -> bool:
    """Whether ``node`` is a split whose number of pieces depends on a size (``unbind``, ``split(8, 1)``)."""
    return _torch_op_name(node) in ("unbind", "split") and _pieces(node) is None


def _pieces(node: fx.Node) -> int | None:
    """How many pieces a traced split yields when its call says so (``chunk(4, 1)``, ``split([8, 8], 1)``,
    ``tensor_split([4, 12], 1)``); None when that depends on a size (``unbind``, ``split(8, 1)``)."""
    name, args = _torch_op_name(node), node.args[1:]
    if name not in _SPLITS:
        return None
    key, extra = _SPLITS[name]
    given = args[0] if args else node.kwargs.get(key, node.kwargs.get("sections", node.kwargs.get("indices")))
    if isinstance(given, (list, tuple)) and all(isinstance(v, int) for v in given):
        return len(given) + extra if name == "tensor_split" else len(given)
    if isinstance(given, int) and name in ("chunk", "tensor_split"):
        return given
    return None


def _with_hooks(module: nn.Module, forward: Any) -> Any:
    """``forward(module, *args)`` wrapped in ``module``'s forward pre-hooks and forward hooks, called
    as ``nn.Module.__call__`` calls them (those registered ``with_kwargs`` get and give kwargs)."""
    pre_kw, post_kw = module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs

    @functools.wraps(forward)
    def hooked(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        for hid, hook in list(module._forward_pre_hooks.items()):
            if hid in pre_kw:
                result = hook(self, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(self, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        out = forward(self, *args, **kwargs)
        for hid, hook in list(module._forward_hooks.items()):
            result = hook(self, args, kwargs, out) if hid in post_kw else hook(self, args, out)
            if result is not None:
                out = result
        return out

    return hooked


_NOT_USER_CODE = ("/torch/", "/typer/", "/click/")


def stop_gradient(x: Any) -> Any:
    """``x`` detached from autograd when it is a tensor (tensors in tuples / lists / dicts too), else
    ``x``: what a value computed under ``torch.no_grad()`` is to the code that reads it."""
    return map_aggregate(x, lambda v: v.detach() if isinstance(v, torch.Tensor) else v)


def _keep_no_grad(graph: fx.Graph) -> None:
    """Mark the ends of the model's no-gradient regions: each node computed under ``torch.no_grad()``
    (or ``set_grad_enabled(False)``, ``inference_mode``, a ``@torch.no_grad()`` forward traced
    through) whose value is read outside the region is read through ``stop_gradient``, so training
    the traced graph sends no gradient where the model's forward sends none."""
    for node in list(graph.nodes):
        if not node.meta.get("grad_disabled"):
            continue
        if _in_place(node):  # a buffer update under no_grad (an EMA) must not record autograd history
            for a in dict.fromkeys(x for x in node.all_input_nodes
                                   if not (x.op == "call_function" and x.target is stop_gradient)):
                with graph.inserting_before(node):
                    detached = graph.call_function(stop_gradient, (a,))
                detached.meta["grad_disabled"] = True
                node.replace_input_with(a, detached)
        outside = [u for u in node.users if not u.meta.get("grad_disabled")]
        if not outside:
            continue
        with graph.inserting_after(node):
            stop = graph.call_function(stop_gradient, (node,))
        stop.meta["stack_trace"] = node.meta.get("stack_trace")
        for user in outside:
            user.replace_input_with(node, stop)


_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "flatten", "unflatten",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk",
                 "as_strided", "detach", "movedim", "diagonal", "unfold", "contiguous"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split, torch.movedim, torch.t,
                   torch.unbind}


def _functional_augmented(graph: fx.Graph) -> None:
    """``x += y`` out of place where nothing else can see ``x`` change: no reader of ``x`` after it, no
    view of ``x`` taken before it, and ``x`` not itself a view (``v = x[:, :8]; v += y`` writes into
    ``x``: made out of place, the write was lost, 0.017 off at density 1). The graph then does not
    write into the model's inputs or into activations autograd saved (``relu(...)`` then ``+= 1``),
    as the model's ``x = x + y`` would not; an alias that reads ``x`` afterwards (``skip = x``
    before it) keeps the in-place update."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _OUT_OF_PLACE or not isinstance(node.args[0], fx.Node):
            continue
        if _is_view(node.args[0]):
            continue
        seen = [u for u in node.args[0].users if u is not node and (
            order[u] > order[node] or _is_view(u) or (u.op == "call_function" and u.target is stop_gradient))]
        if not seen:
            node.target = _OUT_OF_PLACE[node.target]


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may be a view of its input (slicing, reshaping, transposing; an item of a
    chunk or split), so that writing into it writes into that input."""
    return ((node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS))


def _in_place(node: fx.Node) -> bool:
    """True for a node that writes into its first argument (``x.add_(y)``, ``x += y``, ``copy_``,
    ``x[i] = y``)."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    return node.op == "call_function" and (node.target in _OUT_OF_PLACE or node.target is operator.setitem)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module, written: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Trace without leaving traced values in ``model``'s buffers: a forward that rebinds one
    (``self.count += 1``, ``self.ema = ...``) sets it to a traced value; each is put back on exit.
    Yields a dict that, after the block, maps the buffers rebound to a traced value (by qualified
    name) to that value. A buffer rebound to a tensor computed without the input (``self.scale =
    torch.ones(8)``, a reset) keeps it: the graph reads the buffer, and put back it read the old
    value where the model reads the new one (4.4 off). A buffer written in place as a plain tensor
    (a trace that reads buffers as tensors: ``self.count += 1`` before ``if self.count > 2:``) gets
    its value back (tracing left the user's model counted up) and is named in ``written``: the
    graph does not update it."""
    before = {(name, mod, key): t for name, mod in model.named_modules()
              if not isinstance(mod, torch.jit.ScriptModule)  # compiled: its forward cannot rebind them
              for key, t in mod._buffers.items()}
    values = {k: t.detach().clone() for k, t in before.items() if isinstance(t, torch.Tensor) and not is_lazy(t)}
    rebound: dict[str, Any] = {}
    try:
        yield rebound
    finally:
        for (name, mod, key), t in before.items():
            now = mod._buffers.get(key)
            qualified = f"{name}.{key}" if name else key
            if now is not t and isinstance(now, fx.Proxy):
                rebound[qualified] = now
                mod._buffers[key] = t
            elif now is t and (name, mod, key) in values and not torch.equal(t, values[(name, mod, key)]):
                with torch.no_grad():
                    t.copy_(values[(name, mod, key)])
                if written is not None:
                    written.append(f"buffer {qualified}")


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # training, _parameters, _buffers, _modules, the hook dicts
# what fx's Tracer.create_arg stows on the root for constants: the GraphModule reads it from there
_TRACER_CONSTANT = re.compile(r"_(tensor_constant|torchbind_obj|tree_spec_constant|opaque_obj|\w+_constant_)\d+")


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v) for v in value)
    return False


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain Python state a forward may update: numbers, strings, small tensors,
    and lists / tuples / dicts / sets / deques / objects of them (a counter object, a history of
    lists), a few levels deep; not modules, functions or large tensors."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, torch.Tensor):
        return not isinstance(value, nn.Parameter) and not is_lazy(value) and value.numel() <= 1 << 16
    if depth > 3 or isinstance(value, (nn.Module, fx.Proxy, type)) or callable(value):
        return False
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return all(_plain(v, depth + 1) for v in value)
    attrs = getattr(value, "__dict__", None)
    return isinstance(attrs, dict) and type(value).__module__ != "builtins" and _plain(attrs, depth + 1)


def _state_copy(value: Any) -> Any:
    """A copy of an attribute's value to compare and put back: plain state (``_plain``) deeply,
    other containers shallowly, anything else (modules, functions) as the object itself."""
    if _plain(value) and not isinstance(value, _SCALARS):
        try:
            return copy.deepcopy(value)
        except Exception:  # an object that refuses to be copied: compared as itself
            return value
    if isinstance(value, (list, dict, set)):
        return copy.copy(value)
    return value


def _same_state(copied: Any, now: Any) -> bool:
    if copied is now:  # not copied (a function, a module, an object holding them): nothing to compare
        return True
    if isinstance(copied, torch.Tensor):
        if not (isinstance(now, torch.Tensor) and now.shape == copied.shape and now.dtype == copied.dtype):
            return False
        try:
            return bool(torch.equal(now.detach(), copied))
        except Exception:  # a fake or meta tensor left by shape propagation through a hook: no value to compare
            return True
    if isinstance(copied, _SCALARS):
        return type(now) is type(copied) and now == copied
    if type(now) is not type(copied):
        return False
    if isinstance(copied, dict):
        return copied.keys() == now.keys() and all(_same_state(v, now[k]) for k, v in copied.items())
    if isinstance(copied, (list, tuple, collections.deque)):
        return len(copied) == len(now) and all(_same_state(a, b) for a, b in zip(copied, now))
    if isinstance(copied, (set, frozenset)):
        return copied == now
    attrs = getattr(copied, "__dict__", None)
    if isinstance(attrs, dict) and isinstance(getattr(now, "__dict__", None), dict):
        return _same_state(attrs, now.__dict__)
    return True  # other objects: only a rebinding to a traced value is seen (and undone)


def _put_back(value: Any, copied: Any) -> None:
    """Restore the contents of the mutable ``value`` from its copy (``_state_copy``, taken for this
    one restore: its elements are used as they are); the object stays the one others hold."""
    if copied is value:
        return
    if isinstance(value, torch.Tensor) and isinstance(copied, torch.Tensor):
        with torch.no_grad():
            value.copy_(copied)
    elif isinstance(value, (list, collections.deque)):
        value.clear()
        value.extend(copied)
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(copied)
    elif isinstance(getattr(value, "__dict__", None), dict) and isinstance(getattr(copied, "__dict__", None), dict):
        value.__dict__.clear()
        value.__dict__.update(copied.__dict__)


@contextlib.contextmanager
def _attributes_kept(model: nn.Module, written: list[str] | None = None) -> Iterator[None]:
    """Trace without leaving traced values or traced-for state on ``model``. An attribute a forward
    or a hook sets to a traced value (``torch.nn.utils.prune`` sets ``module.weight = weight_orig *
    weight_mask``) is put back. So is plain Python state the forward changes as it runs (``self.step
    += 1``, ``self.initialized = True``, ``self.history.append(n)``, a tensor attribute counted up in
    place): tracing ran the forward, which left the user's model counted up, and the graph baked in
    the branch that state chose on that call; such attributes are named in ``written``
    (``state_written_note``)."""
    before = {id(m): (m, dict(vars(m))) for m in model.modules()}
    copies = {(id(m), k): _state_copy(v) for m, attrs in before.values() for k, v in attrs.items()
              if k not in _MODULE_INTERNALS}
    names = {id(m): n for n, m in model.named_modules()}
    try:
        yield
    finally:
        for key_id, (m, attrs) in before.items():
            now = vars(m)
            changed = []
            for key in [k for k in now if k not in _MODULE_INTERNALS and k not in attrs
                        and not (m is model and _TRACER_CONSTANT.fullmatch(k))]:  # set by the forward
                changed.append((key, _holds_proxy(now.pop(key))))
            for key, value in attrs.items():
                if key in _MODULE_INTERNALS or (key in now and now[key] is value and _same_state(copies[(key_id, key)], value)):
                    continue
                changed.append((key, _holds_proxy(now.get(key))))
                now[key] = value
                _put_back(value, copies[(key_id, key)])
            if written is not None:
                prefix = f"{names[key_id]}." if names.get(key_id) else ""
                written.extend(f"attribute {prefix}{key}" for key, traced in changed if not traced)


def _keep_rebound_buffers(graph: fx.Graph, rebound: dict[str, Any]) -> None:
    """A buffer the forward rebinds to a new value keeps it for the next call: write the value into
    the buffer (``copy_``) where it is computed (readers later in the same forward read it directly)."""
    for target, proxy in rebound.items():
        node = proxy.node
        if node.graph is not graph:
            continue
        with graph.inserting_after(node):
            buf = graph.get_attr(target)
        with graph.inserting_after(buf):
            value = graph.call_function(stop_gradient, (node,))
        with graph.inserting_after(value):
            update = graph.call_method("copy_", (buf, value))
        value.meta["grad_disabled"] = update.meta["grad_disabled"] = True  # a write outside autograd


def untrained_layer(node: fx.Node, m: nn.Module) -> tuple[str, str] | None:
    """Why training leaves layer ``m`` (called at ``node``) as it is, and what the user can change; None
    when it trains. Its weight is frozen (``requires_grad=False``) or the model's forward calls it
    under ``torch.no_grad()`` (the ``grad_disabled`` mark the tracer sets)."""
    weight = getattr(m, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.requires_grad:
        return "its weight is frozen (requires_grad=False)", "unfreeze it in the model"
    if node.meta.get("grad_disabled"):
        return "the model's forward runs it under torch.no_grad()", "call it outside the no_grad block"
    return None


def traced_constants(gm: fx.GraphModule) -> str | None:
    """A one-line note when the graph holds tensors computed while it was traced (``_tensor_constant``:
    arithmetic on a buffer that tracing could not follow, e.g. a buffer read in Python control flow):
    they are constants of the traced model, which training does not update; None when there are none."""
    names = sorted({n.target for g in graphs(gm) for n in g.nodes
                    if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")})
    if not names:
        return None
    return (f"{len(names)} tensor{'s' if len(names) > 1 else ''} computed while tracing (from buffers or tensors "
            "the forward uses outside the traced operations) became constants of the traced model: training does "
            "not update them; compute them from module buffers with torch operations to keep them live")


def user_source_line(source: BaseException | fx.Node | str | None) -> str:
    """``file.py:LINE`` of the model code behind an exception (its traceback), an fx node (the stack
    trace fx recorded) or a stack-trace text: the deepest frame outside torch, typer, click and
    sparsify's own machinery (the zoo's models count as model code); "" when there is none."""
    if isinstance(source, BaseException):
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(source.__traceback__)]
    else:
        text = source.meta.get("stack_trace") if isinstance(source, fx.Node) else source
        frames = re.findall(r'File "([^"]+)", line (\d+)', text or "")
    where = ""
    for filename, line in frames:
        f = filename.replace("\\", "/")
        if f.startswith("<") or any(part in f for part in _NOT_USER_CODE):
            continue
        if "/sparsify/" in f and "/sparsify/zoo/" not in f:
            continue
        where = f"{Path(f).name}:{line}"
    return where


def _failing_submodule(model: nn.Module, e: BaseException) -> nn.Module | None:
    """The innermost submodule (not ``model`` itself) whose own ``forward`` was running when tracing failed."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        # The method's first parameter, whatever its name (models written with `s` or `m` for self).
        owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount > 0 else None
        if (code.co_name == "forward" and isinstance(owner, nn.Module) and owner is not model
                and "/torch/" not in code.co_filename.replace("\\", "/")):
            found = owner
        tb = tb.tb_next
    return found


class _Untraceable(Exception):
    """Why tracing cannot go on, with what to do (a module with weights built in forward, a branch on
    the batch size, a failing assert): reported as it is, without the generic advice."""


def _untraceable_message(model: nn.Module, e: BaseException, leaf_types: Sequence[str], mode: str = "") -> str:
    """One line: where tracing failed, and the --leaf that helps (only when a submodule's forward failed)."""
    where = user_source_line(e)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, _Untraceable):
        return f"cannot trace {type(model).__name__}" + (f" at {where}" if where else "") + f": {msg}"
    head = (f"torch.fx cannot trace {type(model).__name__}" + (f" in {mode} mode" if mode else "")
            + (f" at {where}" if where else "")
            + f" ({type(e).__name__}: {msg})")
    sub = _failing_submodule(model, e)
    if sub is None:
        return (head + f"; the failing code is in {type(model).__name__}'s own forward, where --leaf cannot help: "
                "make it traceable (no if / assert / loop on tensor values; one on sizes is decided on the "
                "example input) or move it into a submodule "
                "and keep that opaque with --leaf MODULE_TYPE")
    name = type(sub).__name__
    advice = f"; keep {name} opaque with --leaf {name}"
    from .rules import known_base

    base = known_base(type(sub))
    if base is not None:
        advice += (f" (a leaf keeps its own forward and is left dense and frozen; if {name}.forward computes a "
                   f"{base.__name__} over its own weight, also pass --rule {name}={_rule_hint(base)})")
    return head + advice


def _rule_hint(base: type) -> str:
    from .rules import leaf_rule_name

    return leaf_rule_name(base)


class ModeGraphModule(fx.GraphModule):
    """A GraphModule with one graph per mode: ``graph`` (eval) and ``train_graph`` (training).

    torch.fx bakes ``self.training`` into a trace: ``F.dropout(x, training=self.training)``, ``if
    self.training:`` branches, stochastic depth and auxiliary outputs are recorded as they run in the
    mode the model was traced in. This module holds both traces over one module tree, so every
    submodule and parameter is shared (a pass that replaces ``a.b`` by qualified name changes both
    graphs), and ``forward`` runs the train graph when ``self.training`` and the eval graph
    otherwise. Analysis, compaction and export read ``graph``, the eval-mode behaviour; code that
    must see every layer iterates ``graphs(gm)``. (torchvision's ``DualGraphModule`` swaps one
    ``graph`` attribute on ``train()``/``eval()`` instead, so what a pass sees depends on the mode.)
    """

    held_eval: tuple[str, ...] = ()  # submodules the model's own train() leaves in eval mode

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule",
                 train_graph: fx.Graph | None = None, held_eval: Sequence[str] = ()) -> None:
        super().__init__(root, graph, class_name)
        self.held_eval = tuple(held_eval)
        if train_graph is not None:
            self.set_train_graph(train_graph, root)

    def train(self, mode: bool = True) -> "ModeGraphModule":
        """nn.Module.train, then the submodules the model's own ``train()`` holds in eval mode
        (``held_eval``: BatchNorms of a fine-tuned backbone) back in eval mode."""
        super().train(mode)
        if mode:
            for name in self.held_eval:
                try:
                    self.get_submodule(name).eval()
                except AttributeError:  # a pass removed it (a folded BatchNorm)
                    pass
        return self

    def set_train_graph(self, train_graph: fx.Graph, root: nn.Module | None = None) -> None:
        """Attach the training-mode graph; its modules and attributes come from ``root`` when missing here."""
        from torch.fx.graph_module import _copy_attr

        for node in train_graph.nodes:
            if node.op in ("get_attr", "call_module") and root is not None and root is not self:
                try:
                    _get_attr_path(self, node.target)
                except AttributeError:
                    _copy_attr(root, self, node.target)
        self.__dict__["_train_graph"] = train_graph
        train_graph.owning_module = self
        self.recompile()

    @property
    def train_graph(self) -> fx.Graph:
        return self.__dict__["_train_graph"]

    def recompile(self):  # type: ignore[override]
        code = super().recompile()
        train_graph = self.__dict__.get("_train_graph")
        if train_graph is None:
            return code
        from torch.fx.graph_module import _forward_from_src

        cls = type(self)
        cls._eval_forward = cls.forward
        train_code = train_graph.python_code(root_module="self")
        cls._train_forward = _forward_from_src(train_code.src, train_code.globals, {})
        cls.forward = _dispatch_on_mode
        return code

    def _deepcopy_init(self):  # type: ignore[override]
        def init(res: "ModeGraphModule", fake_mod: nn.Module, graph: fx.Graph) -> None:
            fx.GraphModule.__init__(res, fake_mod, graph)
            res.held_eval = tuple(fake_mod.__dict__.get("held_eval", ()))
            train = fake_mod.__dict__.get("_train_graph")
            if train is not None:
                res.set_train_graph(train, fake_mod)

        return init


def _dispatch_on_mode(self: ModeGraphModule, *args: Any, **kwargs: Any) -> Any:
    return (self._train_forward if self.training else self._eval_forward)(*args, **kwargs)


def _get_attr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    """The graphs of ``gm``: the eval graph first, then the training graph when it differs."""
    train = gm.__dict__.get("_train_graph")
    return [gm.graph] if train is None else [gm.graph, train]


def eval_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, or for a ModeGraphModule a plain GraphModule of its eval graph (sharing modules)."""
    if not isinstance(gm, ModeGraphModule):
        return gm
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, type(gm).__name__)
    out.train(gm.training)
    return out


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward`` (without self); None when its signature cannot be read."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def forward_defaults(model: nn.Module, n_inputs: int | None = None) -> dict[str, Any]:
    """The forward parameters traced at their default values, by name: those with a default beyond
    the first ``n_inputs`` positional ones (default: every one with a default), and keyword-only
    ones with a default (not tuples, lists or dicts). ``forward(self, x, mask=None,
    return_features=False)`` traced with one input gives ``{"mask": None, "return_features": False}``:
    one input, the defaults baked in."""
    params = _forward_parameters(model) or []
    positional = [p for p in params if p.kind in _POSITIONAL]
    n = sum(p.default is p.empty for p in positional) if n_inputs is None else n_inputs
    kept = [p for i, p in enumerate(positional) if i >= n] + [p for p in params if p.kind is p.KEYWORD_ONLY]
    # a tuple / list / dict default stays a traced argument with its default (fx would flatten it)
    return {p.name: p.default for p in kept
            if p.default is not p.empty and not isinstance(p.default, (tuple, list, dict))}


def check_input_count(model: nn.Module, n_inputs: int) -> None:
    """UsageError unless ``n_inputs`` example inputs fit ``model.forward``: at least its parameters
    without a default, at most its positional ones (unless it takes ``*args``)."""
    params = _forward_parameters(model)
    if params is None:
        return
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p.name for p in positional if p.default is p.empty]
    sig = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in positional)
    who = f"{type(model).__name__}.forward({sig})"
    shapes = f"{n_inputs} input shape{'s were' if n_inputs != 1 else ' was'} given"
    if n_inputs < len(required):
        raise UsageError(f"{who} needs {len(required)} inputs but {shapes}; give one shape "
                         f"per input, e.g. --input-shape \"{';'.join(['1,3,32,32'] * len(required))}\", or "
                         f"INPUT_SHAPES with {len(required)} shapes in the model file")
    if n_inputs > len(positional) and not any(p.kind is p.VAR_POSITIONAL for p in params):
        keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        if keyword_only:  # forward(self, *, x): "takes at most 0 inputs" read as a shape problem
            raise UsageError(f"{type(model).__name__}.forward takes {', '.join(keyword_only)} by keyword only, but "
                             f"inputs are passed by position; make {'it' if len(keyword_only) == 1 else 'them'} "
                             f"positional (drop the '*' before {keyword_only[0]})")
        raise UsageError(f"{who} takes at most {len(positional)} inputs but {shapes}; give one shape per input "
                         f"(arguments without a shape keep their defaults)")


def defaults_note(model: nn.Module, n_inputs: int) -> str | None:
    """A note naming the optional forward arguments that were traced at their defaults and that
    forward reads (so behaviour depends on them); None when there are none."""
    fn = inspect.unwrap(getattr(type(model), "forward", None) or model.forward)
    code = getattr(fn, "__code__", None)
    read: set[str] = set()
    if code is not None:
        for ins in dis.get_instructions(code):
            if ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE")):
                read.update(ins.argval if isinstance(ins.argval, tuple) else (ins.argval,))
    used = {k: v for k, v in forward_defaults(model, n_inputs).items() if code is None or k in read}
    if not used:
        return None
    args = ", ".join(f"{k}={v!r}" for k, v in used.items())
    return (f"forward's optional argument{'s' if len(used) > 1 else ''} {args} "
            f"{'are' if len(used) > 1 else 'is'} traced at {'their defaults' if len(used) > 1 else 'its default'}: "
            f"the transformed and exported model always runs with {'these values' if len(used) > 1 else 'it'} "
            "(to feed one as an input, give one --input-shape per input up to it)")


def _drop_specialized(graph: fx.Graph, n_inputs: int) -> None:
    """Erase the placeholders fx adds for ``concrete_args`` (after the ``n_inputs`` traced ones) and
    the asserts that check their values: the graph takes only its traced inputs."""
    checks = {operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for p in [n for n in graph.nodes if n.op == "placeholder"][n_inputs:]:
        chain, todo = [], [p]
        while todo:
            for u in todo.pop().users:
                chain.append(u)
                todo.append(u)
        if any(u.op != "call_function" or u.target not in checks for u in chain):
            continue  # the value is used beyond the checks: keep the placeholder (it has its default)
        for n in sorted(set(chain), key=order.__getitem__, reverse=True) + [p]:
            graph.erase_node(n)


@contextlib.contextmanager
def _model_calls(owner: Any, name: str, model: nn.Module, seen: list[str], answer: Any = None) -> Iterator[None]:
    """While open, the model's calls of ``owner.name`` (``torch.is_grad_enabled``,
    ``torch.onnx.is_in_onnx_export``) are recorded in ``seen`` (by calling module) and answered with
    ``answer`` (None: what the function answers), also where the model's files bound it by name
    (``from torch.onnx import is_in_onnx_export``). torch's own callers (``no_grad`` saving the mode
    it restores) get the real answer and are not recorded."""
    real = getattr(owner, name)

    def model_calls(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "torch" or caller.startswith("torch."):
            return real(*args, **kwargs)
        seen.append(caller)
        return real(*args, **kwargs) if answer is None else answer

    files = {type(m).__module__ for m in model.modules()}
    bound = [(g, k) for g in (vars(sys.modules[f]) for f in files if f in sys.modules and not f.startswith("torch"))
             for k, v in list(g.items()) if v is real]
    setattr(owner, name, model_calls)
    for g, k in bound:
        g[k] = model_calls
    try:
        yield
    finally:
        setattr(owner, name, real)
        for g, k in bound:
            g[k] = real


def _trace_once(model: nn.Module, leaf_types: Sequence[str], rules: Any, mode: str = "",
                defaults: dict[str, Any] | None = None, grad_enabled: bool | None = None,
                grad_reads: list[str] | None = None, written: list[str] | None = None,
                example: dict[str, torch.Tensor] | None = None,
                export_reads: list[str] | None = None) -> tuple[SparsifyTracer, fx.Graph]:
    """One symbolic trace. The model's calls of ``torch.is_grad_enabled()`` are recorded in
    ``grad_reads`` and read ``grad_enabled`` (None: the real mode, on; False: as under
    ``torch.no_grad()``, while the tracer still sees the model's own no-grad regions); buffers the
    forward wrote in place as plain tensors and attributes it changed go into ``written`` (``_buffers_kept``,
    ``_attributes_kept``). ``example``: the example inputs by parameter name, on which conditions on
    sizes are decided (``SparsifyTracer.to_bool``); the model's calls of
    ``torch.onnx.is_in_onnx_export()`` go into ``export_reads``."""
    graph = None
    for proxy_buffers in (True, False):
        tracer = SparsifyTracer(leaf_types, rules)
        tracer.example = dict(example or {})
        # A buffer in Python control flow (``if not self.initialized:``) cannot be a graph value: then
        # buffers are read as the tensors they are (computed values become constants, see
        # ``traced_constants``).
        tracer.proxy_buffer_attributes = proxy_buffers
        try:
            # enable_grad: only the model's own no-grad regions are no-grad in the graph
            with _buffers_kept(model, written) as rebound, _attributes_kept(model, written), torch.enable_grad(), \
                    _model_calls(torch, "is_grad_enabled", model, grad_reads if grad_reads is not None else [],
                                 grad_enabled), \
                    _model_calls(torch.onnx, "is_in_onnx_export", model,
                                 export_reads if export_reads is not None else []):
                graph = tracer.trace(model, concrete_args=defaults or None)
            break
        except Exception as e:
            if not proxy_buffers:
                raise TraceError(_untraceable_message(model, e, leaf_types, mode)) from None
    assert graph is not None
    if defaults:
        n_traced = sum(p.kind in _POSITIONAL and p.name not in defaults for p in _forward_parameters(model) or [])
        _drop_specialized(graph, n_traced)
    _functional_augmented(graph)
    _keep_rebound_buffers(graph, rebound)
    _keep_no_grad(graph)
    # fx marks autowrapped calls so that the generated code registers them for later symbolic
    # traces (``wrap("torch.rand")``); torch 2.x then fails every later trace in the process, also
    # torch.export's (KeyError: 'torch.rand': the dotted name is not a global). The nodes are plain
    # calls without the mark.
    for node in graph.nodes:
        node.meta.pop("is_wrapped", None)
    return tracer, graph


_GLOBAL_HOOKS = {"_global_forward_pre_hooks": "register_module_forward_pre_hook",
                 "_global_forward_hooks": "register_module_forward_hook",
                 "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
                 "_global_backward_hooks": "register_module_full_backward_hook"}


def global_hooks_message() -> str | None:
    """Why a model cannot be traced while global module hooks are registered, or None.

    ``torch.nn.modules.module.register_module_forward_hook`` (and its pre / backward kin) runs a hook
    around every module call in the process. fx traces into the model's containers (their hooks
    become part of the graph, or not, by how fx calls them) and keeps layers as leaves (their hooks
    run only where the graph calls that layer again), and the ONNX export and a later
    ``sparsify.load`` run without them: the sparse model silently computed something else (0.56 off
    the hooked original at density 1). They are refused instead.
    """
    from torch.nn.modules import module as torch_module

    found = []
    for attr, register in _GLOBAL_HOOKS.items():
        for hook in getattr(torch_module, attr, {}).values():
            fn = getattr(hook, "__func__", hook)
            code = getattr(fn, "__code__", None)
            where = f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else ""
            found.append(f"{register}({getattr(fn, '__qualname__', repr(fn))}){where}")
    if not found:
        return None
    return (f"global module hooks are registered ({', '.join(found)}): the sparse model and its ONNX "
            "export cannot carry a hook that runs around every module; register it on the layers it is "
            "for (layer.register_forward_hook) or remove it")


def trace(model: nn.Module, leaf_types: Sequence[str] = (), rules: Any = None,
          n_inputs: int | None = None, example: Any = None) -> fx.GraphModule:
    """Symbolically trace ``model`` in eval mode and in training mode (a GraphModule is returned as is).

    When both traces are the same program the result is a plain GraphModule; otherwise a
    ModeGraphModule that runs each mode's graph (see ``mode_differences`` for what differs).
    The model's own mode is restored and becomes the result's mode. ``rules`` (a Registry): module
    types it has a rule for are kept as leaves too. The graph's inputs are forward's first
    ``n_inputs`` parameters (default: those without a default); the others keep their defaults
    (``forward_defaults``), baked into the graph. With ``example`` (a tensor, or a tuple with one per
    input), Python control flow on sizes (``assert x.shape[1] == 3``, ``if x.shape[-1] % 8:``) is
    decided on its shapes (``SparsifyTracer.to_bool``; the branches taken: ``size_branches_note``).

    Raises TraceError when global module hooks are registered (``global_hooks_message``) or the
    model cannot be traced.
    """
    refused = global_hooks_message()
    if refused:
        raise TraceError(refused)
    if isinstance(model, fx.GraphModule):
        return model
    if getattr(rules, "user_modules", None):  # a user rule for a module it cannot read: one line (Rule.module_problem)
        for m in model.modules():
            rules.rule_for_module(m)
    defaults = forward_defaults(model, n_inputs)
    own_attrs = set(vars(model))
    names = [p.name for p in _forward_parameters(model) or [] if p.kind in _POSITIONAL and p.name not in defaults]
    inputs = dict(zip(names, as_inputs(example))) if example is not None else {}
    branches: list[str] = []
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        grad_reads: list[str] = []
        written: list[str] = []
        export_reads: list[str] = []
        tracer, eval_graph = _trace_once(model, leaf_types, rules, defaults=defaults, grad_reads=grad_reads,
                                         written=written, example=inputs, export_reads=export_reads)
        branches += tracer.size_branches
        # Eval mode is inference (evaluation, export): a forward that reads torch.is_grad_enabled()
        # gets the eval graph of what it does under torch.no_grad(); training runs with gradients.
        reads_grad = False
        if grad_reads:
            try:
                no_grad_tracer, no_grad_graph = _trace_once(model, leaf_types, rules, "eval mode under torch.no_grad()",
                                                            defaults, grad_enabled=False, example=inputs)
                _share_constants(model, eval_graph, no_grad_graph)
                reads_grad = _program(no_grad_graph) != _program(eval_graph)
            except TraceError:
                pass  # it traces with gradients only: keep that graph
        if reads_grad:
            tracer, eval_graph = no_grad_tracer, no_grad_graph
        model.train()
        held = [n for n, m in model.named_modules() if n and not m.training]  # what the model's train() holds
        before = _random_states()
        train_tracer, train_graph = _trace_once(model, leaf_types, rules, "training", defaults, written=written,
                                                example=inputs)
        branches += train_tracer.size_branches
        draws_in_training = _random_states() != before
    finally:
        for m, training in modes.items():
            m.training = training
    name = type(model).__name__
    _share_constants(model, eval_graph, train_graph)
    same = _program(eval_graph) == _program(train_graph)
    # held modules the graphs use (a GraphModule keeps only the modules its nodes name)
    targets = {n.target for g in (eval_graph, train_graph) for n in g.nodes if n.op in ("call_module", "get_attr")}
    held = [h for h in held if any(t == h or t.startswith(h + ".") for t in targets)]
    if same and not held:
        gm = fx.GraphModule(tracer.root, eval_graph, name)
    else:
        gm = ModeGraphModule(tracer.root, eval_graph, name, train_graph=None if same else train_graph,
                             held_eval=held)
    gm.train(model.training)
    _note_layer_subclasses(model, (eval_graph, train_graph))
    for key in set(vars(model)) - own_attrs:  # the constants fx stowed on the user's model: the GraphModule has them
        if _TRACER_CONSTANT.fullmatch(key):
            delattr(model, key)
    gm.meta["reads_grad_mode"] = reads_grad  # see grad_mode_note
    gm.meta["draws_in_training"] = draws_in_training  # see training_draws_note
    gm.meta["state_written"] = sorted(set(written))  # see state_written_note
    gm.meta["size_branches"] = list(dict.fromkeys(branches))  # see size_branches_note
    gm.meta["reads_onnx_export"] = bool(export_reads)  # see onnx_export_note
    gm.meta["example_shapes"] = [tuple(x.shape) for x in inputs.values()]
    return gm


def _note_layer_subclasses(model: nn.Module, graphs: Iterable[fx.Graph]) -> None:
    """Mark each tensor read (get_attr) whose module subclasses a built-in layer with a forward of
    its own (a "same"-padding Conv2d calling F.conv2d on its weight, traced through) with that
    type's name and the leaf rule that would keep it whole: ``meta["layer_subclass"]``, read by
    ``passes.outside.functional_layers`` to advise ``--leaf TYPE --rule TYPE=RULE``."""
    from .rules import known_base, leaf_rule_name

    for graph in graphs:
        for n in graph.nodes:
            if n.op != "get_attr" or "." not in n.target:
                continue
            try:
                owner = model.get_submodule(n.target.rpartition(".")[0])
            except AttributeError:
                continue
            base = known_base(type(owner))
            if base is not None:
                n.meta["layer_subclass"] = (type(owner).__name__, leaf_rule_name(base))


def _share_constants(root: nn.Module, graph: fx.Graph, other: fx.Graph) -> None:
    """Point ``other``'s tracer constants at ``graph``'s names where they hold an equal tensor: each
    trace stows the tensors it computes or reads as values under fresh names (``_tensor_constant0`` in one,
    ``_tensor_constant2`` in the next), so two identical programs compared as different (a model
    with no training-mode code was noted as running differently in training)."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
        return a is b

    constants = {n.target: getattr(root, n.target, None) for n in graph.nodes
                 if n.op == "get_attr" and _TRACER_CONSTANT.fullmatch(n.target)}
    for n in other.nodes:
        if n.op == "get_attr" and _TRACER_CONSTANT.fullmatch(n.target) and n.target not in constants:
            value = getattr(root, n.target, None)
            n.target = next((t for t, v in constants.items() if same(v, value)), n.target)


def _random_states() -> tuple[bytes, object, bytes]:
    """torch's, Python's and numpy's global random states, comparable: a forward that draws from one
    of them while it is traced (not as a graph op) changes it."""
    import random

    import numpy as np

    _, keys, pos, *_ = np.random.get_state()
    return torch.get_rng_state().numpy().tobytes(), random.getstate(), keys.tobytes() + bytes(str(pos), "ascii")


def training_draws_note(gm: fx.GraphModule) -> str | None:
    """What tracing did to random numbers the forward draws in training outside the graph
    (``if torch.rand([]) < self.layerdrop:``, ``random.random()``): one draw was fixed, so every
    training step takes the same branch; None when the training trace drew none."""
    if not gm.meta.get("draws_in_training"):
        return None
    return ("the forward draws random numbers in training outside the traced operations (e.g. `if torch.rand([]) < p:` "
            "as in LayerDrop, or random.random()): tracing fixed one draw, so training takes the same branch at every "
            "step; draw a tensor instead (a per-sample mask such as torch.rand(x.shape[0], 1, 1, 1) < p) to train what "
            "the model trains")


def state_written_note(gm: fx.GraphModule) -> str | None:
    """A one-line note naming the state the forward changes where tracing cannot follow: buffers
    written in place as plain tensors and Python attributes (``self.step += 1``, ``self.initialized =
    True``) that the forward updates, often to branch on them (``if self.step > 2:``). The traced model
    neither updates them nor takes the branches they would change; None when there are none."""
    names = gm.meta.get("state_written") or []
    if not names:
        return None
    them = "them" if len(names) > 1 else "it"
    return (f"the forward updates {', '.join(names[:3])}{' and more' if len(names) > 3 else ''} where tracing "
            f"cannot follow: the traced model does not update {them}, and a branch on {them} is fixed as traced "
            f"(the first call's); keep such state in a buffer and compute the branch with torch operations "
            f"(torch.where) to keep it live")


def size_branches_note(gm: fx.GraphModule) -> str | None:
    """A one-line note naming where the forward decides on tensor sizes in Python (``if x.shape[-1] % 8:``,
    ``int(x.shape[2] / 2)``, ``for r in x.unbind(2)``): what the example input's shape gives is
    traced, so inputs of other spatial sizes, and channel counts the depth multiplier changes, get
    the same; None when it does not."""
    where = gm.meta.get("size_branches") or []
    if not where:
        return None
    shapes = gm.meta.get("example_shapes") or []
    shape = "; ".join(str(tuple(s)) for s in shapes) or "the example input's"
    return (f"the forward decides on tensor sizes in Python ({', '.join(where[:3])}{' and more' if len(where) > 3 else ''}): "
            f"what an input of shape {shape} gives (branch, loop count, size read as a number) is traced, so "
            f"other input sizes (and channel counts the depth multiplier changes) get the same")


def onnx_export_note(gm: fx.GraphModule) -> str | None:
    """A one-line note when the forward reads ``torch.onnx.is_in_onnx_export()`` (a deployment-only
    step such as ``return y.softmax(1)``): sparsify's export writes the eval graph, where that reads
    False, so the step is not in the file; None otherwise."""
    if not gm.meta.get("reads_onnx_export"):
        return None
    return ("the forward branches on torch.onnx.is_in_onnx_export(): sparsify's export writes what eval mode "
            "computes, where it is False, so the export-only branch is not in the ONNX file; apply that step "
            "(e.g. a softmax) where the file is used, or compute it in eval mode too")


def grad_mode_note(gm: fx.GraphModule) -> str | None:
    """What a model whose forward reads the grad mode (``torch.is_grad_enabled()``) runs as: its
    eval graph is the one traced without gradients and its training graph the one with them; None
    for other models (or a graph this process did not trace)."""
    if not gm.meta.get("reads_grad_mode"):
        return None
    return ("the forward reads the grad mode (torch.is_grad_enabled()): eval mode and export run what it does "
            "under torch.no_grad(), training what it does with gradients; in eval mode with gradients on the run "
            "still follows the no_grad branch")


def _program(graph: fx.Graph) -> str:
    """The graph's program with node names replaced by their positions (two traces name the same
    constant ``_tensor_constant0`` and ``_tensor_constant2``), comparable between traces."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    def name(t: Any) -> str:
        return t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', repr(t))}"

    steps = [(n.op, name(n.target),
              repr(fx.node.map_arg(n.args, lambda a: f"%{index[a]}")),
              repr(fx.node.map_arg(n.kwargs, lambda a: f"%{index[a]}"))) for n in graph.nodes]
    return repr(steps)


def _op_label(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    target = getattr(n.target, "__name__", str(n.target))
    flags = {k: v for k, v in n.kwargs.items() if k == "training"}
    return target + (f"(training={flags['training']})" if flags else "")


def mode_differences(gm: fx.GraphModule) -> str | None:
    """A one-line description of how the training graph differs from the eval graph (None: same)."""
    if "_train_graph" not in gm.__dict__:
        return None

    def ops(graph: fx.Graph) -> list[str]:
        return [_op_label(n) for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")
                and n.target is not stop_gradient]

    ev, tr = ops(gm.graph), ops(gm.train_graph)
    only_train = [o for o in dict.fromkeys(tr) if tr.count(o) > ev.count(o)]
    only_eval = [o for o in dict.fromkeys(ev) if ev.count(o) > tr.count(o)]
    outs = [len(n.args[0]) if isinstance(n.args[0], (tuple, list, dict)) else 1
            for g in (gm.graph, gm.train_graph) for n in g.nodes if n.op == "output"]

    def short(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    parts = []
    if only_train:
        parts.append(f"training only: {short(only_train)}")
    if only_eval:
        parts.append(f"eval only: {short(only_eval)}")
    if outs[0] != outs[1]:
        parts.append(f"{outs[1]} outputs in training, {outs[0]} in eval")
    return ("the model runs differently in training (" + "; ".join(parts or ["other arguments"])
            + "): training uses its training-mode graph, eval() and export its eval-mode graph")


def dropped_train_overrides(model: nn.Module, gm: fx.GraphModule) -> str | None:
    """A one-line note when ``model`` or a module traced through (not kept in ``gm``) overrides
    ``train()`` (mmdetection's ``norm_eval`` keeps BatchNorm in eval mode while training): the graph
    module's ``train()`` is nn.Module's, so that behaviour is gone; None when nothing is lost."""
    kept = {id(m) for m in gm.modules()}
    lost = sorted({type(m).__name__ for m in model.modules()
                   if id(m) not in kept and getattr(type(m), "train", None) is not nn.Module.train})
    if not lost:
        return None
    verb = "overrides" if len(lost) == 1 else "override"
    held = getattr(gm, "held_eval", ())
    stay = "stays" if len(held) == 1 else "stay"
    kept_text = (f"the {len(held)} module{'s' if len(held) != 1 else ''} it leaves in eval mode ({', '.join(held[:4])}"
                 f"{', ...' if len(held) > 4 else ''}) {stay} in eval mode while training; anything else it does "
                 "is not applied" if held else "the modes it sets are not applied")
    return (f"{', '.join(lost[:3])}{' and more' if len(lost) > 3 else ''} {verb} train(), which the traced "
            f"model does not run: {kept_text} by `sparsify train`; a submodule doing so can be "
            "kept whole with --leaf")


def materialize_lazy(model: nn.Module, example: Any, seed: int) -> bool:
    """Give ``nn.LazyConv2d`` / ``nn.LazyLinear`` & co their shapes: one eval-mode forward on
    ``example`` (a tensor or a tuple of tensors), their initial weights drawn from ``seed`` (what
    a user's own first forward does). True when there was something to materialize.

    Raises TraceError naming the model's source line when that forward fails."""

    if not any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())):
        return False
    inputs = example if isinstance(example, tuple) else (example,)
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        torch.manual_seed(seed)
        try:
            model(*inputs)
        except Exception as e:
            where = user_source_line(e)
            msg = str(e).splitlines()[0] if str(e) else ""
            raise TraceError(f"the model's lazy layers could not take their shapes: it fails on an input of shape "
                             f"{shape_text(example)}" + (f" ({where})" if where else "")
                             + f": {type(e).__name__}: {msg}; fix the model or give the right shape with "
                             + shape_form(inputs)) from None
    return True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without gradients, restoring every submodule's mode afterwards.

    Analysis forwards must not touch BatchNorm running statistics: a pass never edits its input.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes.items():
            m.training = training


class _NodeFailure(Exception):
    """A node raised while shapes were propagated."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(str(error))
        self.node, self.error = node, error


class Interpreter(fx.Interpreter):
    """fx.Interpreter that gives a ``**kwargs`` placeholder an empty dict: fx gives it the leftover
    positional arguments as a list, so ``forward(self, x, **kw)`` reading ``kw.get("scale", 2.0)``
    failed ("'list' object has no attribute 'get'")."""

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(target, str) and target.startswith("**"):
            return {}
        return super().placeholder(target, args, kwargs)


class _ShapeRecorder(Interpreter):
    """Runs the graph and records ``tensor_meta`` on each node (torch's ShapeProp prints tracebacks)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - wrapped with the node that failed
            raise _NodeFailure(n, e) from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        m = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = m
        return result


def as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """The model's example inputs as a tuple (one tensor, or a tuple/list of them)."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def shape_text(example: Any) -> str:
    """``(1, 3, 32, 32)``, or ``(1, 3, 32, 32); (1, 3, 32, 32)`` for several inputs."""
    return "; ".join(str(tuple(x.shape)) for x in as_inputs(example))


def propagate_shapes(gm: fx.GraphModule, example: Any, rewritten: bool = False) -> Any:
    """Record ``tensor_meta`` (shape, dtype) on every node for inputs like ``example`` (a tensor,
    or a tuple with one tensor per model input); both graphs of a ModeGraphModule.

    Runs under FakeTensorMode, which computes shapes without doing the arithmetic (a ResNet-50
    takes ~0.3 s instead of a real forward); falls back to a real forward for ops that have no
    fake implementation. A failing node becomes a TraceError that names it, with a hint to give the
    right input shape unless ``rewritten``: a pass's rewrite of a graph that ran on these inputs,
    whose failure the input shape cannot have caused. Returns the eval graph's output.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = as_inputs(example)
    result = None
    with eval_mode(gm), _quiet("torch._subclasses.fake_tensor"):
        for graph in reversed(graphs(gm)):
            try:
                try:
                    mode = FakeTensorMode(allow_non_fake_inputs=True)
                    with mode:
                        result = _ShapeRecorder(gm, graph=graph).run(*(mode.from_tensor(x) for x in inputs))
                except _NodeFailure as f:
                    if not _fake_unsupported(f.error):
                        raise
                    result = _ShapeRecorder(gm, graph=graph).run(*inputs)
            except _NodeFailure as f:
                where = user_source_line(f.node)
                msg = str(f.error).splitlines()[0] if str(f.error) else type(f.error).__name__
                mode_text = " in training mode" if graph is not gm.graph else ""
                n_in = sum(1 for n in graph.nodes if n.op == "placeholder")
                count = f.node.meta.get("iterated_split")
                if count is not None and isinstance(f.error, IndexError):
                    raise TraceError(f"the model iterates over a split of {count} pieces" + (f" at {where}" if where else "")
                                     + f" that gives fewer for an input of shape {shape_text(example)} (chunk gives "
                                     "fewer when the size does not divide evenly); split with explicit sizes "
                                     "(x.split([a, b], dim)) or unpack a fixed number of pieces") from None
                key = f.node.args[1] if f.node.target is operator.getitem and len(f.node.args) > 1 else None
                if isinstance(key, str) and getattr(f.node.args[0], "op", "") == "placeholder":
                    raise TraceError(
                        f"the model reads its input {f.node.args[0].name}[{key!r}]" + (f" at {where}" if where else "")
                        + ": a dict input, but sparsify feeds tensors; wrap the model so that forward takes the "
                        f"tensors ({key}, ...) and builds the dict") from None
                hint = ("" if rewritten or (n_in == len(inputs) and not _may_be_shape_error(f.error))
                        else f"; give the right shape with {shape_form(inputs, _conv_rank(gm, f.node))}" if n_in == len(inputs)
                        else f"; the model takes {n_in} inputs but {len(inputs)} shape(s) were given; give one shape "
                        "per input, e.g. --input-shape \"1,3,32,32;1,3,32,32\" or INPUT_SHAPES in the model file")
                raise TraceError(
                    f"the model fails{mode_text} on an input of shape {shape_text(example)} at {f.node.name}"
                    + (f" ({where})" if where else "") + f": {type(f.error).__name__}: {msg}{hint}"
                ) from None
    return result


# Axis names of an input shape by rank (as --input-shape takes it).
_AXES = {1: "N", 2: "N,F", 3: "N,C,L", 4: "N,C,H,W", 5: "N,C,D,H,W"}


def shape_form(inputs: Sequence[torch.Tensor], rank: int | None = None) -> str:
    """``--input-shape N,C,H,W`` in the form of the inputs given: their ranks' axis names, one per
    input joined by ';' for a model with several; ``rank``: the rank a single input should have
    (N,C,L where a Conv1d failed on it)."""
    ranks = [rank] if rank is not None and len(inputs) == 1 else [x.dim() for x in inputs]
    forms = [_AXES.get(r, ",".join(["N"] + [f"D{i}" for i in range(1, r)])) for r in ranks]
    return f'--input-shape "{";".join(forms)}"' if len(forms) > 1 else f"--input-shape {forms[0]}"


def _conv_rank(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The input rank a conv module takes (3 for Conv1d): the one that failed, else the graph's first
    conv when no reshape comes before it (a Conv1d model fed [N, F] fails at its BatchNorm first);
    None otherwise."""
    for n in [node] + list(gm.graph.nodes):
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.modules.conv._ConvNd):
            return 2 + len(m.kernel_size)
        if n is not node and (str(getattr(n.target, "__name__", n.target)) in _RESHAPES
                              or isinstance(m, (nn.Flatten, nn.Unflatten))):
            return None  # the model makes its conv input itself (an MLP front viewed as an image)
    return None


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "permute", "transpose"}


def _may_be_shape_error(e: BaseException) -> bool:
    """Whether another input shape could cure ``e``: not a TypeError, AttributeError or NameError
    (``x.clip(0.0, tensor)``, a missing attribute), which fail on every shape."""
    return not isinstance(e, (TypeError, AttributeError, NameError))


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a torch logger that prints tracebacks for errors we report ourselves."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _fake_unsupported(error: BaseException) -> bool:
    """True for errors that mean "fake tensors cannot run this op", not "the model is wrong"."""
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(getattr(ft, k) for k in ("UnsupportedOperatorException", "DynamicOutputShapeException",
                                             "DataDependentOutputException", "UnsupportedFakeTensorException")
                  if hasattr(ft, k))
    return isinstance(error, kinds) or "data-dependent" in str(error).lower()


def has_shapes(gm: fx.GraphModule) -> bool:
    """True when every computing node already carries a recorded shape (from ``propagate_shapes``)."""
    return all("tensor_meta" in n.meta for g in graphs(gm) for n in g.nodes if n.op not in ("output",))


def ensure_shapes(gm: fx.GraphModule, example: Any) -> None:
    """Propagate shapes only when some node has none: a forward of a large model is the costly step."""
    if not has_shapes(gm):
        propagate_shapes(gm, example)


def output_shapes(gm: fx.GraphModule, graph: fx.Graph | None = None) -> object:
    """The recorded shapes of a graph's outputs (a tuple, or nested tuples for several outputs)."""
    out = next(n for n in reversed((graph or gm.graph).nodes) if n.op == "output")
    return fx.node.map_arg(out.args[0], lambda a: node_shape(a))


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` when it is a single tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
