"""Outputs packed into a namedtuple: the fields are model outputs (frozen as such, not as an unknown
op), and every pass keeps the namedtuple."""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import build, group, through_every_pass

Out = namedtuple("Out", ["logits", "features"])
SHAPE = (1, 3, 8, 8)


class NamedOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.fc = nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Linear(24, 10)

    def forward(self, x):
        a = F.relu(self.bn0(self.c0(x)))
        b = F.relu(self.c1(a))
        return Out(self.fc(b.mean((2, 3))), b)


def test_namedtuple_fields_are_model_outputs():
    # the note read "group of 24 channels kept (unknown op Out at out)"
    cg = build(NamedOutputs(), SHAPE)
    g = group(cg, "c1")
    assert g.frozen and g.reasons and all(r == "model output" for r in g.reasons), g.reasons
    assert not group(cg, "c0").frozen
    dm, _, _ = through_every_pass(NamedOutputs(), SHAPE)
    with torch.no_grad():
        y = dm.model.eval()(torch.randn(2, 3, 8, 8))
    assert isinstance(y, Out) and y.features.shape == (2, 24, 4, 4) and dm.model.c0.out_channels == 8
