"""Buffers and in-place updates survive tracing: a buffer read in forward stays a live graph value
(not a constant taken while tracing), tracing leaves the user's buffers as they were, a buffer the
forward updates (in place or by rebinding) is updated by the traced model as by the model, and
``x += y`` updates the tensor every alias of ``x`` holds."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsify.passes.trace import trace, traced_constants


class RunNorm(nn.Module):
    """A hand-written BatchNorm: running statistics in buffers, updated under no_grad in training."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            m, v = x.mean((0, 2, 3)), x.var((0, 2, 3))
            with torch.no_grad():
                self.mean.lerp_(m, 0.1)
                self.var.mul_(0.9).add_(0.1 * v)
                self.count += 1
            return (x - m[None, :, None, None]) / (v[None, :, None, None] + 1e-5).sqrt()
        return (x - self.mean[None, :, None, None]) / (self.var[None, :, None, None] + 1e-5).sqrt()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = RunNorm(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


class Alias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        skip = x
        x += self.c1(x)  # eager: skip sees the update too
        n = x.shape[1]
        n += 0           # a number stays a number
        return self.fc(torch.cat([x, skip[:, :n]], 1).mean((2, 3)))


@torch.no_grad()
def test_an_augmented_assignment_updates_every_alias():
    torch.manual_seed(0)
    model = Alias().eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(trace(model)(x), model(x))


class ViewWrites(nn.Module):
    """Augmented assignments into views: they write into the tensor viewed."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.c, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if self.form == "slice":
            v = x[:, :8]
            v += self.b(x)
        elif self.form == "chunk":
            v, _ = x.chunk(2, 1)
            v *= torch.sigmoid(self.b(x))
        elif self.form == "transpose":
            v = x.transpose(2, 3)
            v -= 0.5
        elif self.form == "item":  # x[:, :8] += y: Python's getitem, iadd, setitem
            x[:, :8] += self.b(x)
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


@torch.no_grad()
@pytest.mark.parametrize("form", ["slice", "chunk", "transpose", "item"])
def test_an_augmented_assignment_into_a_view_writes_into_the_viewed_tensor(form):
    # v = x[:, :8]; v += y ran out of place in the graph: the write into x was lost (0.017 off).
    torch.manual_seed(0)
    model = ViewWrites(form).eval()
    x = torch.randn(2, 3, 8, 8) * 2
    ref = model(x)
    torch.testing.assert_close(trace(model)(x), ref)
    model.form = "none"
    assert (model(x) - ref).abs().max() > 1e-3  # the write changes the output


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_buffers_stay_live_and_are_updated_as_the_model_updates_them():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.norm.mean.uniform_(-1, 1)
        model.norm.var.uniform_(0.5, 2)
    before = _state(model)
    gm = trace(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "tracing changed the model"
    assert traced_constants(gm) is None
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_gm = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(3):  # training steps update the statistics, the eval graph must read them
        for net, opt in ((ref.train(), opt_ref), (gm.train(), opt_gm)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for name in ("mean", "var", "count"):
        torch.testing.assert_close(getattr(gm.norm, name), getattr(ref.norm, name))
    assert int(gm.norm.count) == 3 and not gm.norm.var.requires_grad
    with torch.no_grad():
        out_ref, out_gm = ref.eval()(x), gm.eval()(x)
    assert out_ref.std() > 1e-3
    torch.testing.assert_close(out_gm, out_ref)


class Initialised(nn.Module):
    """A buffer in Python control flow (data-dependent initialisation, ActNorm style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("ready", torch.tensor(True))
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        if not self.ready:
            raise RuntimeError("not initialised")
        return self.conv(x) * (self.scale + 1)


def test_a_buffer_in_control_flow_is_read_as_it_is_and_the_constants_are_noted():
    model = Initialised().eval()
    gm = trace(model)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    note = traced_constants(gm)
    assert note is not None and "training does not update them" in note


class NoAlias(nn.Module):
    """Augmented assignments nothing else reads: on the model's input, and after a relu autograd saved."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x *= 2.0
        y = torch.relu(self.c0(x))
        y += 1.0
        return self.fc(y.mean((2, 3)))


def test_an_augmented_assignment_no_alias_sees_runs_out_of_place():
    torch.manual_seed(0)
    gm = trace(NoAlias().train())
    x = torch.randn(2, 3, 8, 8)
    before = x.clone()
    gm(x).sum().backward()  # in place, autograd would refuse: relu saved the tensor += wrote into
    assert torch.equal(x, before), "the traced model wrote into its input"
    assert gm.c0.weight.grad is not None


class ItemAssign(nn.Module):
    """``x[idx] = y`` on activations (a conv's output into half the channels, a boolean-mask clamp)
    and on a buffer under no_grad (a running maximum per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.part = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("peak", torch.zeros(8))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.part(x)
        x = x.clone()
        x[:, :4] = y
        x[x > 1.5] = 1.5
        with torch.no_grad():
            self.peak[:] = torch.maximum(self.peak, x.amax((0, 2, 3)))
        return self.fc(x.mean((2, 3)))


def test_item_assignment_traces_and_trains_as_the_model_does():
    """fx's Proxy has no ``__setitem__``: ``x[:, :4] = y`` failed to trace. It is traced in place:
    outputs, gradients and the no_grad buffer update equal the eager model's."""
    torch.manual_seed(0)
    model = ItemAssign()
    twin = copy.deepcopy(model)
    traced = trace(twin)
    x = torch.randn(4, 3, 8, 8) * 2
    out, ref = traced(x), model(x)
    torch.testing.assert_close(out, ref)
    assert float((x > 0).float().mean()) > 0.2 and float(ref.std()) > 1e-3  # activations are not trivial
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), traced.parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert float(model.peak.min()) > 0
    torch.testing.assert_close(traced.get_buffer("peak"), model.peak)


class Reset(nn.Module):
    """A buffer rebound each call to a tensor computed without the input (a reset), then read."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.register_buffer("scale", torch.randn(8))

    def forward(self, x):
        self.scale = torch.full((8,), 0.5)
        return self.c(x) * self.scale.view(1, -1, 1, 1)


@torch.no_grad()
def test_a_buffer_rebound_to_a_constant_is_read_with_the_new_value():
    # The rebinding was undone after tracing and the graph read the old buffer (4.4 off the model).
    torch.manual_seed(0)
    model = Reset().eval()
    x = torch.randn(2, 3, 8, 8) * 2
    gm = trace(copy.deepcopy(model))
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(x), model(x))  # and on later calls


class CountedBranch(nn.Module):
    """A call counter read in Python control flow: tracing reads buffers as plain tensors then."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        x = torch.relu(self.c(x))
        self.count += 1
        if self.count > 2:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_a_buffer_written_where_tracing_cannot_follow_is_put_back_and_noted():
    # tracing counted the user's buffer up (0 -> 2 after trace, 4 after transform), silently, and the
    # graph neither updates it nor takes the branch it would change
    import sparsify
    from sparsify.passes.trace import state_written_note

    model = CountedBranch().eval()
    gm = trace(model)
    assert float(model.count) == 0.0
    assert gm.meta["state_written"] == ["buffer count"] and "buffer count" in state_written_note(gm)
    result = sparsify.transform(model, "sparse-random", density=1.0, input_shape=(1, 3, 8, 8))
    assert float(model.count) == 0.0
    assert any("updates buffer count where tracing cannot follow" in n for n in result.summary["notes"])
    assert state_written_note(trace(Net())) is None


class StepCounter(nn.Module):
    """Plain Python state the forward changes: a step counter it branches on, a history list and a
    tensor attribute (not a buffer) counted up in place; and an activation it caches (a traced value)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.step, self.history, self.calls = 0, [], torch.zeros(())

    def forward(self, x):
        self.step += 1
        self.history.append(self.step)
        self.calls += 1
        x = torch.relu(self.c(x))
        self.last_features = x  # a traced value: put back without a note
        if self.step > 2:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_python_state_the_forward_changes_is_put_back_and_noted():
    # tracing ran the forward three times (eval, training, shapes): the user's model came back with
    # step 2 and its history filled, and the graph baked in the step-1 branch with no word
    import sparsify
    from sparsify.passes.trace import state_written_note

    model = StepCounter().eval()
    gm = trace(model)
    assert (model.step, model.history, float(model.calls)) == (0, [], 0.0)
    assert not hasattr(model, "last_features")
    assert gm.meta["state_written"] == ["attribute calls", "attribute history", "attribute step"]
    result = sparsify.transform(model, "sparse-random", density=1.0, input_shape=(1, 3, 8, 8))
    assert (model.step, model.history, float(model.calls)) == (0, [], 0.0)
    note = [n for n in result.summary["notes"] if "where tracing cannot follow" in n]
    assert len(note) == 1 and "attribute step" in note[0] and "fixed as traced" in note[0], result.summary["notes"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(result.model.eval()(x), model(x))  # the first call's branch, as traced


def test_no_zoo_model_is_noted_for_state_it_changes():
    from sparsify import zoo
    from sparsify.passes.trace import state_written_note

    for name in zoo.names():  # the ImageNet ones included (stochastic depth, SE)
        assert state_written_note(trace(zoo.get(name).build().eval())) is None, name


class _Meter:
    def __init__(self) -> None:
        self.n = 0


class NestedState(nn.Module):
    """State below the first attribute level: an object's counter, a dict of lists, a deque, a tensor in a list."""

    def __init__(self) -> None:
        super().__init__()
        import collections

        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.meter, self.stats, self.recent = _Meter(), {"hist": []}, collections.deque(maxlen=4)
        self.totals = [torch.zeros(2)]

    def forward(self, x):
        self.meter.n += 1
        self.stats["hist"].append(self.meter.n)
        self.recent.append(1)
        self.totals[0] += 1
        if self.meter.n > 1:
            x = x * 2
        return self.c(x)


def test_nested_python_state_is_put_back_and_noted():
    # only top-level attributes were restored: meter.n came back 2, the lists filled, and the
    # training trace saw the eval trace's count ("runs differently in training (training only: mul)")
    from sparsify.passes.trace import mode_differences, state_written_note

    model = NestedState().eval()
    gm = trace(model)
    assert (model.meter.n, model.stats, list(model.recent), model.totals[0].tolist()) == (0, {"hist": []}, [], [0.0, 0.0])
    assert mode_differences(gm) is None
    note = state_written_note(gm)
    assert all(f"attribute {a}" in note for a in ("meter", "stats", "recent")), note


class _Config:
    def __init__(self) -> None:
        self.width, self.blocks = 8, [nn.Identity()]


def test_attributes_the_forward_only_reads_are_not_noted():
    # a function, a lambda and a config object holding a module were noted as state the forward updates
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.act, self.cfg, self.names = nn.Conv2d(3, 8, 3), nn.functional.relu, _Config(), ["a"]
            self.scale = lambda x: x * 2

        def forward(self, x):
            return self.scale(self.act(self.c(x))) * self.cfg.width

    assert trace(Reads()).meta["state_written"] == []


def test_item_assignment_freezes_its_channels_and_says_so():
    # the channels x[:, :4] = y writes keep their count: the reason read "unknown op setitem", while
    # item assignment is understood (traced in place, above)
    from sparsify.passes.channel_graph import ChannelGraph

    gm = trace(ItemAssign())
    cg = ChannelGraph.build(gm, torch.randn(1, 3, 8, 8))
    frozen = {g.size: g.reasons for g in cg.channel_groups() if g.frozen and g.producers}
    for size in (8, 4):  # stem's channels (written into) and part's (written)
        assert any(r.startswith("item assignment at setitem (test_buffers_in_place.py:") and "keep their count" in r
                   for r in frozen[size]), frozen
    assert not any("unknown op" in r for reasons in frozen.values() for r in reasons)
