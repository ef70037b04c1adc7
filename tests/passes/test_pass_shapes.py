"""One shape of pass: ``pass(module, example) -> PassResult`` on a copy, and export's preparation as
a declared list of them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.errors import PassError
from sparsify.nn import SPARSE_LAYERS, SparseConv2d, SparseLinear
from sparsify.passes.base import GraphPass, run_passes
from sparsify.passes.compact import CompactionReport, CompactPass, FoldBatchNormPass
from sparsify.passes.lowering import DensifyPass, TracePass
from sparsify.runtime.export import PREPARATION, preparation


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = SparseConv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = SparseConv2d(8, 8, 3, padding=1)
        self.fc = SparseLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(self.c2(x).mean(dim=(2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.c1.mask[2] = 0  # a dead filter: compaction removes it
        m.c1.apply_mask_()
        m.c1.bias[2] = 0.0
    return m


def test_export_preparation_is_the_declared_list_in_order():
    assert PREPARATION == ("trace", "compact", "densify", "fold-bn", "onnx-forms")
    assert [p.name for p in preparation()] == list(PREPARATION)
    assert [p.name for p in preparation(compact=False)] == ["trace", "densify", "fold-bn", "onnx-forms"]
    assert [p.name for p in preparation(compact=False, fold_bn=False)] == ["densify", "onnx-forms"]
    assert all(isinstance(p, GraphPass) for p in preparation())


def test_every_pass_returns_its_module_and_report_and_leaves_the_input_alone():
    m = _net()
    x = torch.randn(2, 3, 6, 6)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out, reports = run_passes(preparation(channel_align=1), m, x)
    assert list(reports) == list(PREPARATION)
    assert isinstance(reports["compact"], CompactionReport) and reports["compact"].channels_removed >= 1
    assert reports["densify"] == ["c1", "c2", "fc"]
    assert reports["fold-bn"] == ["bn"]
    assert reports["onnx-forms"] == []  # nothing torch.onnx cannot express
    assert not any(isinstance(mod, SPARSE_LAYERS) for mod in out.modules())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # the input is untouched
    assert isinstance(m.c1, SparseConv2d)
    with torch.no_grad():
        y, ref = out(x * 3), m(x * 3)
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_graph_passes_refuse_a_module_that_is_not_traced():
    for p in (CompactPass(), FoldBatchNormPass()):
        with pytest.raises(PassError, match="trace the model first"):
            p(_net(), torch.randn(2, 3, 6, 6))
    gm = TracePass()(_net(), None).model
    assert DensifyPass()(gm, None).report == ["c1", "c2", "fc"]
