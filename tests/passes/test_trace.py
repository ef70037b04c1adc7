"""sparsify.passes.trace: tracing with leaves, shape recording, and models that run differently in training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsify.errors import TraceError
from sparsify.passes.trace import graphs, mode_differences, node_shape, propagate_shapes, trace

from size_branch_models import BatchNumbers, BatchThreshold, Branch, InPlaceShape, SizeBranches, SizesAsNumbers  # tests/passes is on sys.path (rootdir-less test module)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Block()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        if self.training:
            x = x * 2
        return self.fc(self.drop(x.mean((2, 3))))


def test_traced_graph_computes_the_model_and_records_every_shape():
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model)
    propagate_shapes(gm, x)
    assert torch.allclose(gm.eval()(x), model(x))
    shapes = {n.target: node_shape(n) for n in gm.graph.nodes if n.op == "call_module"}
    assert shapes["stem"] == (2, 4, 8, 8) and shapes["fc"] == (2, 2)


def test_a_leaf_type_stays_one_call():
    gm = trace(Net().eval(), leaf_types=["Block"])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "block" in targets and "block.conv" not in targets
    assert "block.conv" in [n.target for n in trace(Net().eval()).graph.nodes if n.op == "call_module"]


def test_a_model_that_runs_differently_in_training_keeps_both_graphs():
    gm = trace(Net())
    assert len(graphs(gm)) == 2
    assert mode_differences(gm)             # a note names what differs
    x = torch.randn(2, 3, 16, 16)
    model = Net()
    model.load_state_dict(gm.state_dict())
    gm.eval(), model.eval()
    assert torch.allclose(gm(x), model(x))
    assert mode_differences(trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))) is None


def test_untraceable_code_is_one_line_naming_the_user_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:                  # data-dependent control flow
                return x
            return -x

    with pytest.raises(TraceError) as e:
        trace(Branchy())
    assert "\n" not in str(e.value).strip() and "Branchy" in str(e.value)


class BuiltInForward(nn.Module):
    """Modules without state built in forward, as users write them: nn.ReLU()(x), nn.Flatten()(x),
    a container of them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        x = nn.ReLU()(self.c1(x))
        x = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Hardswish())(x)
        return self.fc(nn.Flatten()(x))


def test_a_module_without_state_built_in_forward_is_traced_through():
    # fx refused them ("module is not installed as a submodule"): a common way to write an activation
    import sparsify

    torch.manual_seed(0)
    model, x = BuiltInForward().eval(), torch.randn(2, 3, 12, 12) * 2
    gm = trace(model)
    torch.testing.assert_close(gm(x), model(x))
    assert not any(n.op == "call_module" and n.target not in ("c1", "fc") for n in gm.graph.nodes)
    res = sparsify.transform(model, "depth-multiplier", alpha=0.5, input_shape=(1, 3, 12, 12))
    assert res.model.c1.out_channels == 8 and res.model.fc.in_features == 8 * 4 * 4  # the flatten is followed


def test_a_module_with_weights_built_in_forward_is_one_line_saying_to_build_it_in_init():
    class FreshConv(nn.Module):
        def forward(self, x):
            return nn.Conv2d(3, 4, 3)(x)  # new random weights on every call

    with pytest.raises(TraceError) as e:
        trace(FreshConv())
    msg = str(e.value)
    assert "\n" not in msg.strip() and "Conv2d is created inside forward" in msg and "__init__" in msg, msg
    assert "test_trace.py:" in msg


