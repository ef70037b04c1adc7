"""Models whose forward asserts and branches on sizes, for test_trace.py. Kept out of the test
module: pytest rewrites the asserts of test modules into code without Python's assert bytecode,
which is what tracing recognises an assert by."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class SizeBranches(nn.Module):
    """Python control flow on sizes as users write it: asserts on the input, a UNet's resize of the
    upsampled map to its skip connection, padding to a multiple of 8, with BatchNorm before it."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up, self.out = nn.ConvTranspose2d(16, 16, 2, stride=2), nn.Conv2d(19, 8, 3, padding=1)

    def forward(self, x):
        assert x.dim() == 4 and x.shape[1] == 3, "expects NCHW RGB"
        u = self.up(torch.relu(self.bn(self.down(x))))
        if u.shape[-2:] != x.shape[-2:]:
            u = nn.functional.interpolate(u, size=x.shape[-2:])
        y = self.out(torch.cat([u, x], 1))
        if y.shape[-1] % 8 != 0:
            y = nn.functional.pad(y, (0, 8 - y.shape[-1] % 8))
        return y


class Branch(nn.Module):
    """One thing tracing cannot decide on the example input, by ``case``: a branch on the batch
    size (training runs others), on tensor values, an assert the example fails."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case, self.c = case, nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if self.case == "batch" and x.shape[0] == 1:
            x = x * 2
        if self.case == "values" and x.sum() > 0:
            x = -x
        assert self.case != "assert" or x.shape[-1] == 32, "needs 32 wide"
        return self.c(x)


class InPlaceShape(nn.Module):
    """A shape changed in place before the branch that reads it (not its ancestor in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.c(x).mean(-1)
        y.unsqueeze_(-1)
        if y.dim() == 3:  # False: y is 4-D again
            y = y * 100
        return y


class BatchThreshold(nn.Module):
    """Branches on the batch size that batch 1 and 2 agree on."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.c = how, nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if self.how == "gt2" and x.shape[0] > 2:
            x = x * 0.5
        if self.how == "numel" and x.numel() > 3 * 8 * 8 * 3:
            x = x * 0.5
        y = self.c(x)
        return y[:min(x.shape[0], 2)] if self.how == "min" else y


class SamePadConv(nn.Conv2d):
    """TensorFlow's "same" padding computed in forward (EfficientNet ports): ``math.ceil`` and
    ``max`` over the input's and the weight's sizes, then ``F.conv2d`` on its own weight."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        oh, ow = math.ceil(ih / self.stride[0]), math.ceil(iw / self.stride[1])
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SizesAsNumbers(nn.Module):
    """Sizes read as Python numbers and loops whose count is a size: ``int(h / 2)``, ``float(w)``,
    ``len`` of a tensor whose first axis is not the batch's, ``range(y.shape[1])``, ``for r in x.unbind(2)``, ``for p in x.split(4, 3)``; same-padding convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = SamePadConv(3, 16, 3, stride=2), SamePadConv(16, 8, 3)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = nn.functional.interpolate(x, size=(int(x.shape[2] * 2), int(x.shape[3] / 2 * 2)), mode="bilinear")
        rows = [r.mean(-1, keepdim=True) for r in x.unbind(2)]
        x = self.c2(x + torch.stack(rows, 2) * (float(x.shape[-1]) / len(x.transpose(0, 2))))
        acc = sum(x[:, i:i + 1] * (i + 1) for i in range(x.shape[1]))
        for piece in x.split(4, 3):
            acc = acc + piece.amax(3, keepdim=True)
        return acc


class BatchNumbers(nn.Module):
    """The batch size read as a number, or looped over: it stays free, so these are refused."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.c = how, nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if self.how == "int":
            return self.c(x).view(int(x.size(0)), -1)
        if self.how == "len":
            return self.c(x).view(len(x), -1)
        return torch.stack([self.c(img[None])[0] for img in x])
