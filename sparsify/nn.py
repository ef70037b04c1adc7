"""Masked layers: SparseConv1d / SparseConv2d (channel-level mask) and SparseLinear (element-level mask).

The mask is a float buffer of zeros and ones that lives next to the weight in the state dict.
``forward`` multiplies the weight by the mask, so a masked weight contributes nothing even before
``apply_mask_`` has zeroed it; trainers call ``apply_mask_`` after every optimiser step so that the
stored weight is exactly zero too.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def broadcast_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mask`` (``[Cout, Cin/g]`` of a conv, the weight's leading dims) shaped to multiply ``weight``
    (``[Cout, Cin/g, kh, kw]``): trailing dims of 1."""
    return mask.reshape(mask.shape + (1,) * (weight.dim() - mask.dim()))


class _Masked:
    """Shared behaviour of the masked layers; ``mask`` and ``weight`` are set by the subclass."""

    mask: torch.Tensor
    weight: nn.Parameter

    def weight_mask(self) -> torch.Tensor:
        """The mask broadcast to the weight's full shape."""
        return broadcast_mask(self.mask, self.weight).expand_as(self.weight)

    def masked_weight(self) -> torch.Tensor:
        """The weight with masked entries set to zero (differentiable)."""
        return self.weight * broadcast_mask(self.mask, self.weight)

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