class IteratedSplits(nn.Module):
    """Splits iterated as users write them: a loop over chunk, list(tensor_split), a comprehension
    over split with sizes, sum() of a generator."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        a = [t * (i + 1) for i, t in enumerate(torch.split(h, [4, 4, 8], 1))]
        b = list(h.tensor_split([4, 12], dim=1))
        c = sum(t.mean(1, keepdim=True) for t in torch.chunk(h, 2, 1))
        for t in h.chunk(4, 1):
            c = c + t[:, :1]
        return self.c2(torch.cat([a[1], b[0]], 1) + c)


def test_a_split_whose_call_gives_its_pieces_can_be_iterated():
    # fx iterates a Proxy only when unpacked: these failed ("Proxy object cannot be iterated")
    torch.manual_seed(0)
    model, x = IteratedSplits().eval(), torch.randn(2, 3, 10, 10) * 2
    gm = trace(model)
    torch.testing.assert_close(gm(x), model(x))


def test_a_chunk_that_gives_fewer_pieces_than_asked_says_so():
    class Uneven(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return sum(t.mean(1) for t in self.c(x).chunk(4, 1))  # 6 channels: 3 chunks of 2

    with pytest.raises(TraceError) as e:
        propagate_shapes(trace(Uneven()), torch.randn(1, 3, 4, 4))
    msg = str(e.value)
    assert "split of 4 pieces" in msg and "test_trace.py:" in msg and "explicit sizes" in msg and "\n" not in msg


@pytest.mark.parametrize("size", [15, 16])
def test_branches_on_sizes_are_decided_on_the_example_input_and_noted(size):
    # fx refused every one ("symbolically traced variables cannot be used as inputs to control flow")
    from sparsify.passes.trace import size_branches_note

    torch.manual_seed(0)
    model = SizeBranches()
    x = torch.randn(2, 3, size, size) * 2
    gm = trace(model, n_inputs=1, example=x[:1])
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(gm, mode)()
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(gm(x), want)  # batch 2 where the example had 1: the batch stays free
    assert float(model.bn.num_batches_tracked) == 2  # only the two calls above: tracing ran none
    note = size_branches_note(gm)
    assert "size_branch_models.py:" in note and f"(1, 3, {size}, {size})" in note and "other input sizes" in note
    assert len(gm.meta["size_branches"]) == 2  # the if statements; the assert is not a branch
    assert size_branches_note(trace(Net(), example=torch.randn(1, 3, 8, 8))) is None


@pytest.mark.parametrize("case", ["batch", "values", "assert"])
def test_what_cannot_be_decided_on_the_example_is_one_line(case):
    with pytest.raises(TraceError) as e:
        trace(Branch(case), n_inputs=1, example=torch.randn(1, 3, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg and "size_branch_models.py:" in msg
    assert {"batch": "branches on the batch size", "values": "tensor values",
            "assert": "an assert in forward fails for the example input of shape (1, 3, 8, 8)"}[case] in msg, msg


def test_a_shape_changed_in_place_before_the_branch_is_decided_on_its_new_shape():
    # y.unsqueeze_(-1) is no ancestor of `y.dim()`: the branch was decided on the old shape (67 off)
    torch.manual_seed(0)
    model, x = InPlaceShape().eval(), torch.randn(2, 3, 8, 8)
    gm = trace(model, n_inputs=1, example=x[:1])
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("how", ["gt2", "numel", "min"])
def test_branches_on_batch_sizes_beyond_two_are_refused(how):
    # only batch 1 and 2 were compared: `x.shape[0] > 2` was traced as a size branch (0.049 off at batch 3)
    with pytest.raises(TraceError, match="branches on the batch size"):
        trace(BatchThreshold(how), n_inputs=1, example=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("size", [15, 16])
def test_sizes_read_as_numbers_and_loops_over_sizes_are_decided_on_the_example_input(size):
    # fx refused int(x.shape[2] * 2), float(w), range(y.shape[1]), a loop over unbind / split(4, 3),
    # and a same-padding conv's max(...) over its weight's size (a parameter read while deciding
    # became a node of the graph being traced, so the decision failed)
    from sparsify.passes.trace import size_branches_note

    torch.manual_seed(0)
    model = SizesAsNumbers().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, size, size) * 2
    gm = trace(model, n_inputs=1, example=x[:1])
    want = model(x)
    assert want.std() > 0.1  # activations that can tell a wrong graph from the right one
    torch.testing.assert_close(gm(x), want)  # batch 3 where the example had 1: the batch stays free
    note = size_branches_note(gm)
    assert note.count("size_branch_models.py:") == 3 and "and more" in note and "read as a number" in note


@pytest.mark.parametrize("how", ["int", "len", "loop"])
def test_the_batch_size_read_as_a_number_or_looped_over_is_one_line(how):
    # len(x) fell through to fx's own error, whose advice (if / assert / loop) did not name the cause
    with pytest.raises(TraceError) as e:
        trace(BatchNumbers(how), n_inputs=1, example=torch.randn(1, 3, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg and "size_branch_models.py:" in msg and "stays free in training and export" in msg
    assert {"int": "reads the batch size as a Python number", "loop": "loops over the batch axis",
            "len": "write x.size(0), a traced size, instead of len(x)"}[how] in msg


def test_a_container_of_the_models_own_layers_built_in_forward_is_traced_through():
    # nn.Sequential(self.c2, nn.ReLU())(x) was refused as "created inside forward with weights of its own"
    class Slice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)])

        def forward(self, x):
            return nn.Sequential(*self.layers[:2])(x) + nn.Sequential(self.layers[2], nn.ReLU())(x.new_ones(1, 8, 1, 1))

    model, x = Slice().eval(), torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(trace(model)(x), model(x))


class ListedSplits(nn.Module):
    """Splits whose number of pieces is a size, turned into lists as users write it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.c(x)
        if self.how == "list_unbind":
            return self.d(torch.stack(list(y.unbind(1))[::-1], 1))
        if self.how == "torch_unbind":
            return self.d(torch.stack(list(torch.unbind(y, 1))[::-1], 1))
        if self.how == "star_unbind":
            return self.d(torch.stack([*y.unbind(1)][::-1], 1))
        if self.how == "tuple_unbind":
            return self.d(torch.stack(tuple(y.unbind(1))[1:] + (y[:, 0],), 1))
        if self.how == "list_split":
            return self.d(torch.cat(list(torch.split(y, 2, 1))[::-1], 1))
        return self.d(torch.cat(list(y.split(3, 1))[::-1], 1))  # 8 channels: 3, 3 and 2


@pytest.mark.parametrize("how", ["list_unbind", "torch_unbind", "star_unbind", "tuple_unbind", "list_split", "uneven_split"])
def test_splits_counted_by_a_size_turn_into_lists(how, tmp_path):
    # list(y.unbind(1)), list(torch.split(y, 2, 1)): "'len' is not supported in symbolic tracing"
    import sparsify
    from sparsify.runtime.export import export_model, open_session

    torch.manual_seed(0)
    model, x = ListedSplits(how).eval(), torch.randn(3, 3, 8, 8) * 2
    gm = trace(model, n_inputs=1, example=x[:1])
    want = model(x)
    assert want.std() > 0.1
    torch.testing.assert_close(gm(x), want)
    # and through a sparse transform and the export, against the transformed model
    res = sparsify.transform(model, "sparse-random", density=0.5, input_shape=(1, 3, 8, 8))
    sparse = res.model.eval()
    out = tmp_path / "m.onnx"
    export_model(sparse, res.recipe.input_shape, out)
    sess = open_session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, sparse(x).detach().numpy(), rtol=1e-4, atol=1e-4)
