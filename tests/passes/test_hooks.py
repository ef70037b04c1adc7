"""Modules that compute more than their type's forward (hooks, parametrized weights) stay whole:
a sparse or resized copy would drop what the hooks / parametrizations do (a user found a forward
hook dropped, 6% off the original at density 1, and weight norm resized to NaN outputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch.nn.utils import parametrizations

from sparsify.errors import TraceError
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.rules import DEFAULT_RULES
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import trace
from sparsify.report import layer_report


def _clip(module, inputs, output):
    return output.clamp(max=0.05)


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 4)
        if kind == "forward-hook":
            self.c2.register_forward_hook(_clip)
        elif kind == "spectral-norm":
            self.c2 = parametrizations.spectral_norm(self.c2)
        elif kind == "weight-norm":
            self.c2 = parametrizations.weight_norm(self.c2)
        elif kind == "old-weight-norm":
            self.c2 = torch.nn.utils.weight_norm(self.c2)
        elif kind == "prune":
            prune.l1_unstructured(self.c2, "weight", amount=0.5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


KINDS = ["forward-hook", "spectral-norm", "weight-norm", "old-weight-norm", "prune"]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()  # the older weight norm / pruning leave a computed weight that cannot be deep-copied after a
def test_hooked_or_parametrized_layer_stays_whole(kind):  # forward with gradients (torch's limit, not ours)
    torch.manual_seed(0)
    model = Net(kind).eval()
    x = torch.randn(2, 3, 12, 12)
    gm = trace(model)
    res = SparseRandomPass(1.0, rescale_init=False)(gm, x)
    assert type(res.model.c2) is type(model.c2), "the module is kept as it is, hooks and all"
    assert any(n.startswith("c2: kept dense and frozen because") for n in res.notes), res.notes
    torch.testing.assert_close(res.model.eval()(x), model(x))
    sparse = SparseRandomPass(0.5)(gm, x).model
    assert type(sparse.c1).__name__ == "SparseConv2d" and type(sparse.c2) is type(model.c2)
    dm = DepthMultiplierPass(0.5)(trace(Net(kind)), x).model
    assert dm.c2.out_channels == dm.c2.in_channels == 16  # its channels are frozen
    assert torch.isfinite(dm.eval()(x)).all()
    layer_report(sparse, [tuple(x.shape)], DEFAULT_RULES)  # reports it (an old weight norm crashed this)


class PrunedHead(Net):
    def __init__(self, every_layer: bool = False):
        super().__init__("none")
        for m in [self.fc] + ([self.c1, self.c2, self.c3] if every_layer else []):
            prune.l1_unstructured(m, "weight", amount=0.5)


@torch.no_grad()
def test_a_pruned_classifier_is_the_classifier_and_frozen_groups_say_why():
    """The last layer with weights is the classifier even when it is kept whole for its hooks (the conv
    before it was called the classifier and kept dense); groups frozen by a hooked layer name it."""
    from sparsify.errors import PassError
    from sparsify.passes.channel_graph import ChannelGraph

    torch.manual_seed(0)
    model, x = PrunedHead().eval(), torch.randn(2, 3, 12, 12)
    res = SparseRandomPass(0.25)(trace(model), x)
    assert set(res.layers) == {"c1", "c2", "c3"}, res.notes
    assert not any("classifier kept dense" in n for n in res.notes), res.notes
    cg = ChannelGraph.build(trace(model), x)
    reasons = [r for g in cg.groups.values() if g.frozen for r in g.reasons]
    assert any("fc kept whole because it has forward pre hooks" in r for r in reasons), reasons
    with pytest.raises(PassError, match=r"c1: kept dense and frozen because it has forward pre hooks.*3 more"):
        SparseRandomPass(0.25)(trace(PrunedHead(every_layer=True).eval()), x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.gate = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x)) * self.gate
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def _hooked_root(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = Gated()
    if kind == "forward-hook":
        model.register_forward_hook(lambda m, args, out: out * 2 + 1)
    elif kind == "pre-hook-with-kwargs":
        model.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 0.5,), kwargs), with_kwargs=True)
    elif kind == "prune":  # the model's own parameter: its pre-hook recomputes model.gate
        prune.l1_unstructured(model, "gate", amount=0.5)
    return model


@pytest.mark.parametrize("kind", ["forward-hook", "pre-hook-with-kwargs", "prune"])
def test_hooks_on_the_model_itself_are_traced(kind):
    """fx traces ``type(model).forward``: hooks on the model itself were dropped (output 1.2 off at
    scale 1.4 with a forward hook, silently), and pruning its own parameter crashed the transform."""
    model = _hooked_root(kind)
    before = dict(vars(model))
    x = torch.randn(4, 3, 8, 8) * 2
    gm = trace(model)
    assert vars(model).keys() == before.keys() and all(vars(model)[k] is v for k, v in before.items())
    ref, out = model(x), gm(x)
    torch.testing.assert_close(out, ref)
    assert float(ref.std()) > 1e-3
    out.sum().backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    assert grads["gate_orig" if kind == "prune" else "gate"] is not None
    res = SparseRandomPass(1.0, rescale_init=False)(gm, x)
    with torch.no_grad():
        torch.testing.assert_close(res.model.eval()(x), model.eval()(x))


def _scale_convs(module, inputs, output):
    return output * 1.4 if isinstance(module, nn.Conv2d) else None


def _shift_inputs(module, inputs):
    return tuple(i + 1 for i in inputs) if isinstance(module, nn.Conv2d) else None


@pytest.mark.parametrize("register", [torch.nn.modules.module.register_module_forward_hook,
                                      torch.nn.modules.module.register_module_forward_pre_hook])
def test_global_module_hooks_are_refused_by_name(register, global_hooks_restored):
    # A global hook runs around every module call in the process; the traced graph, the ONNX export
    # and a later ``sparsify.load`` ran without it (0.56 off the hooked original at density 1).
    model = Net("none").eval()
    x = torch.randn(2, 3, 8, 8) * 2
    plain = model(x)
    handle = register(_scale_convs if "pre" not in register.__name__ else _shift_inputs)
    assert not torch.allclose(model(x), plain)  # the hook changes what the model computes
    with pytest.raises(TraceError, match=rf"{register.__name__}\(_(scale_convs|shift_inputs)\) \(test_hooks.py:\d+\)"):
        trace(model)
    handle.remove()
    assert torch.allclose(trace(model)(x), plain)  # without the hook the model traces as before