class _MaskedConv(_Masked):
    """A conv whose output channel ``o`` reads input channel ``i`` only where ``mask[o, i]`` is 1.

    The mask has shape ``[out_channels, in_channels // groups]``: one entry per channel
    connection, shared over the whole kernel window (Changpinyo et al. 2017, sect. 3.2).
    ``fan_in_block`` > 1: runs of that many output channels (from channel 0) share one row of the
    mask (block sparsity, the transform's ``block``); the training schedules keep it so.
    """

    _dense: type[nn.modules.conv._ConvNd]
    fan_in_block: int = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer(
            "mask", torch.ones(self.out_channels, self.in_channels // self.groups, dtype=self.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, conv: nn.modules.conv._ConvNd, mask: torch.Tensor | None = None):
        """A masked conv with ``conv``'s hyper-parameters and weights, masked by ``mask``."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__} supports zero padding only")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype,
        )
        return _adopt(new, conv, mask)

    def to_dense(self) -> nn.modules.conv._ConvNd:
        """The plain conv computing the same function (masked weights baked in)."""
        conv = self._dense(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.masked_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class SparseConv1d(_MaskedConv, nn.Conv1d):
    """A channel-masked Conv1d for ``[N, C, L]`` signals (see ``_MaskedConv``). Exported as a plain
    Conv with masked weights: the native SparseConv kernel is 2-D only."""

    _dense = nn.Conv1d


class SparseConv2d(_MaskedConv, nn.Conv2d):
    """A channel-masked Conv2d (see ``_MaskedConv``); exported as ``ai.sparsify::SparseConv`` where it wins."""

    _dense = nn.Conv2d


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


class MaskedLeaf(_Masked):
    """A user's leaf module (its own ``forward``, e.g. a conv with dynamic "same" padding) masked in
    place: ``forward`` is the leaf's own, run with ``weight`` replaced by ``weight * mask``.

    Built by ``masked_leaf`` for leaves a rule declares to compute a conv or a linear map over their
    ``weight``; ``to_dense`` gives back the leaf's own type with the masked weight baked in.
    """

    _leaf_type: type

    def forward(self, *args, **kwargs):
        masked = self.masked_weight()
        weight = self._parameters.pop("weight")
        object.__setattr__(self, "weight", masked)
        try:
            return self._leaf_type.forward(self, *args, **kwargs)
        finally:
            del self.__dict__["weight"]
            self._parameters["weight"] = weight

    @torch.no_grad()
    def reads_masked_inputs(self, input_shape: Sequence[int], probes: int = 32, seed: int = 0) -> int | None:
        """An output unit whose value changes when only inputs its mask removes change, or None.

        The leaf's rule claims that its forward computes a conv (channels on axis 1) or a linear map
        (last axis) over its ``weight``; a forward that transforms the weight first (weight
        standardisation: zeros become ``-mean / std``) reads every input whatever the mask. Checked on
        up to ``probes`` output units: each gets a copy of one random input of ``input_shape`` (the
        leaf's input, batch included) with every input channel it does not read replaced by noise;
        its output must not move (relative tolerance 1e-4). Runs in eval mode.
        """
        conv = self.weight.dim() > 2
        n_out, per_group = self.mask.shape
        axis = 1 if conv else len(input_shape) - 1
        n_in = int(input_shape[axis])
        groups = max(1, n_in // per_group) if conv else 1
        gen = torch.Generator().manual_seed(seed)
        sample = (1, *input_shape[1:])
        probes = max(1, min(probes, n_out, 8_000_000 // max(1, math.prod(sample))))
        units = torch.randperm(n_out, generator=gen)[:probes]
        live = torch.zeros(probes, n_in, dtype=torch.bool)
        for k, o in enumerate(units.tolist()):
            g = o // max(1, n_out // groups)
            live[k, g * per_group:(g + 1) * per_group] = self.mask[o].bool().cpu()
        w = self.weight
        base = torch.randn(sample, generator=gen).to(device=w.device, dtype=w.dtype)
        noise = torch.randn((probes, *input_shape[1:]), generator=gen).to(device=w.device, dtype=w.dtype)
        dead = (~live).to(device=w.device, dtype=w.dtype)
        dead = dead.reshape(probes, n_in, *(1,) * (len(input_shape) - 2)) if conv else \
            dead.reshape(probes, *(1,) * (len(input_shape) - 2), n_in)
        x = torch.cat([base, base + noise * dead])
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            y = self(x)
        finally:
            for m, training in modes.items():
                m.training = training
        y = y.movedim(1 if conv else -1, 0)                     # [n_out, probes + 1, ...]
        scale = float(y[:, 0].abs().max()) + 1e-12
        for k, o in enumerate(units.tolist()):
            if float((y[o, k + 1] - y[o, 0]).abs().max()) > 1e-4 * scale:
                return o
        return None

    def to_dense(self) -> nn.Module:
        """The leaf's own type with the masked weight baked in (no mask buffer)."""
        import copy

        dense = copy.deepcopy(self)
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
        del dense._buffers["mask"]
        dense.__class__ = self._leaf_type
        return dense


_MASKED_LEAF_TYPES: dict[type, type] = {}


def masked_leaf(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    """A copy of leaf ``module`` whose ``weight`` is masked by ``mask`` ([out, in/groups], one entry per
    channel connection for a conv, per weight for a linear map), keeping its own forward."""
    import copy

    t = type(module)
    cls = _MASKED_LEAF_TYPES.get(t)
    if cls is None:
        cls = type(f"Masked{t.__name__}", (MaskedLeaf, t), {"_leaf_type": t, "__module__": __name__})
        _MASKED_LEAF_TYPES[t] = cls
    new = copy.deepcopy(module)
    new.__class__ = cls
    w = new.weight
    new.register_buffer("mask", mask.detach().to(device=w.device, dtype=w.dtype).clone())
    with torch.no_grad():
        w.mul_(new.weight_mask())
    return new


SPARSE_CONVS = (SparseConv1d, SparseConv2d)
SPARSE_LAYERS = (SparseConv1d, SparseConv2d, SparseLinear, MaskedLeaf)
SPARSE_CONV_FOR: dict[type, type] = {nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}  # dense type -> masked


def live_params(model: nn.Module) -> int:
    """Parameters that can be non-zero: masked layers count live weights only, everything else in full;
    a parameter several modules share (tied weights) counts once."""
    total, seen = 0, set()
    for mod in model.modules():
        has_mask = isinstance(mod, _Masked)
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if has_mask and name == "weight":
                total += int(mod.weight_mask().bool().sum().item())
            else:
                total += p.numel()
    return total


def sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    """All masked layers of ``model`` by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}
