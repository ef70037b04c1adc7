"""Weight sharing (issue 9, item 7): one module applied twice ties the groups it reads and writes."""
from __future__ import annotations

import torch
import torch.nn as nn

from .helpers import build, group, through_every_pass


class SharedFrozen(nn.Module):
    """One conv reads the image (frozen) and a computed 3-channel map (free): both are tied, so the
    map's producer keeps 3 channels."""

    def __init__(self):
        super().__init__()
        self.coarse = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))
        self.embed = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.embed(x)) + torch.relu(self.embed(self.coarse(x)))
        return self.fc(y.mean((2, 3)))


def test_one_module_ties_a_frozen_and_a_free_group():
    cg = build(SharedFrozen())
    assert group(cg, "coarse_2") is group(cg, "x") and group(cg, "coarse_2").frozen
    assert group(cg, "embed") is group(cg, "embed_1") and not group(cg, "embed").frozen
    dm, _, _ = through_every_pass(SharedFrozen(), (1, 3, 8, 8))
    m = dm.model
    assert m.get_submodule("coarse.2").out_channels == 3 and m.embed.in_channels == 3
    assert m.embed.out_channels == 8 and m.get_submodule("coarse.0").out_channels == 8


class SharedFree(nn.Module):
    """One conv applied to two free groups: they become one group, resized together."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc((self.shared(torch.relu(self.a(x))) * self.shared(torch.relu(self.b(x)))).mean((2, 3)))


def test_one_module_ties_two_free_groups():
    cg = build(SharedFree())
    assert group(cg, "a") is group(cg, "b")
    dm, _, report = through_every_pass(SharedFree(), (1, 3, 8, 8))
    assert dm.model.a.out_channels == dm.model.b.out_channels == dm.model.shared.in_channels == 4
