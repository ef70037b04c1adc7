"""Masked layers: SparseConv2d (channel-level mask) and SparseLinear (element-level mask).

The mask is a float buffer of zeros and ones that lives next to the weight in the state dict.
``forward`` multiplies the weight by the mask, so a masked weight contributes nothing even before
``apply_mask_`` has zeroed it; trainers call ``apply_mask_`` after every optimiser step so that the
stored weight is exactly zero too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Masked:
    """Shared behaviour of the masked layers; ``mask`` and ``weight`` are set by the subclass."""

    mask: torch.Tensor
    weight: nn.Parameter

    def weight_mask(self) -> torch.Tensor:
        """The mask broadcast to the weight's full shape."""
        m = self.mask
        return m.reshape(m.shape + (1,) * (self.weight.dim() - m.dim())).expand_as(self.weight)

    def masked_weight(self) -> torch.Tensor:
        """The weight with masked entries set to zero (differentiable)."""
        m = self.mask
        return self.weight * m.reshape(m.shape + (1,) * (self.weight.dim() - m.dim()))

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weight wherever the mask is zero, in place."""
        self.weight.mul_(self.weight_mask())

    @property
    def density(self) -> float:
        """Live fraction of the mask (connections for a conv, weights for a linear)."""
        return float(self.mask.sum().item()) / self.mask.numel()

    @property
    def live_connections(self) -> int:
        """Number of live mask entries."""
        return int(self.mask.sum().item())

    def fan_in(self) -> torch.Tensor:
        """Live inputs per output unit (channel connections per output channel for a conv)."""
        return self.mask.sum(dim=1)


def _adopt(new: nn.Module, dense: nn.Module, mask: torch.Tensor | None) -> nn.Module:
    """Give ``new`` (built on the meta device, so nothing was initialised) ``dense``'s parameters,
    masked by ``mask``, as new tensors."""
    w = dense.weight.detach()
    m = torch.ones(new.mask.shape, dtype=w.dtype, device=w.device) if mask is None else \
        mask.detach().to(device=w.device, dtype=w.dtype).clone()
    if m.shape != new.mask.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match {tuple(new.mask.shape)}")
    new.register_buffer("mask", m)
    # one pass over the weight: the masked copy (masked entries exactly zero)
    new.weight = nn.Parameter(w * m.reshape(m.shape + (1,) * (w.dim() - m.dim())),
                              requires_grad=dense.weight.requires_grad)
    if dense.bias is not None:
        new.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
    return new


class SparseConv2d(_Masked, nn.Conv2d):
    """A Conv2d whose output channel ``o`` reads input channel ``i`` only where ``mask[o, i]`` is 1.

    The mask has shape ``[out_channels, in_channels // groups]``: one entry per channel
    connection, shared over the whole kernel window (Changpinyo et al. 2017, sect. 3.2).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer(
            "mask", torch.ones(self.out_channels, self.in_channels // self.groups, dtype=self.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> "SparseConv2d":
        """A SparseConv2d with ``conv``'s hyper-parameters and weights, masked by ``mask``."""
        if conv.padding_mode != "zeros":
            raise ValueError("SparseConv2d supports zero padding only")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype,
        )
        return _adopt(new, conv, mask)

    def to_dense(self) -> nn.Conv2d:
        """A plain Conv2d computing the same function (masked weights baked in)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.masked_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class SparseLinear(_Masked, nn.Linear):
    """A Linear layer with an element-wise mask of shape ``[out_features, in_features]``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones(self.out_features, self.in_features, dtype=self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weights, masked by ``mask``."""
        new = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype,
        )
        return _adopt(new, linear, mask)

    def to_dense(self) -> nn.Linear:
        """A plain Linear computing the same function."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.masked_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


SPARSE_LAYERS = (SparseConv2d, SparseLinear)


def live_params(model: nn.Module) -> int:
    """Parameters that can be non-zero: masked layers count live weights only, everything else in full."""
    total = 0
    for mod in model.modules():
        has_mask = isinstance(mod, _Masked)
        for name, p in mod.named_parameters(recurse=False):
            if has_mask and name == "weight":
                total += int(mod.weight_mask().bool().sum().item())
            else:
                total += p.numel()
    return total


def sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    """All masked layers of ``model`` by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}
