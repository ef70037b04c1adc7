"""sparsify.passes.trace: tracing with leaves, shape recording, and models that run differently in training."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.errors import TraceError
from sparsify.passes.trace import graphs, mode_differences, node_shape, propagate_shapes, trace


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
