"""A model whose only convs are kinds that masks do not cover (3-D, transposed, depthwise) is refused
by the mask methods with one line that names those layers and the method that does resize them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.errors import PassError
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import trace


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.t = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.t(torch.relu(self.bn(self.a(x)))).mean((2, 3, 4)))


def test_only_unmaskable_convs_refuses_naming_them_and_depth_multiplier_resizes():
    gm, x = trace(Volume()), torch.randn(1, 2, 4, 4, 4)
    with pytest.raises(PassError) as e:
        SparseRandomPass(0.5)(gm, x)
    msg = str(e.value)
    assert "\n" not in msg and "Conv3d, ConvTranspose3d layers stay dense" in msg and "depth-multiplier" in msg
    m = DepthMultiplierPass(0.5)(gm, x).model
    assert m.a.out_channels == 4 and m.bn.num_features == 4 and m.t.in_channels == 4
